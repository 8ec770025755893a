"""Hardening figures: peak RSS of imgsvc with 64 concurrent renders of photo-4000x3000.jpg at two worker
pool sizes, and how long a render killed by its deadline takes to free its worker.

Run: `make bench`.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from harness import IMAGES, print_table, start_imgsvc, stop

PHOTO = (IMAGES / "photo-4000x3000.jpg").read_bytes()


def tree_rss(pid: int) -> int:
    process = psutil.Process(pid)
    total = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            if "postgres" not in proc.name():  # imgsvc itself, not the embedded database
                total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def peak_rss_under_load(workers: int, tmp: Path) -> tuple[int, int, int, float]:
    """(idle RSS, peak RSS, 200s, seconds) for 64 concurrent distinct renders."""
    proc, url = start_imgsvc(tmp / f"w{workers}", IMGSVC_WORKERS=str(workers), IMGSVC_RENDER_QUEUE="64",
                             IMGSVC_CACHE_BYTES="0", IMGSVC_UNSIGNED_WIDTHS="*")  # fmt: skip
    try:
        image_id = httpx.post(f"{url}/images", content=PHOTO, headers={"Content-Type": "image/jpeg"}).json()["id"]
        server_pid = proc.pid  # `python -m imgsvc serve` itself
        idle = tree_rss(server_pid)
        peak, done = idle, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, tree_rss(server_pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        began = time.perf_counter()
        with ThreadPoolExecutor(64) as pool:
            def render(width: int) -> int:
                return httpx.get(f"{url}/img/{image_id}?w={width}&fmt=webp", timeout=120).status_code

            statuses = list(pool.map(render, range(1000, 1064)))
        elapsed = time.perf_counter() - began
        done.set()
        sampler.join()
        return idle, peak, statuses.count(200), elapsed
    finally:
        stop(proc)


def deadline_release(tmp: Path) -> tuple[float, float, float]:
    """(p50 time to the 503 of a killed render, p50 of the next small render right after, deadline)."""
    deadline = 0.3
    proc, url = start_imgsvc(tmp / "deadline", IMGSVC_WORKERS="1", IMGSVC_RENDER_TIMEOUT=str(deadline),
                             IMGSVC_CACHE_BYTES="0", IMGSVC_UNSIGNED_WIDTHS="*",
                             IMGSVC_UNSIGNED_EFFECTS="true")  # fmt: skip  # blur=100 unsigned
    killed, after = [], []
    try:
        image_id = httpx.post(f"{url}/images", content=PHOTO, headers={"Content-Type": "image/jpeg"}).json()["id"]
        for i in range(10):
            began = time.perf_counter()
            response = httpx.get(f"{url}/img/{image_id}?w={4000 - i}&fmt=jpeg&blur=100", timeout=60)
            killed.append(time.perf_counter() - began)
            assert response.status_code == 503, response.text
            began = time.perf_counter()
            assert httpx.get(f"{url}/img/{image_id}?w={64 + i}", timeout=60).status_code == 200
            after.append(time.perf_counter() - began)
    finally:
        stop(proc)
    return statistics.median(killed), statistics.median(after), deadline


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            idle, peak, ok, elapsed = peak_rss_under_load(workers, Path(tmp))
            figure = f"idle {idle / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, {ok}/64 ok in {elapsed:.1f} s"
            rows.append((f"64 concurrent renders (w=1000..1063 WebP), IMGSVC_WORKERS={workers}", figure))
        killed, after, deadline = deadline_release(Path(tmp))
        figure = f"503 after {killed * 1000:.0f} ms; next 64-px render on the freed worker {after * 1000:.0f} ms"
        case = f"render killed by a {deadline} s deadline (w=4000 blur=100 JPEG: 0.6 s of pixel work), p50 of 10"
        rows.append((case, figure))
    print_table((f"figure ({os.cpu_count()} cores)", "value"), rows)


if __name__ == "__main__":
    main()
