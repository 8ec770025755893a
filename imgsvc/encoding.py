"""Encoder settings per output format and size at three efforts: `default` (a miss's one encode), `fast` (a first
answer, settled later) and `settled` (its final bytes). Chosen on the measured CPU/bytes/SSIM frontier:
benchmarks/results/encoders.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyvips

from imgsvc.spec import OutputFormat

Effort = Literal["default", "fast", "settled"]
Options = tuple[tuple[str, object], ...]
# (largest output in pixels, options), ascending: the first class an output fits in applies.
Classes = tuple[tuple[int, Options], ...]

# Outputs of at most this many pixels are encoded at the settled setting at once: their encode is a small part
# of the render (decoding dominates), so a second encode would cost more than the first one saves.
SMALL_PIXELS = 400 * 400
_ANY = 1 << 62


@dataclass(frozen=True, slots=True)
class Choice:
    """The settings of one encode: `final` when no later encode would change the bytes."""

    options: Options
    final: bool


def _options(**options: object) -> Options:
    return tuple(options.items())


def _all(**options: object) -> Classes:
    return ((_ANY, _options(**options)),)


_SETTINGS: dict[str, dict[Effort, Classes]] = {
    "webp": {
        "default": _all(effort=4, smart_subsample=False),
        "fast": _all(effort=2, smart_subsample=False),
        "settled": _all(effort=4, smart_subsample=False),
    },
    "avif": {
        "default": _all(compression="av1", effort=2),
        "fast": _all(compression="av1", effort=0),
        "settled": _all(compression="av1", effort=3),
    },
}
_JPEG = _options(optimize_coding=True)
_PNG_COMPRESSION = 6


def may_settle(fmt: OutputFormat, frames: int) -> bool:
    """Whether a render of `fmt` may have a fast encode to settle later (then `choose` decides by its size)."""
    return fmt in _SETTINGS and frames == 1


def settled_tag(fmt: OutputFormat) -> str:
    """What tells settled bytes from `default` ones in an ETag: empty when every size encodes alike."""
    settings = _SETTINGS.get(fmt)
    return "" if settings is None or settings["settled"] == settings["default"] else "|settled"


def choose(fmt: OutputFormat, width: int, height: int, frames: int, effort: Effort) -> Choice:
    """The settings for an output of `width` x `height` pixels per frame."""
    settings = _SETTINGS.get(fmt)
    if settings is None:
        return Choice(_JPEG if fmt == "jpeg" else _options(compression=_PNG_COMPRESSION) if fmt == "png" else (), True)
    if effort == "fast" and (width * height <= SMALL_PIXELS or frames > 1):
        effort = "settled"
    pixels = width * height
    options = next(options for largest, options in settings[effort] if pixels <= largest)
    return Choice(options, effort != "fast")


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
