"""Encoder settings per output format and size, in two efforts: `fast` (a first answer) and `settled` (the
final bytes). Chosen on the measured CPU/bytes/SSIM frontier: benchmarks/results/encoders.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyvips

from imgsvc.spec import OutputFormat

Effort = Literal["fast", "settled"]

# Outputs of at most this many pixels are encoded at the settled setting at once: their encode is a small part
# of the render (decoding dominates), so a second encode would cost more than the first one saves.
SMALL_PIXELS = 400 * 400


@dataclass(frozen=True, slots=True)
class Choice:
    """The settings of one encode: `final` when no later encode would make smaller bytes."""

    options: tuple[tuple[str, object], ...]
    final: bool


def _options(**options: object) -> tuple[tuple[str, object], ...]:
    return tuple(options.items())


_WEBP_SETTLED = _options(effort=4, smart_subsample=False)
_WEBP_FAST = _options(effort=2, smart_subsample=False)
_AVIF_SETTLED = _options(compression="av1", effort=2)
_AVIF_FAST = _options(compression="av1", effort=0)
_JPEG = _options(optimize_coding=True)
_PNG_COMPRESSION = 6


def may_settle(fmt: OutputFormat, frames: int) -> bool:
    """Whether a render of `fmt` may have a fast encode to settle later (then `choose` decides by its size)."""
    return fmt in ("webp", "avif") and frames == 1


def choose(fmt: OutputFormat, width: int, height: int, frames: int, effort: Effort) -> Choice:
    """The settings for an output of `width` x `height` pixels per frame."""
    small = width * height <= SMALL_PIXELS or frames > 1
    match fmt:
        case "webp":
            fast = effort == "fast" and not small
            return Choice(_WEBP_FAST if fast else _WEBP_SETTLED, not fast)
        case "avif":
            fast = effort == "fast" and not small
            return Choice(_AVIF_FAST if fast else _AVIF_SETTLED, not fast)
        case "jpeg":
            return Choice(_JPEG, True)
        case "png":
            return Choice(_options(compression=_PNG_COMPRESSION), True)
    return Choice((), True)


def encode(image: pyvips.Image, fmt: OutputFormat, quality: int, *, palette: bool, choice: Choice) -> bytes:
    """Encode with `keep="none"`: no EXIF, XMP, IPTC, ICC or GPS in any output."""
    options = dict(choice.options)
    match fmt:
        case "jpeg":
            return image.jpegsave_buffer(Q=quality, keep="none", **options)
        case "webp":
            return image.webpsave_buffer(Q=quality, keep="none", **options)
        case "avif":
            return image.heifsave_buffer(Q=quality, keep="none", **options)
        case "png":
            # Quantise only sources that were palette images already (libimagequant costs ~10x the deflate).
            return image.pngsave_buffer(palette=palette, keep="none", **options)
        case "gif":
            return image.gifsave_buffer(keep="none")
    raise ValueError(f"unknown output format {fmt!r}")


@dataclass(frozen=True, slots=True)
class Pixels:
    """A render's finished pixels (in memory, output-sized), kept to encode them again at the settled effort."""

    image: pyvips.Image
    format: OutputFormat
    quality: int
    palette: bool
    frames: int

    @property
    def nbytes(self) -> int:
        return int(self.image.width * self.image.height * self.image.bands)

    def encode(self, effort: Effort) -> bytes:
        choice = choose(self.format, self.image.width, self.image.height // self.frames, self.frames, effort)
        return encode(self.image, self.format, self.quality, palette=self.palette, choice=choice)
