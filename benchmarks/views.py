"""The cost of view counting on LRU hits: imgsvc with IMGSVC_VIEWS=false and =true (and, with --before, a tree
without the feature), all serving one remembered hit at once, measured with wrk in alternating rounds."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import timeit
from pathlib import Path

from harness import REPO
from hits_ab import Servers, arguments, compare, table

IMAGE_ID = "Xb3kq_-9AAAAAAAAAAAAAA"


def count_cost() -> float:
    """Nanoseconds of one `ViewCounter.count` of a pending image, in-process (min of 20 batches of 100,000)."""
    from imgsvc.views import ViewCounter

    count = ViewCounter(100_000).count
    return min(timeit.repeat(lambda: count(IMAGE_ID), number=100_000, repeat=20)) / 100_000 * 1e9


def remembered_hit_costs(batches: int = 200, calls: int = 1_000) -> tuple[float, float]:
    """Microseconds of `RequestContext` answering one remembered hit without / with counting, in-process without a
    server or access log: the minimum over `batches` interleaved batches of `calls` each (the load moves both)."""
    from imgsvc.cache import ByteLRU
    from imgsvc.hits import HitIndex, request_key
    from imgsvc.middleware import RequestContext
    from imgsvc.records import RecordCache
    from imgsvc.views import ViewCounter

    records = RecordCache(3600)
    records.trust(True)
    variants: ByteLRU[str, bytes] = ByteLRU(1 << 20, len)
    variants.put("variant", b"x" * 3000)
    hits = HitIndex(records, variants)
    headers = [(b"content-type", b"image/webp"), (b"etag", b'"e"')]
    key = request_key(f"/img/{IMAGE_ID}", b"w=256", None)
    hits.store(key, IMAGE_ID, "variant", records.stamp(), '"e"', headers, [])
    scope = {"type": "http", "method": "GET", "path": f"/img/{IMAGE_ID}", "query_string": b"w=256", "headers": []}

    async def send(message: object) -> None:
        return None

    async def batch(middleware: RequestContext) -> float:
        began = time.perf_counter()
        for _ in range(calls):
            await middleware(dict(scope), None, send)  # type: ignore[arg-type]
        return time.perf_counter() - began

    async def run() -> tuple[float, float]:
        off = RequestContext(None, hits, access_log=False, views=None)  # type: ignore[arg-type]
        on = RequestContext(None, hits, access_log=False, views=ViewCounter(100_000))  # type: ignore[arg-type]
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(batches):
            times[False].append(await batch(off))
            times[True].append(await batch(on))
        return min(times[False]) / calls * 1e6, min(times[True]) / calls * 1e6

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", type=Path, help="a checkout of the commit before view counts")
    args = arguments(parser)
    sys.path.insert(0, str(REPO))
    print(f"ViewCounter.count: {count_cost():.0f} ns per call", flush=True)
    for _ in range(3):
        off, on = remembered_hit_costs()
        print(f"RequestContext, remembered hit: {off:.2f} µs without counting, {on:.2f} µs with", flush=True)
    quiet = {"IMGSVC_ACCESS_LOG": "false"}  # as behind nginx: the hit path at its fastest, so the count weighs most
    servers: Servers = {"off": (REPO, {**quiet, "IMGSVC_VIEWS": "false"}), "on": (REPO, quiet)}
    if args.before:
        servers = {"before": (args.before, quiet), **servers}
    runs = compare(servers, args.rounds, args.hit_seconds, args.connections)
    table(runs, "off", "on", args.connections)
    if args.before:
        table(runs, "before", "on", args.connections)


if __name__ == "__main__":
    main()
