"""The traces: which variants of which originals are asked for, in what order (deterministic).

- bursts: each original's srcset widths (256/384/640/828/1080/1920, up to its own width) WebP q80 arrive
  together, ~4 originals at a time, in a shuffled order inside each group;
- cold: the same requests fully shuffled;
- thumbnails: avatars and grid cells (64-256 px squares, cover, and 384 px wide) of every original, shuffled;
- zipf: srcset variants drawn with Zipf popularity (s = 1 over variants), so some repeat and hit caches.
Every request of bursts, cold and thumbnails is a distinct URL (a cache-busting value changes each time the
list wraps); zipf repeats variants on purpose, and each run starts on fresh URLs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from traces.corpus import Original

SRCSET = (256, 384, 640, 828, 1080, 1920)
THUMBS = ((64, 64), (96, 96), (128, 128), (192, 192), (256, 256), (384, None))  # (w, h): h set means cover
GROUP = 4  # originals whose bursts overlap
ZIPF_LENGTH = 40_000
ZIPF_S = 1.0


@dataclass(frozen=True)
class Request:
    original: int  # index into the corpus
    width: int
    height: int | None = None  # set: a cover crop to width×height
    fmt: Literal["webp", "jpeg"] = "webp"
    quality: int = 80


@dataclass(frozen=True)
class Trace:
    key: Literal["bursts", "cold", "thumbnails", "zipf"]
    label: str
    requests: tuple[Request, ...]
    repeats: bool = False  # variants repeat on purpose (zipf): the bust value stays fixed for the run


def _srcset(corpus: list[Original], index: int) -> list[Request]:
    return [Request(index, w) for w in SRCSET if w <= corpus[index].width]


def bursts(corpus: list[Original]) -> list[Request]:
    rng = random.Random(1)
    order, out = list(range(len(corpus))), []
    rng.shuffle(order)
    for start in range(0, len(order), GROUP):
        group = [r for index in order[start : start + GROUP] for r in _srcset(corpus, index)]
        rng.shuffle(group)
        out += group
    return out


def cold(corpus: list[Original]) -> list[Request]:
    out = bursts(corpus)
    random.Random(2).shuffle(out)
    return out


def thumbnails(corpus: list[Original]) -> list[Request]:
    out = [Request(index, w, h) for index in range(len(corpus)) for w, h in THUMBS]
    random.Random(3).shuffle(out)
    return out


def zipf(corpus: list[Original]) -> list[Request]:
    rng = random.Random(4)
    variants = [r for index in range(len(corpus)) for r in _srcset(corpus, index)]
    rng.shuffle(variants)  # rank -> variant
    weights = [1 / (rank + 1) ** ZIPF_S for rank in range(len(variants))]
    return rng.choices(variants, weights, k=ZIPF_LENGTH)


def traces(corpus: list[Original]) -> list[Trace]:
    return [
        Trace(
            "bursts", "bursts: each original's srcset widths together, ~4 originals at a time", tuple(bursts(corpus))
        ),
        Trace("cold", "cold: the same requests fully shuffled", tuple(cold(corpus))),
        Trace("thumbnails", "thumbnails: 64-256 px cover squares and 384 px wide, shuffled", tuple(thumbnails(corpus))),
        Trace("zipf", f"zipf: srcset variants by Zipf popularity (s={ZIPF_S:g})", tuple(zipf(corpus)), repeats=True),
    ]


def hit_ceiling(trace: Trace) -> float:
    """The share of requests of the whole list that repeat an earlier one (an unbounded cache's hit ratio)."""
    return 1 - len(set(trace.requests)) / len(trace.requests)
