"""results/peers.md: versions, date, exact commands, and the tables (medians over rounds, ratios per round)."""

from __future__ import annotations

import datetime
import math
import platform
import statistics
import subprocess
from pathlib import Path

import psutil
import pyvips
from harness import REPO

from peers import measure, servers
from peers.workloads import HIT, SPREAD, WORKLOADS, Workload

CEILING_OF = {
    "imgsvc LRU hits (H1)": "Starlette fixed bytes (ceiling)",
    "imgsvc behind nginx (H2 cache hits)": "nginx static file (ceiling)",
}


def _ms(p50: float, p99: float, digits: int = 0) -> str:
    return "–" if math.isnan(p50) else f"{p50:.{digits}f} / {p99:.{digits}f}"


def _cpu(runs: list[measure.Run], scale: float = 1.0) -> str:
    return " / ".join("–" if math.isnan(r.cpu_ms) else f"{r.cpu_ms * scale:.0f}" for r in runs)


def _others(found: dict) -> str:
    loads = [run.others for key, runs in found["runs"].items() if key[1] != "hits" for run in runs]
    loads += [ref["others"] for refs in found["reference"].values() for ref in refs]
    if not loads:
        return "–"
    return f"{statistics.median(loads):.2f} cores (max {max(loads):.2f})"


def _rps(value: float) -> str:
    return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def _ratio(runs: list[measure.Run], base: list[float]) -> str:
    """Median over rounds of this round's rate / the same round's base rate."""
    pairs = [run.rps / b for run, b in zip(runs, base, strict=False) if b]
    return f"×{statistics.median(pairs):.2f}" if pairs else "–"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def outputs_table(found: dict, renderers: list[servers.Server], workloads: list[Workload]) -> str:
    names = ["reference", *(s.name for s in renderers)]
    rows = []
    for wl in workloads:
        cells = []
        for name in names:
            size, score, problem = found["outputs"][wl.key].get(name, (0, math.nan, "not run"))
            cells.append(problem if problem else f"{size:,} B, SSIM {score:.4f}")
        rows.append([wl.label, *cells])
    return _table(["workload", *names], rows)


def _render_rows(found: dict, renderers: list[servers.Server], workloads: list[Workload], conns: list[int]) -> list:
    rows = []
    for wl in workloads:
        refs = found["reference"][wl.key]
        if refs:
            rate = statistics.median(r["rps"] for r in refs)
            p50, p99 = (statistics.median(r[k] for r in refs) for k in ("p50_ms", "p99_ms"))
            lat, cpu = f"{p50:.0f} / {p99:.0f}", f"{statistics.median(r['cpu_ms'] for r in refs):.0f}"
            rows.append(
                [
                    wl.key,
                    f"pyvips reference ({servers.CORES} threads)",
                    *[x for _ in conns for x in (_rps(rate), "×1.00", lat)],
                    "0",
                    cpu,
                    f"{max(r['rss_mb'] for r in refs):.0f}",
                    f"{max(r['others'] for r in refs):.2f}",
                ]
            )
        for server in renderers:
            runs = {c: found["runs"].get((server.name, wl.key, c), []) for c in conns}
            if not all(runs.values()):
                continue
            cells = []
            for c in conns:
                mid = measure.median_run(runs[c])
                ratio = _ratio(runs[c], [r["rps"] for r in refs])
                cells += [_rps(mid.rps), ratio, _ms(mid.p50_ms, mid.p99_ms)]
            merged = [measure.median_run(runs[c]) for c in conns]
            rows.append(
                [
                    wl.key,
                    server.name,
                    *cells,
                    str(sum(m.errors for m in merged)),
                    _cpu(merged),
                    f"{max(m.rss_mb for m in merged):.0f}",
                    f"{max(m.others for m in merged):.2f}",
                ]
            )
    return rows


def _hit_rows(found: dict, hits: list[servers.Server], conns: list[int]) -> list:
    rows = []
    for server in hits:
        runs = {c: found["runs"].get((server.name, "hits", c), []) for c in conns}
        if not all(runs.values()):
            continue
        ceiling = CEILING_OF.get(server.name)
        cells = []
        for c in conns:
            mid = measure.median_run(runs[c])
            base = [r.rps for r in found["runs"].get((ceiling, "hits", c), [])] if ceiling else []
            ratio = _ratio(runs[c], base) if ceiling else "ceiling"
            cells += [_rps(mid.rps), ratio, _ms(mid.p50_ms, mid.p99_ms, 2)]
        merged = [measure.median_run(runs[c]) for c in conns]
        rows.append(
            [
                server.name,
                *cells,
                str(sum(m.errors for m in merged)),
                _cpu(merged, 1000),
                f"{max(m.rss_mb for m in merged):.0f}",
            ]
        )
    return rows


def _per_round(runs: list[measure.Run], bases: list[list[measure.Run]]) -> list[float]:
    """Each round's rate ÷ the best of `bases` in the same round."""
    out = []
    for i, run in enumerate(runs):
        best = max((b[i].rps for b in bases if i < len(b)), default=0.0)
        if best:
            out.append(run.rps / best)
    return out


def _target_rows(found: dict, renderers: list[servers.Server], workloads: list[Workload], conns: list[int]) -> list:
    peers = [s.name for s in renderers if not s.name.startswith("imgsvc")]
    ours = [s.name for s in renderers if s.name.startswith("imgsvc")]
    rows = []
    for wl in workloads:
        refs = [r["rps"] for r in found["reference"][wl.key]]
        c8 = {name: found["runs"].get((name, wl.key, conns[0]), []) for name in peers}
        best_peer = max(c8, key=lambda n: measure.median_run(c8[n]).rps if c8[n] else 0.0, default=None)
        for name in ours:
            cells = []
            for c in conns:
                runs = found["runs"].get((name, wl.key, c), [])
                bases = [found["runs"].get((peer, wl.key, c), []) for peer in peers]
                ratios = _per_round(runs, bases)
                cells.append(f"×{statistics.median(ratios):.2f}" if ratios else "–")
                cells.append(_ratio(runs, refs))
            size, score, _ = found["outputs"][wl.key].get(name, (0, math.nan, ""))
            peer_size, peer_score, _ = (
                found["outputs"][wl.key].get(best_peer, (0, math.nan, "")) if best_peer else (0, 0, "")
            )
            versus = f"{size / peer_size - 1:+.1%} B, SSIM {score:.4f} vs {peer_score:.4f}" if peer_size else "–"
            rows.append([wl.key, name, *cells, f"{best_peer}: {versus}" if best_peer else "–"])
    return rows


def _tuned_ceiling(found: dict, conns: list[int]) -> str:
    h2, tuned = "imgsvc behind nginx (H2 cache hits)", servers.NGINX_STATIC_FILE_CACHE
    ratios = []
    for c in conns:
        runs, base = found["runs"].get((h2, "hits", c), []), found["runs"].get((tuned, "hits", c), [])
        ratios.append(f"{_ratio(runs, [r.rps for r in base])} at c={c}")
    return (
        "The shipped config keeps cache files open (`open_file_cache`); against a static server that does "
        f"the same, H2 is {' and '.join(ratios)}."
    )


def _soak(found: dict) -> list[str]:
    soak = found.get("soak")
    if not soak:
        return []
    samples, run, wl = soak["samples"], soak["run"], soak["workload"]
    rows = []
    for minute in range(math.ceil(soak["seconds"] / 60)):
        window = [rss for t, rss in samples if minute * 60 <= t < (minute + 1) * 60]
        if window:
            rows.append([f"{minute}–{minute + 1}", f"{min(window) / 2**20:.0f}", f"{max(window) / 2**20:.0f}"])
    first, last = (max(float(r[2]) for r in part) for part in (rows[:1], rows[-1:]))
    peak = max(rss for _, rss in samples) / 2**20
    return [
        "",
        f"## Memory: imgsvc under {wl.label} at 32 connections for {soak['seconds'] / 60:.1f} minutes",
        "",
        f"The `imgsvc` renderer above (defaults, variant LRU off so every request renders), its process tree "
        f"(imgsvc and its embedded Postgres) sampled every 5 s: **peak {peak:.0f} MiB**, highest sample of the "
        f"first minute {first:.0f} MiB, of the last {last:.0f} MiB ({last - first:+.0f} MiB); "
        f"{run.rps:,.1f} req/s, {run.errors} errors, {run.requests:,} requests.",
        "",
        _table(["minute", "RSS min MiB", "RSS max MiB"], rows),
    ]


def _versions(found: dict) -> list[str]:
    def tool(command: list[str]) -> str:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        return (done.stdout + done.stderr).strip().splitlines()[0] if done.returncode in (0, 1) else "?"

    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True, check=False
    ).stdout.strip()
    peers = found["versions"]
    libvips = ".".join(str(pyvips.version(i)) for i in range(3))
    lines = [
        f"- imgsvc: working tree at `{commit}`, pyvips {pyvips.__version__}, libvips {libvips} (pyvips-binary); "
        "the reference uses the same"
    ]
    for name, found_versions in peers.items():
        lines.append(
            f"- {name}: " + ", ".join(f"{k} {v}" for k, v in found_versions.items() if k != "error")
            if "error" not in found_versions
            else f"- {name}: not installed"
        )
    lines.append(f"- {tool(['nginx', '-v'])}; {tool(['wrk', '-v'])}; Python {platform.python_version()}")
    return lines


def markdown(found: dict, renderers: list, hits: list, workloads: list[Workload], args) -> str:  # type: ignore[no-untyped-def]
    conns = args.connections
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    today = datetime.date.today().isoformat()
    command = (
        f"cd benchmarks && ../.venv/bin/python compare.py --rounds {args.rounds} --seconds {args.seconds:g} "
        f"--hit-seconds {args.hit_seconds:g}"
        + (f" --workloads {args.workloads}" if args.workloads != ",".join(w.key for w in WORKLOADS) else "")
        + (f" --soak-seconds {args.soak_seconds:g}" if args.soak_seconds != 300 else "")
        + (f" --out results/{args.out.name}" if args.out.name != "peers.md" else "")
    )
    part_of_bench = " (part of `make bench`)" if args.out.name == "peers.md" else ""
    parts = [
        "# Peer benchmark: imgsvc vs thumbor, ipx and a plain pyvips reference",
        "",
        f"`{command}`{part_of_bench}, {today}, {servers.CORES} cores ({cpu}), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {found.get('minutes', 0):.0f} minutes. A shared, noisy "
        "machine, and wrk shares the cores with the servers: read the ratios (each to a figure measured in the same "
        "round) rather than absolute rates. `others` (renders): the most cores that anything but the measured "
        "server, wrk and the harness kept busy during any of a row's runs (steal included); over all render runs the "
        f"median was {_others(found)}. (During hit runs the kernel's loopback networking alone shows as ~1 core.)",
        "",
        "## Versions",
        *_versions(found),
        "",
        "## Commands",
        *[f"- {s.name}: `{s.command}`" + (f" ({s.note})" if s.note else "") for s in renderers + hits],
        f"- load: `{' '.join(measure.WRK)} -c{{{','.join(map(str, conns))}}} -d{args.seconds:g}s -s SCRIPT.lua URL`; "
        f"hits `-d{args.hit_seconds:g}s` on one warmed URL, no script",
        f"- render URLs (`w` cycles target−{SPREAD}..target+{SPREAD} per request, `b` a changing bust value, "
        "`h` = source height + b):",
        *[f"  - {s.name}: `{s.templates[workloads[0].key]}`" for s in renderers if workloads],
        "",
        "## Method",
        "- Every render request renders: imgsvc's variant LRU is off (`IMGSVC_CACHE_BYTES=0`; its originals LRU "
        "stays, as the peers read the file from local disk), thumbor has no storage and no result storage, ipx has "
        "no result cache. No request repeats one in flight (see `peers/workloads.py`); imgsvc's /metrics show "
        f"single-flight merged {found['merged'][0]:.0f} of {found['merged'][1]:.0f} variant misses during the load.",
        "- `imgsvc` runs its defaults, which keep decoded JPEG (per DCT scale) and PNG originals in an LRU "
        "(`IMGSVC_DECODED_CACHE_BYTES`, 128 MiB): every request still resizes, crops and encodes, but after the "
        "first request for a source and scale it does not decode the original again. That is real for a CDN "
        "origin (several sizes and formats of a new image are asked for within seconds), and it is the whole "
        f"point here, since a workload renders one source; `{servers.DECODE_EVERY_TIME}` "
        "(`IMGSVC_DECODED_CACHE_BYTES=0`) decodes for every request as the peers do, and is the row to compare "
        "pipelines with.",
        f"- {args.rounds} rounds; in each, per workload: the reference, then each renderer at each concurrency, the "
        f"server order rotating by round; {args.seconds:g} s per run (hits {args.hit_seconds:g} s) after a 3 s "
        "warm-up per server and workload before round 1. Before every run the server is left to finish "
        "queued work (its process tree under 5% of a core).",
        "- req/s, latency (p50 / p99, ms), CPU: medians over rounds; ×ref: median over rounds of "
        "(server req/s ÷ the reference's renders/s in the same round), at that concurrency. Errors: non-2xx and "
        "socket errors (wrk `--timeout 60s`), all rounds. CPU: user+system ms of the server's process tree per "
        "completed request (psutil). Peak RSS: the tree's summed RSS, sampled every 0.2 s, the maximum over all "
        "runs (thumbor's forked processes each count their shared pages).",
        f"- Reference: `peers/reference.py`, `pyvips.Image.thumbnail_buffer(src, w).write_to_buffer(ext, Q=q)`, "
        f"{servers.CORES} threads back to back in one process, no HTTP; its CPU is the process's CPU time per "
        "render and its RSS `ru_maxrss`. Its rate does not depend on the connection count.",
        "",
        "## Targets",
        "",
        "×best peer: median over rounds of (imgsvc req/s ÷ the faster of thumbor and ipx in the same round); "
        "×ref: the same against the pyvips reference. Bytes and SSIM: imgsvc's output against the peer with the "
        f"higher median rate at c={conns[0]} (table at the end). `{servers.DECODE_EVERY_TIME}` decodes the original "
        "for every request, as the peers do; `imgsvc` (the defaults) keeps decoded JPEG/PNG originals (see Method).",
        "",
        _table(
            [
                "wl",
                "server",
                *[h for c in conns for h in (f"×best peer c={c}", f"×ref c={c}")],
                "bytes / SSIM vs that peer",
            ],
            _target_rows(found, renderers, workloads, conns),
        ),
        "",
        "## Renders (every request renders)",
        "",
        _table(
            [
                "wl",
                "server",
                *[h for c in conns for h in (f"req/s c={c}", f"×ref c={c}", f"p50 / p99 ms c={c}")],
                "errors",
                "CPU ms/req " + " / ".join(f"c={c}" for c in conns),
                "peak RSS MB",
                "others",
            ],
            _render_rows(found, renderers, workloads, conns),
        ),
        "",
        f"## Hits ({HIT.label} variant, one warmed URL) and ceilings",
        "",
        "×ceiling: H1 ÷ Starlette fixed bytes, H2 ÷ nginx static file, per round. " + _tuned_ceiling(found, conns),
        "",
        _table(
            [
                "server",
                *[h for c in conns for h in (f"req/s c={c}", f"×ceiling c={c}", f"p50 / p99 ms c={c}")],
                "errors",
                "CPU µs/req " + " / ".join(f"c={c}" for c in conns),
                "peak RSS MB",
            ],
            _hit_rows(found, hits, conns),
        ),
        "",
        "## Output bytes and SSIM (one response at the target width)",
        "",
        "SSIM against a pyvips Lanczos3 resize of the same source to the output's size, both flattened on white, "
        "sRGB luma, Gaussian σ 1.5 windows, computed with pyvips arithmetic (`peers/measure.py`; numpy is not in "
        "imgsvc's venv).",
        "",
        outputs_table(found, renderers, workloads),
        "",
        "## Start-up (seconds from spawn to the first answer)",
        "",
        _table(["server", "start-up s"], [[s.name, f"{s.startup:.2f}"] for s in renderers + hits]),
        "",
        "imgsvc's includes starting its embedded Postgres in a fresh data directory; nginx H2's is nginx alone.",
        "",
        "## Notes",
        "",
        "- Encoders run with each server's defaults but the quality. WebP: effort/method 4 everywhere. AVIF (W5): "
        "the reference uses pyvips `heifsave` defaults (effort 4, 4:2:0), imgsvc effort 2 (libaom speed 7), "
        "ipx sharp's defaults (effort 4, 4:4:4 chroma), thumbor Pillow's libavif speed 6; so W5 mostly compares "
        "encoder settings, and the quality scales of libheif and Pillow differ (compare bytes and SSIM). "
        "JPEG (W2): ipx asks sharp for progressive output; thumbor decodes JPEGs with Pillow `draft` (DCT "
        "scaling) before its Lanczos resize.",
        "- ×ref above 1 is possible: the reference keeps exactly one render per core in flight and JPEG/PNG "
        "decoding is mostly single-threaded, so it can leave CPU idle that a server with more renders in flight uses.",
        "- imgsvc's process tree includes its embedded Postgres; H2's tree is nginx plus that imgsvc. Latency "
        "percentiles are wrk's, of completed requests only (at c=32, W5 completes few requests per run).",
    ]
    parts += _soak(found)
    if found["failures"]:
        parts += ["", "## Not measured", "", *[f"- {name}: {why}" for name, why in found["failures"].items()]]
    return "\n".join(parts) + "\n"
