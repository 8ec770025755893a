"""A bounded soak: uploads, hits, misses, deletes and hostile requests from 8 client threads against a real
server for SOAK_SECONDS (default 90): every kind answered as it should (no 5xx), RSS flat, no fd or thread growth."""

from __future__ import annotations

import os
import random
import secrets
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

from tests.conftest import FLICKR, PNG_ALPHA, ServerProcess

SECONDS = float(os.environ.get("SOAK_SECONDS", "90"))
MIX = {"hit": 40, "miss": 25, "upload": 10, "delete": 5, "hostile": 20}  # weights, per request
EXPECTED = {  # the statuses each kind may get: the render queue (16) exceeds the 8 clients, uploads are not limited
    "hit": {200},
    "miss": {200},
    "upload": {201},
    "delete": {204},
    "hostile": {400, 404, 415, 422},  # SVG 415, truncated JPEG 422, empty 400, w=0 and w twice 400, traversal 404
}


def slope_mib_per_minute(samples: list[tuple[float, int]]) -> float:
    times = [t for t, _ in samples]
    values = [rss / 2**20 for _, rss in samples]
    return statistics.linear_regression(times, values).slope * 60


def test_soak(server_env: dict[str, str], tmp_path: Path) -> None:
    env = {**server_env, "IMGSVC_UPLOAD_RATE": "0", "IMGSVC_UNSIGNED_WIDTHS": "*", "IMGSVC_RENDER_QUEUE": "16",
           "IMGSVC_CACHE_BYTES": str(4 * 2**20), "IMGSVC_ORIGINALS_CACHE_BYTES": str(8 * 2**20)}  # fmt: skip
    server = ServerProcess(env, tmp_path / "soak.log").start()
    process = psutil.Process(server.proc.pid)  # type: ignore[union-attr]
    statuses: dict[str, Counter[int]] = {kind: Counter() for kind in MIX}
    lock = threading.Lock()
    small = (FLICKR.read_bytes(), PNG_ALPHA.read_bytes())
    try:
        with httpx.Client(base_url=server.url, timeout=60) as setup:
            seeds = [setup.post("/images", content=data, headers={"Content-Type": "image/*"}).json()["id"]
                     for data in small]  # fmt: skip
        uploaded: list[str] = []
        stop_at = time.monotonic() + SECONDS

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=server.url, timeout=60) as http:
                while time.monotonic() < stop_at:
                    kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
                    if kind == "hit":
                        response = http.get(f"/img/{rng.choice(seeds)}?w=128&fmt=webp")
                    elif kind == "miss":
                        response = http.get(f"/img/{rng.choice(seeds)}?w={rng.randint(100, 900)}&fmt=webp")
                    elif kind == "upload":
                        body = rng.choice(small) + secrets.token_bytes(16)
                        response = http.post("/images", content=body, headers={"Content-Type": "image/*"})
                        if response.status_code == 201:
                            with lock:
                                uploaded.append(response.json()["id"])
                    elif kind == "delete":
                        with lock:
                            victim = uploaded.pop() if uploaded else None
                        if victim is None:
                            continue
                        response = http.delete(f"/images/{victim}")
                    else:
                        junk: bytes = rng.choice([b"<svg/>" * 100, small[0][:5000], b""])
                        response = rng.choice([
                            lambda junk=junk: http.post("/images", content=junk, headers={"Content-Type": "image/png"}),
                            lambda: http.get(f"/img/{rng.choice(seeds)}?w=0"),
                            lambda: http.get("/img/..%2f..%2fetc?w=64"),
                            lambda: http.get(f"/img/{rng.choice(seeds)}?w=64&w=65"),
                        ])()  # fmt: skip
                    with lock:
                        statuses[kind][response.status_code] += 1

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        samples: list[tuple[float, int]] = []
        began = time.monotonic()
        warm: tuple[int, int] | None = None
        while any(thread.is_alive() for thread in threads):
            now = time.monotonic() - began
            samples.append((now, process.memory_info().rss))
            if warm is None and now > SECONDS / 4:
                warm = (process.num_fds(), process.num_threads())
            time.sleep(0.5)
        for thread in threads:
            thread.join()
        end = (process.num_fds(), process.num_threads())
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/readyz").status_code == 200
            assert all(http.get(f"/img/{seed}?w=64").status_code == 200 for seed in seeds)
    finally:
        server.stop()

    total = sum(sum(counts.values()) for counts in statuses.values())
    second_half = [s for s in samples if s[0] > SECONDS / 2]
    slope = slope_mib_per_minute(second_half)
    by_kind = {kind: dict(sorted(counts.items())) for kind, counts in statuses.items()}
    report = (f"soak {SECONDS:g} s: {total} requests ({total / SECONDS:.0f}/s), statuses by kind {by_kind}, "
              f"RSS {samples[0][1] / 2**20:.0f} -> {samples[-1][1] / 2**20:.0f} MiB, "
              f"second-half slope {slope:+.2f} MiB/min, fds/threads {warm} -> {end}, RSS by tenths "
              f"{[samples[len(samples) * i // 10][1] // 2**20 for i in range(10)]}")  # fmt: skip
    (tmp_path / "soak-report.txt").write_text(report)
    print(report)
    assert all(set(counts) <= EXPECTED[kind] for kind, counts in statuses.items()), report
    assert all(statuses[kind] for kind in MIX), report  # every kind really ran
    assert total > 10 * SECONDS, report  # it really ran under load
    assert abs(slope) < 20, report  # flat: a leak of a few hundred kB per request would show here
    assert warm is not None and end[0] <= warm[0] + 10 and end[1] <= warm[1] + 4, report
    assert "Traceback" not in (tmp_path / "soak.log").read_text()
