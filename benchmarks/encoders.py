"""The encoder frontier: CPU ms, bytes and SSIM of each encoder setting libvips exposes, per format and output
width, over a corpus of distinct originals. Writes results/encoders.md.
Run: `cd benchmarks && ../.venv/bin/python encoders.py [--originals 30] [--widths 64,128,256,640,1080,1920]`.

The corpus (`corpus()`, also used by settle.py) is generated deterministically from the sample images in tests/images:
crops at seeded positions and scales, flipped or turned, 1600-4000 px, saved as JPEG q90 (a few PNG with
alpha), under benchmarks/out/corpus (not committed). CPU is `time.process_time` around one encode (every
libvips and codec thread counted) of the finished pixels of `thumbnail`; SSIM of the decoded output against
those pixels (Wang et al. 2004, luma on white, as in peers/measure.py).
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyvips

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent / "tests" / "images"  # copies of the shared sample images
CORPUS = HERE / "out" / "corpus"
RESULTS = HERE / "results" / "encoders.md"
WIDTHS = (64, 128, 256, 640, 1080, 1920)
_SOURCES = ("photo-4000x3000.jpg", "2569067123_aca715a2ee_o.jpg", "alpha-premultiply-2048x1536-paper.png")


@dataclass(frozen=True)
class Setting:
    fmt: str
    label: str
    options: tuple[tuple[str, object], ...]
    max_width: int = 10_000  # the slowest settings are measured on small outputs only

    def encode(self, image: pyvips.Image, quality: int) -> bytes:
        save = {"jpeg": image.jpegsave_buffer, "webp": image.webpsave_buffer, "png": image.pngsave_buffer}
        if self.fmt == "avif":
            return image.heifsave_buffer(Q=quality, compression="av1", keep="none", **dict(self.options))
        if self.fmt == "png":
            return image.pngsave_buffer(keep="none", **dict(self.options))
        return save[self.fmt](Q=quality, keep="none", **dict(self.options))


def _s(fmt: str, label: str, max_width: int = 10_000, **options: object) -> Setting:
    return Setting(fmt, label, tuple(options.items()), max_width)


MOZ = {"trellis_quant": True, "overshoot_deringing": True, "optimize_scans": True}
SETTINGS = [
    _s("jpeg", "baseline"),
    _s("jpeg", "optimize_coding", optimize_coding=True),
    _s("jpeg", "optimize_coding, 4:4:4", optimize_coding=True, subsample_mode="off"),
    _s("jpeg", "trellis+deringing+scans", optimize_coding=True, **MOZ),
    _s("jpeg", "trellis+deringing+scans, quant_table 3", optimize_coding=True, quant_table=3, **MOZ),
    _s("jpeg", "trellis+deringing (no scans)", optimize_coding=True, trellis_quant=True, overshoot_deringing=True),
    *[_s("webp", f"effort {e}", effort=e) for e in (0, 1, 2, 3, 4, 5, 6)],
    _s("webp", "effort 4, smart_subsample", effort=4, smart_subsample=True),
    _s("webp", "effort 4, preset photo", effort=4, preset="photo"),
    _s("webp", "effort 2, preset photo", effort=2, preset="photo"),
    *[_s("avif", f"effort {e}", 1920 if e < 4 else 640, effort=e) for e in (0, 1, 2, 3, 4)],
    _s("avif", "effort 2, 10 bit", effort=2, bitdepth=10),
    _s("avif", "effort 3, 10 bit", effort=3, bitdepth=10),
    *[_s("png", f"compression {c}", compression=c) for c in (1, 3, 6, 9)],
]
QUALITY = {"jpeg": 80, "webp": 80, "avif": 50, "png": 0}


def corpus(count: int) -> list[Path]:
    """`count` distinct originals, made once (deterministic: the same files on every machine)."""
    CORPUS.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        alpha = i % 10 == 9
        name = _SOURCES[2] if alpha else _SOURCES[i % 2]
        path = CORPUS / f"o{i:02d}.{'png' if alpha else 'jpg'}"
        paths.append(path)
        if path.exists():
            continue
        rng = random.Random(i)
        source = pyvips.Image.new_from_file(str(SHARED / name))
        if name == _SOURCES[0] and i % 4 == 0:  # some 4000 px wide
            image = source
        else:
            longest = min(max(source.width, source.height), rng.randint(1600, 4000))
            scale = rng.choice((1.0, 1.0, 0.85, 0.7)) if longest / max(source.width, source.height) > 0.7 else 1.0
            image = source.resize(scale) if scale < 1 else source
            w = min(image.width, longest)
            h = min(image.height, max(1200, int(w * rng.uniform(0.6, 1.0))))
            image = image.crop(rng.randint(0, image.width - w), rng.randint(0, image.height - h), w, h)
        image = [image, image.fliphor(), image.rot90(), image.flipver().fliphor()][i % 4]
        if alpha:
            image.pngsave(str(path), compression=6)
        else:
            image.jpegsave(str(path), Q=90, keep="none")
    return paths


def ssim(data: bytes, truth: pyvips.Image) -> float:
    """SSIM of the decoded `data` against `truth` (both flattened on white, Rec.601 luma, sigma 1.5)."""
    out = pyvips.Image.new_from_buffer(data, "")

    def luma(image: pyvips.Image) -> pyvips.Image:
        if image.interpretation in ("rgb16", "grey16"):  # a 10-bit AVIF decodes to 16 bits
            image = image.colourspace("srgb" if image.interpretation == "rgb16" else "b-w")
        if image.hasalpha():
            image = image.flatten(background=[255] * (image.bands - 1))
        if image.bands == 1:
            return image.cast("float")
        return (image[0] * 0.299 + image[1] * 0.587 + image[2] * 0.114).cast("float")

    def blur(image: pyvips.Image) -> pyvips.Image:
        return image.gaussblur(1.5, precision="float", min_ampl=0.001)

    x, y = luma(out), luma(truth)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    return float((((mx * my * 2 + c1) * (cxy * 2 + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))).avg())


@dataclass
class Cell:
    ms: list[float]
    size: list[int]
    ssim: list[float]


def measure(paths: list[Path], widths: tuple[int, ...]) -> dict[tuple[str, str, int], Cell]:
    cells: dict[tuple[str, str, int], Cell] = {}
    for n, path in enumerate(paths):
        for width in widths:
            pixels = pyvips.Image.thumbnail(str(path), width).copy_memory()
            for s in SETTINGS:
                if width > s.max_width or (s.fmt == "png" and not pixels.hasalpha() and width > 640):
                    continue
                began = time.process_time()
                data = s.encode(pixels, QUALITY[s.fmt])
                ms = (time.process_time() - began) * 1000
                cell = cells.setdefault((s.fmt, s.label, width), Cell([], [], []))
                cell.ms.append(ms)
                cell.size.append(len(data))
                cell.ssim.append(ssim(data, pixels))
        print(f"{n + 1}/{len(paths)} {path.name}", file=sys.stderr, flush=True)
    return cells


BASELINE = {"jpeg": "optimize_coding", "webp": "effort 4", "avif": "effort 2", "png": "compression 6"}


def report(cells: dict[tuple[str, str, int], Cell], paths: list[Path], widths: tuple[int, ...], load: str) -> str:
    lines = [
        "# Encoder frontier: CPU, bytes and SSIM per format, setting and output width",
        "",
        f"Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC by `benchmarks/encoders.py`, libvips "
        f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}, {len(paths)} originals of the generated corpus "
        f"(1600-4000 px; every 10th a PNG with alpha), every original resized once per width (`thumbnail`), then "
        "each setting encodes those pixels. CPU: mean ms of `process_time` per encode (all threads, "
        f"VIPS_CONCURRENCY=1); bytes: sum over the corpus vs the current default (in bold); SSIM: mean, against the "
        f"unencoded pixels. Q: JPEG 80, WebP 80, AVIF 50. Machine: 2 cores shared with other jobs ({load}); CPU "
        "time is less sensitive to that load than wall time.",
        "",
    ]
    for fmt in ("webp", "avif", "jpeg", "png"):
        labels = [s.label for s in SETTINGS if s.fmt == fmt]
        lines += [f"## {fmt}", "", "| setting | " + " | ".join(f"{w} px" for w in widths) + " |",
                  "|---|" + "---|" * len(widths)]  # fmt: skip
        for label in labels:
            row = [f"**{label}**" if label == BASELINE[fmt] else label]
            for w in widths:
                cell, base = cells.get((fmt, label, w)), cells.get((fmt, BASELINE[fmt], w))
                if cell is None or base is None:
                    row.append("")
                    continue
                delta = sum(cell.size) / sum(base.size) - 1
                row.append(
                    f"{statistics.mean(cell.ms):.1f} ms, {sum(cell.size) / len(cell.size) / 1024:.1f} KiB "
                    f"({delta:+.1%}), {statistics.mean(cell.ssim):.4f}"
                )
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--originals", type=int, default=30)
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    args = parser.parse_args()
    pyvips.vips_lib.vips_concurrency_set(1)  # one libvips thread (codecs' own threads still count in CPU time)
    widths = tuple(int(w) for w in args.widths.split(","))
    paths = corpus(args.originals)
    before = os.getloadavg()[0]
    cells = measure(paths, widths)
    load = f"load average {before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    RESULTS.write_text(report(cells, paths, widths, load) + "\n" + _NOTES)
    print(RESULTS.read_text())


_NOTES = """
Reading the tables: PNG is measured on every original up to 640 px and on the PNG originals with alpha only above
(so its 1080/1920 px columns are another, smaller set). JPEG's SSIM is low for all its settings alike because
the alpha originals are flattened against black by the encoder and against white by the SSIM: compare its rows
with each other only. The choices and their reasons are in the README, Decisions, *Encoders*.
## Earlier figures (one original, 4000×3000 → 640 px)

The first choice of settings (WebP effort 4, AVIF effort 2, JPEG optimize_coding, PNG compression 6) came from
one photo; the tables above replace it with the corpus. AVIF 640 px from that photo, CPU time: effort 1/2/3/4
use 85/113/222/923 ms for 27,642/27,800/26,877/26,834 B, SSIM 0.910/0.914/0.918/0.920. GIF: libvips defaults,
525 ms at 640 px, quantisation dominates; left at the default.
"""

if __name__ == "__main__":
    main()
