"""results/traces.md: conditions, one table per trace (medians over rounds, ratios per round), the output sample."""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics

import psutil
import pyvips
from peers import measure
from peers.report import _per_round, _table

from traces.corpus import Original
from traces.run import Results, Variant
from traces.traffic import Trace, hit_ceiling

PEERS = ("thumbor", "ipx")


def _median(values: list[float]) -> float:
    known = [v for v in values if not math.isnan(v)]
    return statistics.median(known) if known else math.nan


def ratio_to_best_peer(results: Results, name: str, trace: str, c: int) -> float:
    """Median over rounds of this server's req/s ÷ the faster peer's in the same round."""
    bases = [results.runs.get((peer, trace, c), []) for peer in PEERS]
    return _median(_per_round(results.runs.get((name, trace, c), []), [b for b in bases if b]))


def cpu_ratio(results: Results, name: str, trace: str, c: int) -> float:
    """The leaner peer's median CPU ms per request ÷ this server's: above 1, fewer CPU ms per request."""
    peers = [measure.median_run(runs).cpu_ms for p in PEERS if (runs := results.runs.get((p, trace, c)))]
    ours = results.runs.get((name, trace, c))
    return min(peers) / measure.median_run(ours).cpu_ms if peers and ours else math.nan


def _x(value: float) -> str:
    return "–" if math.isnan(value) else f"×{value:.2f}"


def _trace_table(results: Results, variants: list[Variant], trace: Trace, conns: list[int]) -> str:
    header = ["server"]
    for c in conns:
        header += [f"c={c} req/s", "vs best peer", "CPU ms/req", "CPU vs leanest peer", "p50 / p99 ms"]
    header += ["peak RSS MiB", "errors"]
    if trace.repeats:
        header.insert(1, "LRU hit ratio")
    rows = []
    for variant in variants:
        runs = {c: results.runs.get((variant.name, trace.key, c), []) for c in conns}
        if not all(runs.values()):
            continue
        cells = [variant.name]
        if trace.repeats:
            ratios = [h for c in conns for h in results.hits.get((variant.name, trace.key, c), [])]
            cells.append(f"{_median(ratios):.0%}" if ratios else "none (no cache)")
        merged = {c: measure.median_run(runs[c]) for c in conns}
        for c in conns:
            ratio = ratio_to_best_peer(results, variant.name, trace.key, c)
            m = merged[c]
            cells += [f"{m.rps:.1f}", _x(ratio), f"{m.cpu_ms:.0f}", _x(cpu_ratio(results, variant.name, trace.key, c)),
                      f"{m.p50_ms:.0f} / {m.p99_ms:.0f}"]  # fmt: skip
        cells += [f"{max(m.rss_mb for m in merged.values()):.0f}", str(sum(m.errors for m in merged.values()))]
        rows.append(cells)
    return _table(header, rows)


def _sample_table(results: Results, variants: list[Variant]) -> str:
    rows = []
    names = [v.name for v in variants if v.name in results.sample]
    for name in names:
        scores = results.sample[name]
        total = sum(size for size, _ in scores)
        versus = []
        for peer in PEERS:
            if peer in results.sample and peer != name:
                versus.append(f"{total / sum(s for s, _ in results.sample[peer]) - 1:+.1%} vs {peer}")
        rows.append([name, f"{total:,}", f"{_median([s for _, s in scores]):.4f}", ", ".join(versus) or "–"])
    return _table(["server", "bytes (sum)", "SSIM (median)", "bytes vs peer"], rows)


def _others(results: Results) -> str:
    loads = [run.others for runs in results.runs.values() for run in runs]
    return f"{statistics.median(loads):.2f} cores (max {max(loads):.2f})" if loads else "–"


def markdown(
    results: Results,
    variants: list[Variant],
    traces: list[Trace],
    corpus: list[Original],
    versions: dict,
    args: argparse.Namespace,
    minutes: float,
) -> str:
    conns = args.connections
    kinds = {k: sum(o.kind == k for o in corpus) for k in ("jpeg", "png")}
    sides = sorted(max(o.width, o.height) for o in corpus)
    peers = "; ".join(f"{name} " + ", ".join(f"{k} {v}" for k, v in found.items()) for name, found in versions.items())
    lines = [
        "# Origin traffic: traces over 120 originals, imgsvc against thumbor and ipx",
        "",
        f"`cd benchmarks && ../.venv/bin/python -m traces --rounds {args.rounds} --seconds {args.seconds:g}"
        f" --connections {','.join(map(str, conns))} --traces {args.traces}"
        + "".join(f" --imgsvc '{v.name}:{','.join(f'{k}={x}' for k, x in v.env)}'" for v in args.imgsvc)
        + f"`; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {minutes:.0f} min.",
        "",
        f"Machine: {psutil.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, shared: other work used a median of {_others(results)} "
        f"during the runs (machine CPU minus the server, wrk and the harness). libvips {pyvips.version(0)}."
        f"{pyvips.version(1)}.{pyvips.version(2)} (imgsvc); {peers or 'peers not run'}.",
        "",
        f"Corpus: {len(corpus)} originals derived from the shared seed photos (seeded crops, quarter turns, "
        f"scales, colour gains, re-encodes; `python -m traces.corpus`), {kinds['jpeg']} JPEG (20% progressive) "
        f"and {kinds['png']} PNG, longest side {sides[0]}-{sides[-1]} px. Outputs WebP q80. Every server reads "
        "the same files: thumbor (file loader, no storage, no result storage, one process per core) and ipx "
        "from the corpus directory, imgsvc from its own store after an upload of each.",
        "",
        f"Load: `wrk -t2 -c{{{','.join(map(str, conns))}}} -d{args.seconds:g}s` with a Lua script walking the "
        f"trace; {args.rounds} rounds, servers interleaved (order rotated each round); medians over rounds; "
        "'vs best peer' is the median over rounds of req/s ÷ the faster of thumbor and ipx in the same round; "
        "'CPU vs leanest peer' is the lower of the peers' CPU ms per request ÷ this server's (above ×1: less CPU "
        "per request, i.e. more requests per core; on a shared machine steadier than req/s). "
        "Each (round, trace, connections) cell sends every server the same segment of the trace on fresh URLs. "
        "CPU: user+system seconds of the server's whole process tree (thumbor's forks included; imgsvc's "
        "embedded Postgres runs detached and is not counted) per completed request, requests still in "
        "flight when wrk stops included (an over-estimate of up to a few renders per run). Peak RSS: the "
        "tree's, sampled every 0.2 s.",
        "",
    ]
    for trace in traces:
        distinct = len(set(trace.requests))
        about = (
            f"{len(trace.requests):,} requests over {distinct} variants; an unbounded cache would hit "
            f"{hit_ceiling(trace):.0%} of the whole list (a run covers its first part only)"
            if trace.repeats
            else f"{distinct} distinct variants; every request a distinct URL (a new bust value when the list wraps)"
        )
        lines += [f"## {trace.label}", "", about + ".", "", _trace_table(results, variants, trace, conns), ""]
    lines += [
        "## Outputs on a sample",
        "",
        f"{len(next(iter(results.sample.values()), []))} srcset requests (every 12th original at 256, 828 and "
        "1920 px where it is that wide): bytes summed, and SSIM against a Lanczos3 resize of the original "
        "(luma on white, Gaussian windows; `peers/measure.py`).",
        "",
        _sample_table(results, variants),
        "",
    ]
    if results.problems:
        lines += ["## Problems", "", *[f"- {name}: {why}" for name, why in results.problems.items()], ""]
    return "\n".join(lines)
