"""Fast first, best later (IMGSVC_ENCODE_SETTLE) against encoding at the settled setting at once: first-request
latency of distinct-URL misses, bytes served once settled, and the CPU of the whole imgsvc process tree per
variant (fast encode + settle). Writes results/settle.md.
Run: `cd benchmarks && ../.venv/bin/python settle.py [--originals 12] [--rounds 2] [--connections 2]`.

Each round starts a fresh imgsvc per mode (embedded Postgres), uploads the same originals of the encoders.py
corpus, then asks for every original x width x format once (distinct URLs, one shuffled order for every
mode), from `--connections` client threads. CPU is counted from the first request until every settle is done.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import random
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from encoders import corpus
from harness import start_imgsvc, stop

RESULTS = Path(__file__).resolve().parent / "results" / "settle.md"
WIDTHS = (640, 1080, 1920)
FORMATS = ("webp", "avif")
MODES = {"settled at once (today)": "false", "fast first, settled later": "true"}


@dataclass
class Run:
    latencies: list[float]
    first_bytes: int
    settled_bytes: int
    cpu_seconds: float
    requests: int
    settle_seconds: float  # from the last answer until every settle was done
    still_fast: int  # variants whose settle was dropped during the burst


def cpu(pid: int) -> float:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def settles(http: httpx.Client) -> dict[str, float]:
    found = re.findall(r'imgsvc_encode_settles_total\{outcome="(\w+)"\} ([\d.e+]+)', http.get("/metrics").text)
    return {outcome: float(value) for outcome, value in found}


def wait_for_settles(http: httpx.Client, setting: str) -> None:
    """Until every queued settle has run (bounded)."""
    began = time.monotonic()
    while setting == "true" and time.monotonic() - began < 600:
        counts = settles(http)
        if counts.get("settled", 0) + counts.get("failed", 0) >= counts.get("queued", 0):
            return
        time.sleep(0.2)


def one_round(paths: list[Path], setting: str, order: list[tuple[int, int, str]], connections: int) -> Run:
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_imgsvc(Path(tmp) / "data", IMGSVC_ENCODE_SETTLE=setting, IMGSVC_ACCESS_LOG="false")
        try:
            with httpx.Client(base_url=url, timeout=120) as http:
                ids = []
                for path in paths:
                    kind = "image/png" if path.suffix == ".png" else "image/jpeg"
                    response = http.post("/images", content=path.read_bytes(), headers={"Content-Type": kind})
                    ids.append(response.json()["id"])
                urls = [f"/img/{ids[i]}?w={w}&fmt={fmt}" for i, w, fmt in order]
                time.sleep(2)  # let upload work finish before CPU is counted
                began_cpu = cpu(proc.pid)

                def get(path: str) -> tuple[float, int]:
                    started = time.perf_counter()
                    response = http.get(path)
                    assert response.status_code == 200, response.text
                    return time.perf_counter() - started, len(response.content)

                with concurrent.futures.ThreadPoolExecutor(connections) as pool:
                    answers = list(pool.map(get, urls))
                answered = time.monotonic()
                wait_for_settles(http, setting)
                settle_seconds = time.monotonic() - answered if setting == "true" else 0.0
                # Settles dropped under the burst are offered again by the next request for their variant.
                still_fast = sum(1 for u in urls if "immutable" not in http.get(u).headers["cache-control"])
                wait_for_settles(http, setting)
                used = cpu(proc.pid) - began_cpu
                settled_bytes = sum(len(http.get(u).content) for u in urls)
                return Run([a[0] for a in answers], sum(a[1] for a in answers), settled_bytes, used, len(urls),
                           settle_seconds, still_fast)  # fmt: skip
        finally:
            stop(proc)


def pct(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100)[q - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--originals", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=2)
    args = parser.parse_args()
    paths = corpus(args.originals)
    order = [(i, w, fmt) for i in range(len(paths)) for w in WIDTHS for fmt in FORMATS]
    random.Random(16).shuffle(order)
    load = [os.getloadavg()[0]]
    runs: dict[str, list[Run]] = {mode: [] for mode in MODES}
    for n in range(args.rounds):
        for mode, setting in MODES.items():  # interleaved: the shared machine's load hits both alike
            runs[mode].append(one_round(paths, setting, order, args.connections))
            print(f"round {n + 1} {mode} done", flush=True)
    load.append(os.getloadavg()[0])
    lines = [
        "# Fast first, best later: first-request latency, bytes and CPU per variant",
        "",
        f"Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC by `benchmarks/settle.py`: {len(paths)} "
        f"originals of the encoders.py corpus x widths {', '.join(map(str, WIDTHS))} x {', '.join(FORMATS)} = "
        f"{len(order)} distinct URLs per run, each asked once, from {args.connections} client threads; a fresh "
        f"imgsvc per run (defaults, access log off); {args.rounds} interleaved rounds per mode, figures per round "
        f"separated by `/`. Machine: 2 cores shared with other jobs (load average {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end): latencies move with that load, CPU seconds much less.",
        "",
        "| mode | first answer p50 | p95 | bytes of first answers | bytes once settled | CPU per variant "
        "(fast + settle) | settled after the last answer | settles dropped in the burst, offered again |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, rounds in runs.items():

        def each(fmt: str, rounds: list[Run] = rounds) -> str:
            return " / ".join(fmt.format(r=r) for r in rounds)

        lines.append(
            f"| {mode} | {' / '.join(f'{pct(r.latencies, 50):.0f} ms' for r in rounds)} "
            f"| {' / '.join(f'{pct(r.latencies, 95):.0f} ms' for r in rounds)} "
            f"| {each('{r.first_bytes:,}')} | {each('{r.settled_bytes:,}')} "
            f"| {' / '.join(f'{r.cpu_seconds / r.requests * 1000:.0f} ms' for r in rounds)} "
            f"| {each('{r.settle_seconds:.1f} s')} | {each('{r.still_fast}')} |"
        )
    RESULTS.write_text("\n".join(lines) + "\n" + _NOTES)
    print(RESULTS.read_text())


_NOTES = """
CPU per variant: user+system seconds of the imgsvc process tree (psutil) from the first request until every
queued settle has run, after one more request per URL (which offers the dropped settles again), divided by the
distinct URLs. Settles dropped during the burst (their pixels over IMGSVC_ENCODE_SETTLE_BYTES, 64 MiB: seven
1920 px outputs) are rendered again from the original when offered again: part of the extra CPU (not separated here).
Bytes once settled: the same URLs asked again after settling. The settled bytes against the peers' settings
(WebP effort 4 = sharp's default; AVIF effort 3 = thumbor's speed 6, sharp's effort 4 0.5% smaller at 640 px)
are in results/encoders.md.
"""

if __name__ == "__main__":
    main()
