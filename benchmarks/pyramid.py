"""The pyramid of reduced sources, measured: quality and bytes of renders from a level vs from the original over a
generated multi-original corpus, CPU per render saved, CPU and storage per upload, and the upload's p50.

    .venv/bin/python benchmarks/pyramid.py [--originals 40] [--uploads 15] [--skip-upload] [--baseline DIR]

--baseline DIR: also upload to a server run from DIR, a tree of the code before the pyramid
(`git archive <commit> | tar -x -C DIR`), interleaved with the others.

Prints markdown (benchmarks/results/pyramid.md). The corpus is made deterministically from tests/images (crops
at several aspect ratios, longest side 1600-4000 px, JPEG q88, every fifth EXIF-rotated) and not kept.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyvips

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import IMAGES, free_port, launch, print_table, start_imgsvc, stop
from imgsvc import pipeline, pyramid
from imgsvc.derivations import Source
from imgsvc.spec import SpecLimits, parse_query
from tests.similarity import ssim

SOURCES = ["photo-4000x3000.jpg", "2569067123_aca715a2ee_o.jpg", "alpha-premultiply-2048x1536-paper.png"]
ASPECTS = [(4, 3), (3, 4), (16, 9), (1, 1), (2, 3), (3, 2)]
THUMBNAILS = [64, 96, 128, 192, 256, 384]  # w=h, fit=cover: avatars and grids
SRCSET = [256, 384, 640, 828, 1080, 1920]  # w only
LIMITS = pipeline.PipelineLimits()


def corpus(count: int) -> list[bytes]:
    """`count` JPEG originals, longest side 1600..4000 px (never enlarged past the source), deterministic."""
    sources = [pyvips.Image.new_from_file(str(IMAGES / name), access="random") for name in SOURCES]
    sources = [s.flatten(background=[255, 255, 255]) if s.hasalpha() else s for s in sources]
    out = []
    for i in range(count):
        source = sources[i % len(sources)]
        aw, ah = ASPECTS[i % len(ASPECTS)]
        crop_w = min(source.width, source.height * aw // ah)
        crop_h = crop_w * ah // aw
        x, y = (source.width - crop_w) * (i % 5) // 4, (source.height - crop_h) * (i % 3) // 2
        image = source.crop(x, y, crop_w, crop_h)
        longest = min(1600 + i * 2400 // max(1, count - 1), max(crop_w, crop_h))
        image = image.resize(longest / max(crop_w, crop_h), kernel="lanczos3").cast("uchar")
        if i % 5 == 4:  # stored sideways with an EXIF orientation, as phones do
            image = image.rot270().copy()
            image.set_type(pyvips.GValue.gint_type, "orientation", 6)
        out.append(bytes(image.jpegsave_buffer(Q=88, keep="exif")))
    return out


def cpu(fn, *args):  # type: ignore[no-untyped-def]
    """(result, process CPU seconds: libvips' own threads included)."""
    began = time.process_time()
    result = fn(*args)
    return result, time.process_time() - began


@dataclass
class Case:
    label: str  # size group of the report
    query: str
    fmt: pipeline.OutputFormat


def cases() -> list[Case]:
    found = []
    for size in THUMBNAILS:
        for fmt in ("webp", "jpeg"):
            found.append(Case(f"thumb {size} {fmt}", f"w={size}&h={size}&fit=cover", fmt))  # type: ignore[arg-type]
    for width in SRCSET:
        for fmt in ("webp", "jpeg"):
            found.append(Case(f"srcset {width} {fmt}", f"w={width}", fmt))  # type: ignore[arg-type]
    return found


def quality(originals: list[bytes], scales: tuple[int, ...]) -> None:
    rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    derive_cpu, stored, original_bytes = [], 0, 0
    for data in originals:
        probe = pipeline.probe(data, LIMITS)
        source = Source("0" * 64, probe.format, probe.width, probe.height, len(data), 1, False)
        levels = pyramid.levels_for(source, scales)
        derived, seconds = cpu(pyramid.derive, data, levels, 60.0)
        derive_cpu.append(seconds)
        stored += sum(len(blob) for _, blob in derived.levels)
        original_bytes += len(data)
        blobs = {level.scale: blob for level, blob in derived.levels}
        for case in cases():
            spec = parse_query([tuple(p.split("=")) for p in case.query.split("&")], SpecLimits()).spec  # type: ignore[misc]
            level = pyramid.choose(levels, probe.width, probe.height, spec, case.fmt, False, LIMITS)
            row = rows[case.label]
            if level is None:
                row["original"].append(1)
                continue
            size = (probe.width, probe.height)
            base, base_cpu = cpu(pipeline.render, data, spec, case.fmt, LIMITS)
            fast, fast_cpu = cpu(pyramid.render_level, blobs[level.scale], level, spec, case.fmt, LIMITS, None, size)
            ideal = pipeline.render(data, spec, "png", LIMITS).data
            pixels = pyramid.render_level(blobs[level.scale], level, spec, "png", LIMITS, None, size).data
            row["pixel_ssim"].append(ssim(pixels, ideal))
            row["ssim_base"].append(ssim(base.data, ideal))
            row["ssim_level"].append(ssim(fast.data, ideal))
            row["bytes_base"].append(len(base.data))
            row["bytes_level"].append(len(fast.data))
            row["cpu_base"].append(base_cpu)
            row["cpu_level"].append(fast_cpu)
    print(f"\n### Scales {','.join(map(str, scales))}: {len(originals)} originals, "
          f"{original_bytes / 1e6:.1f} MB")  # fmt: skip
    print(f"\nStorage added: {stored / 1e6:.1f} MB = {stored / original_bytes:.1%} of the originals' bytes. "
          f"Derivation CPU per upload (levels + placeholder, process CPU): p50 "
          f"{statistics.median(derive_cpu) * 1000:.0f} ms, max {max(derive_cpu) * 1000:.0f} ms.")  # fmt: skip
    table = []
    for label, row in rows.items():
        n = len(row["pixel_ssim"])
        if not n:
            table.append((label, f"0/{len(row['original'])}", "-", "-", "-", "-", "-"))
            continue
        delta = [a - b for a, b in zip(row["ssim_level"], row["ssim_base"], strict=True)]
        ratios = [a / b - 1 for a, b in zip(row["bytes_level"], row["bytes_base"], strict=True)]
        table.append((
            label, f"{n}/{n + len(row['original'])}", f"{min(row['pixel_ssim']):.4f}",
            f"{statistics.mean(delta):+.4f} (min {min(delta):+.4f})",
            f"{sum(row['bytes_level']) / sum(row['bytes_base']) - 1:+.2%} (max abs {max(map(abs, ratios)):.2%})",
            f"{statistics.median(row['cpu_base']) * 1000:.1f} -> {statistics.median(row['cpu_level']) * 1000:.1f}",
            f"{statistics.median(row['cpu_base']) * 1000 - statistics.median(row['cpu_level']) * 1000:.1f}",
        ))  # fmt: skip
    header = ("output", "from a level", "pixel SSIM min", "output SSIM to ideal, level - original",
              "bytes, level vs original (total; worst)", "CPU ms p50, original -> level", "saved ms")  # fmt: skip
    print_table(header, table)


def start_baseline(tree: Path, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """imgsvc from another tree (the code before the pyramid), with this interpreter and its packages."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"IMGSVC_DATA_DIR": str(data_dir), "IMGSVC_PORT": str(port), "IMGSVC_LOG_LEVEL": "warning",
           "IMGSVC_RENDER_RATE": "0"}  # fmt: skip
    log = data_dir.parent / f"imgsvc-{port}.log"
    proc, _ = launch([sys.executable, "-m", "imgsvc", "serve"], env, f"{url}/readyz", log, cwd=tree, ok=201)
    return proc, url


def uploads(rounds: int, baseline: Path | None) -> None:
    """Upload p50 of distinct 12 MP JPEGs, one at a time, to a server deriving (the default) and one that does
    not (IMGSVC_DERIVE_WORKERS=0, IMGSVC_DERIVE_SCALES=none: today's path plus the queue row), interleaved."""
    base = pyvips.Image.new_from_file(str(IMAGES / SOURCES[0]), access="random")
    names = ["deriving", "not deriving"] + (["before the pyramid"] if baseline else [])
    bodies = []
    for i in range(rounds * len(names)):  # distinct bytes: a different 8x8 block each
        marked = base.draw_rect([i * 7 % 256, 255 - i * 5 % 256, 0], (i * 97) % 3992, (i * 53) % 2992, 8, 8, fill=True)
        bodies.append(bytes(marked.jpegsave_buffer(Q=90)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="imgsvc-pyramid-") as tmp:
        for name in ("on", "off", "before"):
            (Path(tmp) / name).mkdir()
        servers = {
            "deriving": start_imgsvc(Path(tmp) / "on" / "data"),
            "not deriving": start_imgsvc(Path(tmp) / "off" / "data", IMGSVC_DERIVE_WORKERS="0",
                                         IMGSVC_DERIVE_SCALES="none"),
        }  # fmt: skip
        if baseline is not None:
            servers["before the pyramid"] = start_baseline(baseline, Path(tmp) / "before" / "data")
        try:
            with httpx.Client(timeout=60) as client:
                for i in range(rounds):
                    for j, (name, (_, url)) in enumerate(servers.items()):
                        body = bodies[i * len(names) + j]
                        began = time.perf_counter()
                        response = client.post(f"{url}/images", content=body, headers={"Content-Type": "image/jpeg"})
                        samples[name].append(time.perf_counter() - began)
                        assert response.status_code == 201, response.text
                        time.sleep(0.5)  # about the derivation's time: the next upload meets a running one or not
        finally:
            for proc, _ in servers.values():
                stop(proc)
    print(f"\n### Upload of a 12 MP JPEG (4000x3000, ~{len(bodies[0]) / 1e6:.1f} MB, each distinct), {rounds} each, "
          "interleaved, one at a time, 0.5 s apart\n")  # fmt: skip
    for name, values in samples.items():
        print(f"- {name}: p50 {statistics.median(values) * 1000:.1f} ms, "
              f"p90 {statistics.quantiles(values, n=10)[-1] * 1000:.1f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--originals", type=int, default=40)
    parser.add_argument("--uploads", type=int, default=15)
    parser.add_argument("--skip-upload", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--baseline", type=Path, help="a tree of the code before the pyramid, for the upload p50")
    args = parser.parse_args()
    pipeline.configure_libvips()
    if not args.skip_quality:
        originals = corpus(args.originals)
        for scales in ((4, 8), (2, 4, 8)):
            quality(originals, scales)
    if not args.skip_upload:
        uploads(args.uploads, args.baseline)


if __name__ == "__main__":
    main()
