"""LRU hits (H1 of compare.py) of two source trees in one run: `--before` against this working tree.

Both servers run at once with compare.py's H1 settings; each round measures both, in alternating order.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
from harness import REPO, free_port, kill, launch
from peers import measure
from peers.servers import upload
from peers.workloads import HIT

ENV = {"IMGSVC_LOG_LEVEL": "warning", "IMGSVC_UNSIGNED_WIDTHS": "*", "IMGSVC_UPLOAD_RATE": "0"}


def start(tree: Path, tmp: Path, name: str):  # type: ignore[no-untyped-def]
    """(proc, hit URL) of `python -m imgsvc serve` importing imgsvc from `tree`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**ENV, "IMGSVC_PORT": str(port), "IMGSVC_DATA_DIR": str(tmp / name), "PYTHONPATH": str(tree)}
    proc, _ = launch([sys.executable, "-m", "imgsvc", "serve"], env, f"{url}/readyz", tmp / f"{name}.log", cwd=tree)
    image_id = upload(url, REPO / "tests" / "images" / HIT.file)
    hit = url + HIT.path(f"/img/{image_id}?w={{w}}&h={{h}}&fmt={{fmt}}&q={{q}}")
    httpx.get(hit, timeout=60).raise_for_status()
    return proc, hit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", type=Path, required=True, help="a checkout of the commit to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hit-seconds", type=float, default=5)
    parser.add_argument("--connections", type=lambda s: [int(c) for c in s.split(",")], default=[8, 32])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        servers = {}
        try:
            for name, tree in (("before", args.before.resolve()), ("after", REPO)):
                servers[name] = start(tree, Path(tmp), name)
            for proc, hit in servers.values():
                measure.wrk(hit, 8, 2, None, [proc.pid])  # warm-up
            runs: dict[tuple[str, int], list[measure.Run]] = {}
            for rnd in range(args.rounds):
                order = ["before", "after"] if rnd % 2 == 0 else ["after", "before"]
                for c in args.connections:
                    for name in order:
                        proc, hit = servers[name]
                        run = measure.wrk(hit, c, args.hit_seconds, None, [proc.pid])
                        runs.setdefault((name, c), []).append(run)
                        print(
                            f"round {rnd + 1} c={c} {name}: {run.rps:,.0f} req/s, {run.cpu_ms * 1000:.1f} µs/req,"
                            f" errors {run.errors}, others {run.others:.2f} cores",
                            flush=True,
                        )
        finally:
            for proc, _ in servers.values():
                kill(proc)
    print("| c | req/s before / after | after ÷ before req/s | CPU µs/req before / after | after ÷ before CPU/req |")
    print("|---|---|---|---|---|")
    for c in args.connections:
        before, after = runs["before", c], runs["after", c]
        rps = statistics.median(a.rps / b.rps for a, b in zip(after, before, strict=True))
        cpu = statistics.median(a.cpu_ms / b.cpu_ms for a, b in zip(after, before, strict=True))
        print(
            f"| {c} | {statistics.median(r.rps for r in before):,.0f} / {statistics.median(r.rps for r in after):,.0f}"
            f" | ×{rps:.3f} | {statistics.median(r.cpu_ms for r in before) * 1000:.1f} /"
            f" {statistics.median(r.cpu_ms for r in after) * 1000:.1f} | ×{cpu:.3f} |"
        )
    print("ratios: medians of the per-round ratios (both servers measured in each round, order alternating)")


if __name__ == "__main__":
    main()
