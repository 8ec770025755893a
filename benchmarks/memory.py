"""imgsvc's memory on the cold trace at 32 connections: the process tree's RSS over time, per settings variant.

Each variant is a fresh imgsvc with the corpus uploaded, then `--seconds` of the cold trace (every request a
distinct URL, so every one renders) while the RSS of the server process and of its children (isolation
children; the embedded Postgres runs detached, so it is not counted) is sampled every second. Writes results/memory.md.
Run: `cd benchmarks && ../.venv/bin/python memory.py [--seconds 300] [--variant 'name:IMGSVC_X=1,...']`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from peers import measure, servers
from peers.report import _table
from traces import urls
from traces.__main__ import parse_variant
from traces.corpus import build
from traces.run import Variant, start
from traces.traffic import traces

RESULTS = Path(__file__).resolve().parent / "results" / "memory.md"
CONNECTIONS = 32


@dataclass
class Series:
    """(seconds, server RSS, children RSS) every second while in use."""

    pid: int
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _sample(self) -> None:
        began = time.monotonic()
        while not self._stop.is_set():
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(self.pid)
                children = measure.rss_bytes([c.pid for c in root.children()])
                self.samples.append((time.monotonic() - began, root.memory_info().rss, children))
            self._stop.wait(1.0)

    def __enter__(self) -> Series:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure_variant(
    variant: Variant, seconds: float, tmp: Path, corpus: list, connections: int = CONNECTIONS
) -> tuple[Series, measure.Run, float]:
    """(RSS series, the wrk run, idle tree RSS in MiB after the uploads)."""
    server = start(variant, tmp, corpus)
    try:
        cold = next(t for t in traces(corpus) if t.key == "cold")
        script = tmp / f"{server.pids[0]}.lua"
        script.write_text(urls.lua_script(server, cold, corpus, 1))
        measure.quiesce(server.pids)
        idle = measure.rss_bytes(server.pids) / 2**20
        with Series(server.pids[0]) as series:
            run = measure.wrk(server.url, connections, seconds, str(script), server.pids)
        return series, run, idle
    finally:
        server.stop()


def rows(variant: Variant, series: Series, run: measure.Run, idle: float) -> list[str]:
    total = [(t, s + c) for t, s, c in series.samples]
    peak = max(v for _, v in total) / 2**20
    first = max((v for t, v in total if t < 60), default=0) / 2**20
    last = max((v for t, v in total if t >= total[-1][0] - 60), default=0) / 2**20
    server_peak = max(s for _, s, _ in series.samples) / 2**20
    children_peak = max(c for _, _, c in series.samples) / 2**20
    settings = ", ".join(f"{k}={v}" for k, v in variant.env) or "defaults"
    cpu = "–" if math.isnan(run.cpu_ms) else f"{run.cpu_ms:.0f}"
    return [variant.name, settings, f"{idle:.0f}", f"{peak:.0f}", f"{server_peak:.0f} + {children_peak:.0f}",
            f"{first:.0f} → {last:.0f}", f"{run.rps:.1f}", cpu, str(run.errors)]  # fmt: skip


def minutes(series: Series) -> str:
    out = []
    for minute in range(math.ceil(series.samples[-1][0] / 60)):
        window = [s + c for t, s, c in series.samples if minute * 60 <= t < (minute + 1) * 60]
        if window:
            out.append([f"{minute}–{minute + 1}", f"{min(window) / 2**20:.0f}", f"{max(window) / 2**20:.0f}"])
    return _table(["minute", "min RSS MiB", "max RSS MiB"], out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--variant", type=parse_variant, action="append", default=[], help="name:K=V,K=V")
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    variants = args.variant or [Variant("imgsvc", "imgsvc")]
    corpus = build()
    shutil.rmtree(servers.LOGS, ignore_errors=True)
    servers.LOGS.mkdir(parents=True)
    table, detail = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            series, run, idle = measure_variant(variant, args.seconds, Path(tmp), corpus, args.connections)
            table.append(rows(variant, series, run, idle))
            detail += [f"### {variant.name}", "", minutes(series), ""]
            print(" | ".join(table[-1]), flush=True)
    header = ["variant", "settings", "idle MiB", "peak MiB", "server + children peak", "first → last minute max",
              "req/s", "CPU ms/req", "errors"]  # fmt: skip
    text = "\n".join(
        [
            "# imgsvc's memory on the cold trace at 32 connections",
            "",
            f"`cd benchmarks && ../.venv/bin/python memory.py --seconds {args.seconds:g}"
            + "".join(f" --variant '{v.name}:{','.join(f'{k}={x}' for k, x in v.env)}'" for v in args.variant)
            + f"`, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; 2 cores shared with other work. "
            f"The traces' corpus (120 originals, 1600-3900 px), cold trace (every request a distinct URL, WebP q80 "
            f"srcset widths), `wrk -t2 -c{CONNECTIONS}`, {args.seconds:g} s per variant, one variant after "
            "the other, each a fresh `imgsvc serve` with the corpus uploaded. RSS of the server process and of "
            "its children (the embedded Postgres runs detached and is not counted), sampled every second; 'idle' "
            "after the uploads.",
            "",
            _table(header, table),
            "",
            *detail,
        ]
    )
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
