"""Latency of one variant for 2569067123_aca715a2ee_o.jpg (2725x2225) -> 256-px WebP and -> 1024-px JPEG:
p50 through HTTP on a miss and on an LRU hit, LRU-hit requests/s at 32 connections (wrk), and the
same render in-process with no HTTP (imgsvc's pipeline, and pyvips defaults): the floor.

Run: `make bench`. Results print as markdown.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pyvips
from harness import IMAGES, ms, print_table, start_imgsvc, stop, timed, wrk

from imgsvc import pipeline
from imgsvc.spec import TransformSpec

ROUNDS = 40
SOURCE = IMAGES / "2569067123_aca715a2ee_o.jpg"
VARIANTS = [
    ("256-px WebP", "w=256&fmt=webp", TransformSpec(width=256, format="webp"), "webp", ".webp"),
    ("1024-px JPEG", "w=1024&fmt=jpeg", TransformSpec(width=1024, format="jpeg"), "jpeg", ".jpg"),
]


def upload(url: str) -> str:
    response = httpx.post(f"{url}/images", content=SOURCE.read_bytes(), headers={"Content-Type": "image/jpeg"})
    response.raise_for_status()
    return str(response.json()["id"])


def in_process_per_second(render, threads: int, seconds_each: int = 40) -> float:  # type: ignore[no-untyped-def]
    """Renders/s with `threads` threads rendering back to back (the CPU-bound ceiling)."""
    with ThreadPoolExecutor(threads) as pool:
        samples = timed(lambda: list(pool.map(lambda _: render(), range(threads * seconds_each))), 1)
    return threads * seconds_each / samples[0]


def main() -> None:
    data = SOURCE.read_bytes()
    limits = pipeline.PipelineLimits()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cached, cached_url = start_imgsvc(Path(tmp) / "cached")
        uncached, uncached_url = start_imgsvc(Path(tmp) / "uncached", IMGSVC_CACHE_BYTES="0")
        try:
            cached_id, uncached_id = upload(cached_url), upload(uncached_url)
            with httpx.Client(timeout=60) as http:
                for name, query, spec, fmt, suffix in VARIANTS:
                    miss_url = f"{uncached_url}/img/{uncached_id}?{query}"
                    hit_url = f"{cached_url}/img/{cached_id}?{query}"
                    http.get(miss_url).raise_for_status()  # the originals LRU is warm for both, as in a burst
                    misses = timed(lambda url=miss_url: http.get(url).raise_for_status(), ROUNDS)
                    http.get(hit_url).raise_for_status()
                    hits = timed(lambda url=hit_url: http.get(url).raise_for_status(), ROUNDS * 5)
                    hit_rps, hit_latency = wrk(hit_url, 32)

                    def ours(spec=spec, fmt=fmt):  # type: ignore[no-untyped-def]
                        return pipeline.render(data, spec, fmt, limits)

                    def plain(spec=spec, suffix=suffix):  # type: ignore[no-untyped-def]
                        return pyvips.Image.thumbnail_buffer(data, spec.width).write_to_buffer(suffix)

                    floor = timed(ours, ROUNDS)
                    plain_floor = timed(plain, ROUNDS)
                    rows += [
                        (name, "HTTP miss (variant LRU off), sequential", ms(misses)),
                        (name, "HTTP LRU hit, sequential", ms(hits)),
                        (name, "HTTP LRU hits, wrk 32 connections", f"{hit_rps:,.0f} req/s ({hit_latency})"),
                        (name, "in-process imgsvc pipeline, no HTTP (floor)", ms(floor)),
                        (name, "in-process pipeline, 2 threads", f"{in_process_per_second(ours, 2):,.1f} renders/s"),
                        (name, "in-process pyvips defaults (thumbnail + save)", ms(plain_floor)),
                    ]
        finally:
            stop(cached)
            stop(uncached)
    print_table(("variant", f"figure ({os.cpu_count()} cores)", "value"), rows)


if __name__ == "__main__":
    main()
