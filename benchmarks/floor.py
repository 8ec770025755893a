"""Know the floor: where a trace request's CPU goes (stages, in-process pyvips) and what it cannot go below.

For a sample of the traces' corpus (every 5th original, every request the traces make of it), CPU time of:
header, decode at the JPEG scale libvips' thumbnail picks (PNG in full), resize, colour, encode (WebP q80
at imgsvc's settings), imgsvc's whole in-process render, and imgsvc over HTTP (its process tree's CPU for
the same requests sent one at a time). The floor of a request: decode of the smallest usable source (the
largest JPEG scale still at least the output size) + the encode. Writes results/floor.md.
Run: `cd benchmarks && ../.venv/bin/python floor.py`.
"""

from __future__ import annotations

import datetime
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyvips
from harness import REPO
from peers import measure, servers
from peers.report import _table
from traces import urls
from traces.corpus import Original, build
from traces.traffic import Request, Trace, traces

sys.path.insert(0, str(REPO))
from imgsvc.geometry import Plan, jpeg_shrink
from imgsvc.pipeline import PipelineLimits, configure_libvips, encode, render
from imgsvc.spec import TransformSpec

RESULTS = Path(__file__).resolve().parent / "results" / "floor.md"
EVERY = 5  # sample every 5th original
LIMITS = PipelineLimits()


def cpu(fn: Callable[[], object]) -> tuple[float, object]:
    """(CPU ms of one call, libvips' own threads included, its result)."""
    began = time.process_time()
    out = fn()
    return (time.process_time() - began) * 1000, out


@dataclass(frozen=True)
class Cost:
    header: float
    decode: float
    scale: str  # "1/2", "full" (PNG)
    source_mp: float
    resize: float
    colour: float
    encode: float
    out_bytes: int
    render: float  # imgsvc's pipeline.render, in-process
    floor_decode: float
    floor_scale: str

    @property
    def floor(self) -> float:
        return self.floor_decode + self.encode


def output_size(original: Original, req: Request) -> tuple[int, int]:
    if req.height:
        return req.width, req.height
    return req.width, max(1, round(original.height * req.width / original.width))


def cost(original: Original, req: Request) -> Cost:
    data = original.path().read_bytes()
    out_w, out_h = output_size(original, req)
    jpeg = original.kind == "jpeg"
    if req.height:  # cover: the resize must cover the box
        factor = max(out_w / original.width, out_h / original.height)
        resized_size = (round(original.width * factor), round(original.height * factor))
    else:
        resized_size = (out_w, out_h)
    shrink = jpeg_shrink(original.width, original.height, Plan(resized_size, resized_size)) if jpeg else 1
    smallest = 1  # the largest DCT scale whose decode still covers the resized size
    for s in (8, 4, 2):
        if jpeg and original.width // s >= resized_size[0] and original.height // s >= resized_size[1]:
            smallest = s
            break

    def load(s: int) -> pyvips.Image:
        options = {"shrink": s} if s > 1 else {}
        return pyvips.Image.new_from_buffer(data, "", access="sequential", **options).copy_memory()

    header, _ = cpu(lambda: pyvips.Image.new_from_buffer(data, "", access="sequential").width)
    decode, decoded = cpu(lambda: load(shrink))
    floor_decode, _ = cpu(lambda: load(smallest)) if smallest != shrink else (decode, None)
    crop = {"height": out_h, "crop": "centre"} if req.height else {}
    resize, resized = cpu(lambda: pyvips.Image.thumbnail_image(decoded, out_w, **crop).copy_memory())
    colour, _ = cpu(lambda: resized.icc_transform("srgb", input_profile="srgb").copy_memory())
    encoding, out = cpu(lambda: encode(resized, "webp", req.quality, palette=False))
    spec = TransformSpec(width=req.width, height=req.height, fit="cover" if req.height else "inside")
    whole, _ = cpu(lambda: render(data, spec, "webp", LIMITS))
    scale = f"1/{shrink}" if jpeg else "full"
    return Cost(header, decode, scale, original.width * original.height / 1e6, resize, colour, encoding,
                len(out), whole, floor_decode, f"1/{smallest}" if jpeg else "full")  # fmt: skip


def over_http(corpus: list[Original], sample: dict[str, list[Request]]) -> dict[str, float]:
    """imgsvc's process-tree CPU ms per request, each trace's sampled requests sent one at a time."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = servers.start_imgsvc(
            Path(tmp),
            "floor",
            [o.path() for o in corpus],
            IMGSVC_UNSIGNED_EFFECTS="true",
            IMGSVC_WORKERS="1",
            IMGSVC_DECODED_CACHE_BYTES="0",
        )
        try:
            with httpx.Client(base_url=server.url, timeout=120) as http:
                for bust, (key, requests) in enumerate(sample.items(), 1):  # a new bust: every URL misses
                    measure.quiesce(server.pids)
                    began = measure.cpu_seconds(server.pids)
                    for req in requests:
                        http.get(urls.path(server, req, corpus[req.original], bust)).raise_for_status()
                    out[key] = (measure.cpu_seconds(server.pids) - began) * 1000 / len(requests)
        finally:
            server.stop()
    return out


def trace_rows(chosen: list[Trace], costs: dict[Request, Cost], http: dict[str, float]) -> list[list[str]]:
    rows = []
    for trace in chosen:
        picked = [costs[r] for r in dict.fromkeys(trace.requests) if r in costs]  # each distinct variant once

        def mean(field: str, picked: list[Cost] = picked) -> float:
            return statistics.fmean(getattr(c, field) for c in picked)

        stages = sum(mean(f) for f in ("header", "decode", "resize", "encode"))
        floor, served = mean("floor"), http[trace.key]
        rows.append([trace.key, str(len(picked)), *(f"{mean(f):.1f}" for f in ("header", "decode", "resize",
                     "colour", "encode")), f"{stages:.1f}", f"{mean('render'):.1f}", f"{served:.1f}",
                     f"{served - mean('render'):.1f}", f"{floor:.1f}", f"×{served / floor:.2f}"])  # fmt: skip
    return rows


def _mean(costs: list[Cost], value: Callable[[Cost], float]) -> float:
    return statistics.fmean(value(c) for c in costs)


def by_scale(costs: dict[Request, Cost]) -> list[list[str]]:
    groups: dict[str, list[Cost]] = defaultdict(list)
    for c in costs.values():
        groups[c.scale].append(c)
    rows = []
    for scale, cs in sorted(groups.items()):
        mp, decode = _mean(cs, lambda c: c.source_mp), _mean(cs, lambda c: c.decode)
        rows.append(
            [scale, str(len(cs)), f"{mp:.2f}", f"{decode:.1f}", f"{_mean(cs, lambda c: c.decode / c.source_mp):.1f}"]
        )
    return rows


def by_output(costs: dict[Request, Cost]) -> list[list[str]]:
    groups: dict[tuple[int, int], list[Cost]] = defaultdict(list)
    for req, c in costs.items():
        groups[req.width, req.height or 0].append(c)
    rows = []
    for (w, h), cs in sorted(groups.items()):
        fields = (lambda c: c.encode, lambda c: c.out_bytes, lambda c: c.resize, lambda c: c.floor, lambda c: c.render)
        encode, size, resize, floor, whole = (_mean(cs, f) for f in fields)
        name = f"{w}×{h} cover" if h else f"{w} wide"
        rows.append(
            [name, str(len(cs)), f"{encode:.1f}", f"{size:,.0f}", f"{resize:.1f}", f"{floor:.1f}", f"{whole:.1f}"]
        )
    return rows


def main() -> None:
    version = configure_libvips()
    corpus = build()
    chosen = traces(corpus)
    sampled = set(range(0, len(corpus), EVERY))
    sample = {t.key: list(dict.fromkeys(r for r in t.requests if r.original in sampled)) for t in chosen}
    costs: dict[Request, Cost] = {}
    for requests in sample.values():
        for req in requests:
            if req not in costs:
                costs[req] = cost(corpus[req.original], req)
    http = over_http(corpus, sample)
    header = ["trace", "variants", "header", "decode", "resize", "colour (sRGB ICC)", "encode", "stages",
              "imgsvc render in-process", "imgsvc over HTTP", "Python/HTTP", "floor", "HTTP ÷ floor"]  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    text = "\n".join(
        [
            "# The floor: CPU ms per request of each trace, by stage, against what it cannot go below",
            "",
            f"`cd benchmarks && ../.venv/bin/python floor.py`, {now:%Y-%m-%d %H:%M} UTC, libvips {version}, "
            "2 cores shared with other work (CPU time, so the load shows less than in req/s). "
            f"Every {EVERY}th original of the traces' corpus ({len(sampled)} of {len(corpus)}), each distinct variant "
            "a trace asks of it measured once (zipf's misses are srcset variants, so its row is bursts' per miss; its "
            "hits cost neither). In-process: one call at a time, `time.process_time` (libvips' threads included). "
            "Stages are separate calls on materialised images: header (open), decode (JPEG at the DCT scale "
            "imgsvc and libvips' thumbnail pick, leaving at least 2× for the resampler; PNG in full), resize "
            "(thumbnail_image of the decoded pixels, cover crops centred), colour (an sRGB→sRGB ICC transform of "
            "the output: what an embedded profile adds; the corpus has none, so imgsvc skips it), encode (WebP "
            "q80 at imgsvc's effort 4). imgsvc over HTTP: its process tree's CPU for the same requests sent one "
            "at a time to `imgsvc serve` (1 worker, decoded cache off, every URL new). Python/HTTP = over HTTP − "
            "in-process render. Floor = decode at the smallest usable scale (the largest DCT scale still covering "
            "the output) + the encode.",
            "",
            _table(header, trace_rows(chosen, costs, http)),
            "",
            "## Decode by scale",
            "",
            _table(["scale", "decodes", "source MP", "CPU ms", "ms per source MP"], by_scale(costs)),
            "",
            "## By output (WebP q80)",
            "",
            _table(
                ["output", "renders", "encode ms", "bytes", "resize ms", "floor ms", "imgsvc render ms"],
                by_output(costs),
            ),
            "",
        ]
    )
    print(text)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
