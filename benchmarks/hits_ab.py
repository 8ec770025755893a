"""LRU hits (H1 of compare.py) of imgsvc at its defaults (access log on), next to a bare Starlette endpoint
returning the same bytes, in one run; optionally the access log off, two processes, and `--before` (another tree).

Every server runs at once; each round measures each of them at each connection count, in rotating order.
Hits are the point here: every request asks for the one warmed URL.
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
from peers.servers import LOGS, start_fixed, upload
from peers.workloads import HIT

# The defaults, except what lets the benchmark upload and ask for W1's width: access log on, log level info.
ENV = {"IMGSVC_UNSIGNED_WIDTHS": "*", "IMGSVC_UPLOAD_RATE": "0"}
VARIANTS = {
    "imgsvc": {},
    "imgsvc access-log-off": {"IMGSVC_ACCESS_LOG": "false"},
    "imgsvc 2-processes": {"IMGSVC_PROCESSES": "2"},
}


def start(tree: Path, tmp: Path, name: str, env: dict[str, str]):  # type: ignore[no-untyped-def]
    """(proc, hit URL) of `python -m imgsvc serve` importing imgsvc from `tree`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    slug = "".join(c if c.isalnum() else "-" for c in name)
    env = {**ENV, **env, "IMGSVC_PORT": str(port), "IMGSVC_DATA_DIR": str(tmp / slug), "PYTHONPATH": str(tree)}
    proc, _ = launch([sys.executable, "-m", "imgsvc", "serve"], env, f"{url}/readyz", tmp / f"{slug}.log", cwd=tree)
    image_id = upload(url, REPO / "tests" / "images" / HIT.file)
    hit = url + HIT.path(f"/img/{image_id}?w={{w}}&h={{h}}&fmt={{fmt}}&q={{q}}")
    for _ in range(4):  # with several processes, warm each one's LRU (connections are spread by the kernel)
        httpx.get(hit, timeout=60).raise_for_status()
    return proc, hit


Servers = dict[str, tuple[Path, dict[str, str]]]  # name -> (source tree, extra IMGSVC_* variables)


def compare(
    servers: Servers, rounds: int, seconds: float, connections: list[int], with_bare: bool = False
) -> dict[tuple[str, int], list]:
    """Every server started at once; each round measures each at each connection count, the order rotating."""
    with tempfile.TemporaryDirectory() as tmp:
        started = {}
        try:
            for name, (tree, env) in servers.items():
                started[name] = start(tree.resolve(), Path(tmp), name, env)
            if with_bare:  # a bare Starlette endpoint returning the same bytes, measured first in each round
                body = httpx.get(next(iter(started.values()))[1], timeout=60).content
                LOGS.mkdir(parents=True, exist_ok=True)
                fixed = start_fixed(Path(tmp), body)
                started = {"bare": (fixed.proc, fixed.url + "/"), **started}
            for proc, hit in started.values():
                measure.wrk(hit, 8, 2, None, [proc.pid])  # warm-up
            runs: dict[tuple[str, int], list[measure.Run]] = {}
            names = list(started)
            for rnd in range(rounds):
                order = names[rnd % len(names) :] + names[: rnd % len(names)]
                for c in connections:
                    for name in order:
                        proc, hit = started[name]
                        run = measure.wrk(hit, c, seconds, None, [proc.pid])
                        runs.setdefault((name, c), []).append(run)
                        print(
                            f"round {rnd + 1} c={c} {name}: {run.rps:,.0f} req/s, {run.cpu_ms * 1000:.1f} µs/req,"
                            f" errors {run.errors}, others {run.others:.2f} cores",
                            flush=True,
                        )
        finally:
            for proc, _ in started.values():
                kill(proc)
    return runs


def table(runs: dict[tuple[str, int], list], before: str, after: str, connections: list[int]) -> None:
    print(f"| c | req/s {before} / {after} | {after} ÷ {before} req/s | CPU µs/req {before} / {after} "
          f"| {after} ÷ {before} CPU/req |")  # fmt: skip
    print("|---|---|---|---|---|")
    for c in connections:
        b, a = runs[before, c], runs[after, c]
        rps = statistics.median(x.rps / y.rps for x, y in zip(a, b, strict=True))
        cpu = statistics.median(x.cpu_ms / y.cpu_ms for x, y in zip(a, b, strict=True))
        print(
            f"| {c} | {statistics.median(r.rps for r in b):,.0f} / {statistics.median(r.rps for r in a):,.0f}"
            f" | ×{rps:.3f} | {statistics.median(r.cpu_ms for r in b) * 1000:.1f} /"
            f" {statistics.median(r.cpu_ms for r in a) * 1000:.1f} | ×{cpu:.3f} |"
        )
    print("ratios: medians of the per-round ratios (all servers measured in each round, order rotating)")


def arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hit-seconds", type=float, default=5)
    parser.add_argument("--connections", type=lambda s: [int(c) for c in s.split(",")], default=[8, 32])
    return parser.parse_args()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", type=Path, help="also a checkout of another commit, at its defaults")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    args = arguments(parser)
    servers: Servers = {v: (REPO, VARIANTS[v]) for v in args.variants.split(",") if v}
    if args.before:
        servers["before"] = (args.before, {})
    runs = compare(servers, args.rounds, args.hit_seconds, args.connections, with_bare=True)
    print("| server | c | req/s (median) | ÷ bare req/s | CPU µs/req | errors |")
    print("|---|---|---|---|---|---|")
    for c in args.connections:
        bare = runs["bare", c]
        for name in ["bare", *servers]:
            mine = runs[name, c]
            ratio = statistics.median(a.rps / b.rps for a, b in zip(mine, bare, strict=True))
            print(
                f"| {name} | {c} | {statistics.median(r.rps for r in mine):,.0f} | ×{ratio:.2f} |"
                f" {statistics.median(r.cpu_ms for r in mine) * 1000:.1f} | {sum(r.errors for r in mine)} |"
            )
    print("ratios: medians of the per-round ratios to the bare endpoint measured in the same round")


if __name__ == "__main__":
    main()
