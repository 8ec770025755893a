"""The reference: pyvips `thumbnail` with default settings, in-process, `threads` threads back to back, no HTTP.

Each render decodes the same source bytes, thumbnails to a width cycling like the servers' (target-7..+7)
and saves with the format's defaults but the workload's quality. Run by compare.py in a child process:
`python -m peers.reference W1 10 2` prints renders, seconds, latency percentiles, CPU and peak RSS as JSON.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import threading
import time

import pyvips

from peers.workloads import SPREAD, WORKLOADS

SUFFIX = {"webp": ".webp", "jpeg": ".jpg", "avif": ".avif"}


def main(key: str, seconds: float, threads: int) -> None:
    wl = next(wl for wl in WORKLOADS if wl.key == key)
    data = wl.source.read_bytes()
    latencies: list[float] = []
    lock = threading.Lock()

    def loop(offset: int) -> None:
        n = offset
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            width = wl.width - SPREAD + n % (2 * SPREAD + 1)
            pyvips.Image.thumbnail_buffer(data, width).write_to_buffer(SUFFIX[wl.fmt], Q=wl.quality)
            with lock:
                latencies.append(time.perf_counter() - began)
            n += 1

    cpu, began = time.process_time(), time.perf_counter()
    deadline = began + seconds
    workers = [threading.Thread(target=loop, args=(i * 7,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    cuts = statistics.quantiles(latencies, n=100)
    print(
        json.dumps(
            {
                "renders": len(latencies),
                "seconds": elapsed,
                "rps": len(latencies) / elapsed,
                "p50_ms": statistics.median(latencies) * 1000,
                "p99_ms": cuts[98] * 1000,
                "cpu_ms": cpu / len(latencies) * 1000,
                "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))
