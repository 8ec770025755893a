"""Foundation figures: time from `make run` to ready (first and second start), and the p50 of an
upload and of a 256-px render of photo-4000x3000.jpg over real HTTP.

Run: `make bench` (or `.venv/bin/python benchmarks/foundation.py`). Results print as markdown.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "tests" / "images" / "photo-4000x3000.jpg"  # a copy of shared/images/photo-4000x3000.jpg
ROUNDS = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(command: list[str], env: dict[str, str], url: str, log: Path) -> tuple[subprocess.Popen[bytes], float]:
    began = time.monotonic()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    while time.monotonic() - began < 180:
        if proc.poll() is not None:
            sys.exit(f"server exited early, see {log}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, time.monotonic() - began
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    sys.exit("server not ready in 180 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(60)


def p50_ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:.1f} ms (p90 {statistics.quantiles(samples, n=10)[-1] * 1000:.1f})"


def main() -> None:
    data = PHOTO.read_bytes()
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "IMGSVC_DATA_DIR": f"{tmp}/data", "IMGSVC_PORT": str(port), "IMGSVC_CACHE_BYTES": "0"}
        command = ["make", "--no-print-directory", "run"]
        proc, first = start(command, env, url, Path(tmp) / "first.log")
        stop(proc)
        proc, second = start(command, env, url, Path(tmp) / "second.log")
        rows += [("`make run` → ready, first start (initdb)", f"{first:.2f} s"),
                 ("`make run` → ready, second start", f"{second:.2f} s")]  # fmt: skip
        try:
            with httpx.Client(base_url=url, timeout=60) as http:
                uploads, image_id = [], ""
                for _ in range(ROUNDS):
                    body = data + secrets.token_bytes(16)  # bytes after EOI: a distinct, still valid JPEG
                    began = time.perf_counter()
                    response = http.post("/images", content=body, headers={"Content-Type": "image/jpeg"})
                    uploads.append(time.perf_counter() - began)
                    assert response.status_code == 201, response.text
                    image_id = response.json()["id"]
                renders = []
                for _ in range(ROUNDS):
                    began = time.perf_counter()
                    response = http.get(f"/img/{image_id}", params={"w": "256"})
                    renders.append(time.perf_counter() - began)
                    assert response.status_code == 200
        finally:
            stop(proc)
        rows += [(f"upload of photo-4000x3000.jpg (2.3 MB), {ROUNDS} sequential", p50_ms(uploads)),
                 (f"render w=256 JPEG, variant cache off, {ROUNDS} sequential", p50_ms(renders))]  # fmt: skip
    print(f"\n| figure ({os.cpu_count()} cores) | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
