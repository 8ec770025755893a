"""The cost of view counting on LRU hits: imgsvc with IMGSVC_VIEWS=false and =true (and, with --before, a tree
without the feature), all serving one remembered hit at once, measured with wrk in alternating rounds."""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

from harness import REPO
from hits_ab import Servers, arguments, compare, table


def count_cost() -> float:
    """Nanoseconds of one `ViewCounter.count` of a pending image, in-process (min of 20 batches of 100,000)."""
    sys.path.insert(0, str(REPO))
    from imgsvc.views import ViewCounter

    counter = ViewCounter(100_000)
    count = counter.count
    return min(timeit.repeat(lambda: count("Xb3kq_-9AAAAAAAAAAAAAA"), number=100_000, repeat=20)) / 100_000 * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", type=Path, help="a checkout of the commit before view counts")
    args = arguments(parser)
    print(f"ViewCounter.count: {count_cost():.0f} ns per call", flush=True)
    servers: Servers = {"off": (REPO, {"IMGSVC_VIEWS": "false"}), "on": (REPO, {})}
    if args.before:
        servers = {"before": (args.before, {}), **servers}
    runs = compare(servers, args.rounds, args.hit_seconds, args.connections)
    table(runs, "off", "on", args.connections)
    if args.before:
        table(runs, "before", "on", args.connections)


if __name__ == "__main__":
    main()
