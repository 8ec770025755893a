"""What every benchmark needs: a loopback port, an imgsvc process started and stopped, percentiles, wrk."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "tests" / "images"  # copies of the shared benchmark corpus


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(
    command: list[str], env: dict[str, str], ready: str, log: Path, cwd: Path = REPO, ok: int = 500
) -> tuple[subprocess.Popen[bytes], float]:
    """Popen in a new session; (proc, seconds until `ready` answered below `ok`). RuntimeError if it never does."""
    began = time.monotonic()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            command, cwd=cwd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    while time.monotonic() - began < 180:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log.read_text()[-1500:]}")
        try:
            if httpx.get(ready, timeout=1).status_code < ok:
                return proc, time.monotonic() - began
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    kill(proc)
    raise RuntimeError(f"not answering {ready} after 180 s: {log.read_text()[-1500:]}")


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group, SIGKILL if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def start(
    command: list[str], env: dict[str, str], url: str, log: Path, ready_path: str = "/readyz"
) -> tuple[subprocess.Popen[bytes], float]:
    """Start a server in its own process group; return it and the seconds until `ready_path` answered 200."""
    try:
        return launch(command, env, f"{url}{ready_path}", log, ok=201)
    except RuntimeError as exc:
        sys.exit(f"server did not start ({exc}); see {log}")


def start_imgsvc(data_dir: Path, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = {"IMGSVC_DATA_DIR": str(data_dir), "IMGSVC_PORT": str(port), "IMGSVC_LOG_LEVEL": "warning",
                "IMGSVC_RENDER_RATE": "0", **env}  # fmt: skip  # one address sends every request here
    proc, _ = start([sys.executable, "-m", "imgsvc", "serve"], settings, url, data_dir.parent / f"imgsvc-{port}.log")
    return proc, url


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(60)


def ms(samples: list[float]) -> str:
    """p50 (and p90) in milliseconds."""
    return f"{statistics.median(samples) * 1000:.1f} ms (p90 {statistics.quantiles(samples, n=10)[-1] * 1000:.1f})"


def timed(fn, rounds: int) -> list[float]:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(rounds):
        began = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - began)
    return samples


def wrk(url: str, connections: int, seconds: int = 10, extra: tuple[str, ...] = ()) -> tuple[float, str]:
    """(requests/s, latency summary) from wrk; a warm-up run precedes the measured one."""
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: `make bench` installs it (apt-get install wrk)")
    command = ["wrk", "-t2", f"-c{connections}", "--latency", *extra]
    subprocess.run([*command, "-d2s", url], check=True, capture_output=True)
    out = subprocess.run([*command, f"-d{seconds}s", url], check=True, capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)  # type: ignore[union-attr]
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, f"p50 {p50}, p99 {p99}, non-2xx {errors.group(1) if errors else 0}"


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
