"""Start the servers on the corpus, check outputs on a sample, and run every trace against each, interleaved.

A run is one wrk process (measure.wrk: req/s, latency, CPU of the server's process tree per request, its
peak RSS). Rounds rotate the servers' order; each (round, trace, connections) cell sends every server the
same segment of the trace (an epoch-dependent offset) on fresh URLs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pyvips
from peers import measure, servers
from peers.servers import Server

from traces import urls
from traces.corpus import CACHE, Original
from traces.traffic import SRCSET, Request, Trace

SAMPLE_ORIGINALS = 10  # every 12th original
SAMPLE_WIDTHS = (256, 828, 1920)


@dataclass(frozen=True)
class Variant:
    """One server to start: imgsvc with settings over its defaults, or a peer."""

    name: str
    kind: str  # "imgsvc", "thumbor" or "ipx"
    env: tuple[tuple[str, str], ...] = ()


@dataclass
class Results:
    runs: dict[tuple[str, str, int], list[measure.Run]] = field(default_factory=dict)
    hits: dict[tuple[str, str, int], list[float]] = field(default_factory=dict)  # imgsvc's variant-LRU hit ratio
    sample: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # server -> (bytes, SSIM) per request
    problems: dict[str, str] = field(default_factory=dict)


def start(variant: Variant, tmp: Path, corpus: list[Original]) -> Server:
    if variant.kind == "thumbor":
        return servers.start_thumbor(tmp, CACHE)
    if variant.kind == "ipx":
        return servers.start_ipx(tmp, CACHE)
    slug = "".join(c if c.isalnum() else "-" for c in variant.name)
    env = {"IMGSVC_UNSIGNED_EFFECTS": "true", **dict(variant.env)}  # `bg`, the cache-busting value
    server = servers.start_imgsvc(tmp, slug, [o.path() for o in corpus], **env)
    server.name = variant.name
    return server


def _variant_counts(server: Server) -> tuple[float, float]:
    """(hits, misses) of imgsvc's variant LRU from /metrics."""
    counts = {"hit": 0.0, "miss": 0.0}
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith("imgsvc_cache_requests_total{") and 'tier="variant"' in line:
            for result in counts:
                if f'result="{result}"' in line:
                    counts[result] += float(line.rsplit(" ", 1)[1])
    return counts["hit"], counts["miss"]


def check(server: Server, traces: list[Trace], corpus: list[Original], results: Results) -> None:
    """The first requests of each trace answer 200 at the asked width; the SSIM sample's bytes and scores."""
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for trace in traces:
            for req in trace.requests[:3]:
                response = http.get(urls.path(server, req, corpus[req.original], 0))
                width = pyvips.Image.new_from_buffer(response.content, "").width if response.status_code == 200 else 0
                if width != req.width:
                    results.problems[server.name] = f"{trace.key}: HTTP {response.status_code}, width {width}"
                    return
        if server.ids:  # a new bust value must miss imgsvc's variant cache
            req = traces[0].requests[0]
            cache = http.get(urls.path(server, req, corpus[req.original], 1)).headers.get("x-cache")
            if cache != "miss":
                results.problems[server.name] = f"a new bust value was answered X-Cache: {cache}"
                return
        scores = []
        for req in sample(corpus):
            original = corpus[req.original]
            response = http.get(urls.path(server, req, original, 0))
            ok = response.status_code == 200
            scores.append((len(response.content), measure.ssim(response.content, original.path()) if ok else math.nan))
        results.sample[server.name] = scores


def sample(corpus: list[Original]) -> list[Request]:
    step = len(corpus) // SAMPLE_ORIGINALS
    return [
        Request(index, w)
        for index in range(0, len(corpus), step)
        for w in SAMPLE_WIDTHS
        if w in SRCSET and w <= corpus[index].width
    ]


def run_cell(
    server: Server,
    trace: Trace,
    corpus: list[Original],
    c: int,
    seconds: float,
    epoch: int,
    tmp: Path,
    results: Results,
) -> None:
    """One measured wrk run; a server that died is recorded and skipped from then on."""
    if server.name in results.problems:
        return
    script = tmp / f"{epoch}-{server.pids[0]}.lua"
    script.write_text(urls.lua_script(server, trace, corpus, epoch))
    before = _variant_counts(server) if server.ids else None
    run = measure.wrk(server.url, c, seconds, str(script), server.pids)
    if not server.alive():
        results.problems[server.name] = f"exited during {trace.key} c={c}"
        return
    results.runs.setdefault((server.name, trace.key, c), []).append(run)
    if before is not None:
        hits, misses = (after - was for after, was in zip(_variant_counts(server), before, strict=True))
        results.hits.setdefault((server.name, trace.key, c), []).append(hits / (hits + misses) if hits + misses else 0)
    print(
        f"  {trace.key} c={c} {server.name}: {run.rps:,.1f} req/s, {run.cpu_ms:.0f} ms CPU/req, {run.rss_mb:.0f} MB",
        flush=True,
    )
