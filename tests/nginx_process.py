"""nginx as a real process on loopback: nginx/imgsvc.conf.template rendered with free ports and temp dirs."""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.conftest import REPO, free_port

NGINX_DIR = REPO / "nginx"


def find_nginx() -> str | None:
    """The nginx binary: on the PATH, or where Debian puts it (/usr/sbin is not on every user's PATH)."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def config_builder() -> ModuleType:
    """nginx/build_config.py, loaded by path (nginx/ is not a Python package)."""
    spec = importlib.util.spec_from_file_location("imgsvc_nginx_build_config", NGINX_DIR / "build_config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def loopback_values(
    workdir: Path, *, listen: str, render_listen: str, upstream: str, purge_listen: str = "127.0.0.1:0"
) -> dict[str, str]:
    """Every filesystem path of the production values moved under `workdir`, and loopback ports. The deny-list is
    off: on, a node bypasses its cache until an imgsvc fed it (IMGSVC_PURGE_NGINX); tests of it turn it on."""
    return {
        "USER": pwd.getpwuid(os.geteuid()).pw_name,  # as root: workers may write the temp dirs; else ignored
        "PID": str(workdir / "nginx.pid"),
        "ERROR_LOG": str(workdir / "error.log"),
        "ACCESS_LOG": str(workdir / "access.log"),
        "TEMP_DIR": str(workdir / "tmp"),
        "CACHE_DIR": str(workdir / "cache"),
        "CACHE_MAX_SIZE": "256m",
        "CACHE_MIN_FREE": "1m",
        "LISTEN": listen,
        "RENDER_LISTEN": render_listen,
        "UPSTREAM": upstream,
        "PURGE_LISTEN": purge_listen,
        "DENY_LIST": "off",
    }


class NginxProcess:
    """`nginx -p <workdir> -c nginx.conf -e stderr -g 'daemon off;'`, with bounded start and stop."""

    def __init__(self, binary: str, workdir: Path, upstream: str, *, purge_key: str = "", **values: str) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.render_port = free_port()
        self.purge_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.purge_url = f"http://127.0.0.1:{self.purge_port}"  # the deny-list feed (DENY_LIST=on)
        self.env = {**os.environ, "IMGSVC_PURGE_NGINX_KEY": purge_key}
        self.values = (
            loopback_values(
                workdir,
                listen=f"127.0.0.1:{self.port}",
                render_listen=f"127.0.0.1:{self.render_port}",
                upstream=upstream,
                purge_listen=f"127.0.0.1:{self.purge_port}",
            )
            | values
        )
        self.conf = workdir / "nginx.conf"
        self.stderr_path = workdir / "nginx.stderr"
        self.access_log = Path(self.values["ACCESS_LOG"])
        self.cache_dir = Path(self.values["CACHE_DIR"])
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "tmp").mkdir(exist_ok=True)
        self.conf.write_text(config_builder().build(self.values))
        return self.conf

    def command(self, *extra: str) -> list[str]:
        return [self.binary, "-p", str(self.workdir), "-c", str(self.conf), "-e", "stderr", *extra]

    def check(self) -> subprocess.CompletedProcess[str]:
        """`nginx -t` on this configuration."""
        self.write_config()
        return subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30, check=False, env=self.env)

    def start(self, timeout: float = 15.0) -> NginxProcess:
        self.write_config()
        with self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                self.command("-g", "daemon off;"), stdout=err, stderr=subprocess.STDOUT, env=self.env
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.stderr_path.read_text()[-3000:]}")
            ports = (self.port, self.render_port, *((self.purge_port,) if self.values["DENY_LIST"] == "on" else ()))
            if all(_listening(port) for port in ports):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"nginx not listening after {timeout}s:\n{self.stderr_path.read_text()[-3000:]}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """Graceful quit (SIGQUIT, as `nginx -s quit` sends); terminate, then kill, if it does not end in time."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                return proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait(5)

    def log(self) -> list[dict[str, Any]]:
        """The JSON access log of the public tier, one dict per request."""
        if not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line.strip()]

    def wait_for_log(self, predicate: Callable[[dict[str, Any]], bool], count: int, timeout: float = 5.0) -> list[dict]:
        """Entries matching `predicate`, once there are at least `count` (nginx logs after the response is sent)."""
        deadline = time.monotonic() + timeout
        while True:
            entries = [entry for entry in self.log() if predicate(entry)]
            if len(entries) >= count or time.monotonic() > deadline:
                return entries
            time.sleep(0.02)

    def cache_files(self) -> list[Path]:
        return [path for path in self.cache_dir.rglob("*") if path.is_file()]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0
