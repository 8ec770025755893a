"""What one client costs imgsvc with unsigned URLs: CPU seconds of the server for 100 distinct variant URLs.

Default settings (nothing but a data dir and a port), photo-4000x3000.jpg at 1080 px or less, 8 connections
from one client. Meanwhile a bystander on another loopback address asks for 10 distinct allowed variants,
one at a time.
Run: `cd benchmarks && ../.venv/bin/python unsigned.py`.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from harness import IMAGES, free_port, kill, print_table, start
from peers.measure import cpu_seconds

PHOTO = (IMAGES / "photo-4000x3000.jpg").read_bytes()
WIDTHS = (16, 32, 48, 64, 96, 128, 256, 384, 640, 750, 828, 1080)


def attacker_queries() -> list[str]:
    """What the issue describes: an allowed width, and blur, q or bg varied (bg with contain, where it shows)."""
    queries = []
    for i in range(100):
        if i % 3 == 0:
            queries.append(f"w=1080&blur={20 + i / 4:g}")
        elif i % 3 == 1:
            queries.append(f"w=1080&q={i}")
        else:
            queries.append(f"w=1080&h=1080&fit=contain&bg={i * 0x02A3B1 % 0xFFFFFF:06x}")
    return queries


def allowed_queries() -> list[str]:
    """100 distinct variants inside the default unsigned space: widths x formats x a few quality steps."""
    queries = [
        f"w={w}&fmt={fmt}" + (f"&q={q}" if q else "")
        for q in (None, 60, 75)
        for fmt in ("jpeg", "webp", "avif")
        for w in WIDTHS[:11]
    ]
    return [*queries, "w=1080&fmt=jpeg"][:100]


def bystander_queries() -> list[str]:
    return [f"w={w}&fmt=png" for w in WIDTHS[:10]]


def run(name: str, queries: list[str], tmp: Path) -> tuple[str, ...]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"IMGSVC_DATA_DIR": str(tmp / str(port)), "IMGSVC_PORT": str(port), "IMGSVC_LOG_LEVEL": "warning"}
    proc, _ = start([sys.executable, "-m", "imgsvc", "serve"], env, url, tmp / f"imgsvc-{port}.log")
    try:
        image_id = httpx.post(f"{url}/images", content=PHOTO, headers={"Content-Type": "image/jpeg"}).json()["id"]
        bystander = Bystander(f"{url}/img/{image_id}")
        time.sleep(1.0)  # let the upload's probe settle
        cpu_before = cpu_seconds([proc.pid])
        began = time.perf_counter()
        with httpx.Client(timeout=120) as client, ThreadPoolExecutor(8) as pool:
            get: Callable[[str], int] = lambda q: client.get(f"{url}/img/{image_id}?{q}").status_code  # noqa: E731
            bystander.start()
            statuses = Counter(pool.map(get, queries))
        elapsed = time.perf_counter() - began
        bystander.join()
        time.sleep(0.5)
        cpu = cpu_seconds([proc.pid]) - cpu_before
    finally:
        kill(proc)
    shown = ", ".join(f"{count}× {status}" for status, count in sorted(statuses.items()))
    return (name, f"{cpu:.2f} s", f"{elapsed:.1f} s", shown, bystander.summary())


class Bystander(threading.Thread):
    """Another client (127.0.0.2) asking for its own variants one after another while the flood runs."""

    def __init__(self, base: str) -> None:
        super().__init__()
        self.base = base
        self.results: list[tuple[int, float]] = []

    def run(self) -> None:
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(transport=transport, timeout=120) as client:
            for query in bystander_queries():
                began = time.perf_counter()
                status = client.get(f"{self.base}?{query}").status_code
                self.results.append((status, time.perf_counter() - began))

    def summary(self) -> str:
        statuses = Counter(status for status, _ in self.results)
        p50 = statistics.median(seconds for _, seconds in self.results) * 1000
        return ", ".join(f"{count}× {status}" for status, count in sorted(statuses.items())) + f"; p50 {p50:.0f} ms"


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(run("100 URLs varying blur / q / bg", attacker_queries(), Path(tmp)))
        rows.append(run("100 URLs inside the default unsigned space", allowed_queries(), Path(tmp)))
    header = ("one client, 8 connections", "imgsvc CPU", "wall", "statuses", "bystander: 10 renders")
    print_table(header, rows)


if __name__ == "__main__":
    main()
