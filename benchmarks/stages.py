"""Where each millisecond of a miss goes: W1-W5 split into header, decode, resize and encode, in-process,
one thread, CPU time; next to imgsvc's whole pipeline (decoding, and from its decoded-originals cache) and
the pyvips reference. Writes results/stages.md. Run: `cd benchmarks && ../.venv/bin/python stages.py`.
"""

from __future__ import annotations

import datetime
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyvips
from harness import REPO
from peers.reference import SUFFIX
from peers.workloads import WORKLOADS, Workload

sys.path.insert(0, str(REPO))
from imgsvc.cache import SharedByteLRU
from imgsvc.geometry import Plan, jpeg_shrink
from imgsvc.pipeline import DecodedSource, PipelineLimits, configure_libvips, decoded_bytes, encode, render
from imgsvc.spec import TransformSpec

RESULTS = Path(__file__).resolve().parent / "results" / "stages.md"
LIMITS = PipelineLimits()
RUNS = 15


def cpu_ms(fn: Callable[[], object]) -> float:
    """Median CPU time of `fn` in ms (libvips' own threads included), after one warm-up call."""
    fn()
    samples = []
    for _ in range(RUNS):
        began = time.process_time()
        fn()
        samples.append((time.process_time() - began) * 1000)
    return statistics.median(samples)


def stages(wl: Workload) -> list[str]:
    data = wl.source.read_bytes()
    target = (wl.width, wl.height(wl.width))
    shrink = jpeg_shrink(*wl.size, Plan(target, target)) if wl.file.endswith(".jpg") else 1
    options = {"shrink": shrink} if shrink > 1 else {}
    decoded = pyvips.Image.new_from_buffer(data, "", **options).copy_memory()
    resized = pyvips.Image.thumbnail_image(decoded, wl.width).copy_memory()
    spec = TransformSpec(width=wl.width)
    cache: SharedByteLRU[tuple[str, int], pyvips.Image] = SharedByteLRU(256 * 2**20, decoded_bytes)
    warm = DecodedSource(cache, wl.key)
    render(data, spec, wl.fmt, LIMITS, warm)  # type: ignore[arg-type]
    header = cpu_ms(lambda: pyvips.Image.new_from_buffer(data, "", access="sequential").width)
    decode = cpu_ms(lambda: pyvips.Image.new_from_buffer(data, "", **options).copy_memory())
    resize = cpu_ms(lambda: pyvips.Image.thumbnail_image(decoded, wl.width).copy_memory())
    encoding = cpu_ms(lambda: encode(resized, wl.fmt, wl.quality, palette=False))  # type: ignore[arg-type]
    cold = cpu_ms(lambda: render(data, spec, wl.fmt, LIMITS))  # type: ignore[arg-type]
    hot = cpu_ms(lambda: render(data, spec, wl.fmt, LIMITS, warm))  # type: ignore[arg-type]
    reference = cpu_ms(
        lambda: pyvips.Image.thumbnail_buffer(data, wl.width).write_to_buffer(SUFFIX[wl.fmt], Q=wl.quality)
    )
    scale = f"1/{shrink}" if wl.file.endswith(".jpg") else "full"
    return [
        wl.label,
        f"{header:.1f}",
        f"{decode:.1f} ({scale}, {decoded.width}×{decoded.height})",
        f"{resize:.1f}",
        f"{encoding:.1f}",
        f"{cold:.1f}",
        f"{hot:.1f}",
        f"{reference:.1f}",
        f"{decode / cold:.0%}",
    ]


def main() -> None:
    version = configure_libvips()
    rows = [stages(wl) for wl in WORKLOADS]
    header = [
        "workload",
        "header",
        "decode (scale, size)",
        "resize",
        "encode",
        "imgsvc render, decoding",
        "imgsvc render, decoded cache",
        "pyvips reference",
        "decode share",
    ]
    lines = [
        "# Where a miss goes: CPU ms per stage, in-process, one render at a time",
        "",
        f"`cd benchmarks && ../.venv/bin/python stages.py` (part of `make bench`), {datetime.date.today()}, "
        f"libvips {version}. Medians of {RUNS} runs of CPU time (`time.process_time`, so libvips' and the "
        "encoders' own threads count). Stages are separate calls, so they need not add up to the render "
        "exactly (the render streams decode into resize). The decode share is decode ÷ the imgsvc render "
        "that decodes: what the decoded-originals cache takes off a render of an original it has seen.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(row) + " |" for row in rows],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
