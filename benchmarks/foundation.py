"""Foundation figures: time from `make run` to ready (first and second start), and the p50 of an
upload and of a 256-px render of photo-4000x3000.jpg over real HTTP.

Run: `make bench`. Results print as markdown.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

import httpx
from harness import IMAGES, free_port, ms, start, stop, timed

ROUNDS = 30


def main() -> None:
    data = (IMAGES / "photo-4000x3000.jpg").read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            "IMGSVC_DATA_DIR": f"{tmp}/data",
            "IMGSVC_PORT": str(port),
            "IMGSVC_CACHE_BYTES": "0",
            "IMGSVC_RENDER_RATE": "0",
        }
        command = ["make", "--no-print-directory", "run"]
        proc, first = start(command, env, url, Path(tmp) / "first.log")
        stop(proc)
        proc, second = start(command, env, url, Path(tmp) / "second.log")
        try:
            with httpx.Client(base_url=url, timeout=60) as http:
                ids = []

                def upload() -> None:
                    body = data + secrets.token_bytes(16)  # bytes after EOI: a distinct, still valid JPEG
                    response = http.post("/images", content=body, headers={"Content-Type": "image/jpeg"})
                    assert response.status_code == 201, response.text
                    ids.append(response.json()["id"])

                uploads = timed(upload, ROUNDS)
                renders = timed(lambda: http.get(f"/img/{ids[-1]}", params={"w": "256"}).raise_for_status(), ROUNDS)
        finally:
            stop(proc)
    print(f"\n| figure ({os.cpu_count()} cores) | value |\n|---|---|")
    print(f"| `make run` → ready, first start (initdb) | {first:.2f} s |")
    print(f"| `make run` → ready, second start | {second:.2f} s |")
    print(f"| upload of photo-4000x3000.jpg (2.3 MB), {ROUNDS} sequential | {ms(uploads)} |")
    print(f"| render w=256 JPEG, variant cache off, {ROUNDS} sequential | {ms(renders)} |")


if __name__ == "__main__":
    main()
