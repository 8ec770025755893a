"""The pyramid of reduced sources: which levels an original gets, which one a render may start from, and
making them with the placeholder in one pass (pyvips, synchronous, for worker threads).
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from typing import Literal

import pyvips

from imgsvc import geometry, pipeline, thumbhash
from imgsvc.deadline import Deadline
from imgsvc.derivations import Placeholder, Source
from imgsvc.encoding import Effort
from imgsvc.errors import RenderTimeout, UndecodableImage
from imgsvc.spec import OutputFormat, TransformSpec
from imgsvc.storage import derived_key

Scale = Literal[2, 4, 8]
SCALES: tuple[Scale, ...] = (2, 4, 8)

# Outputs that may start from a level. PNG and GIF are lossless or palette outputs: their bytes would follow a
# lossy level's noise (or lose the source's palette), so they always start from the original.
_LEVEL_OUTPUTS: frozenset[OutputFormat] = frozenset({"jpeg", "webp", "avif"})
_HASH_SIDE = 32  # ThumbHash input; the hash keeps only the lowest frequencies (the reference allows up to 100)
_COLOUR_SIDE = 64  # dominant and average colour input
_MIN_SIDE = 64  # no level smaller than this on its longest side


@dataclass(frozen=True, slots=True)
class Level:
    """The original at 1/`scale` of its size: for a JPEG, exactly what libjpeg's DCT scaling decodes, which is
    where a render's own shrink-on-load of the original would start (geometry.jpeg_shrink)."""

    scale: Scale
    width: int  # oriented pixels, exactly
    height: int

    def key(self, sha256: str) -> str:
        return derived_key(sha256, f"1-{self.scale}.jpg")


@dataclass(frozen=True, slots=True)
class Derived:
    levels: tuple[tuple[Level, bytes], ...]
    placeholder: Placeholder | None
    seconds: float  # thread CPU time of the whole pass


def levels_for(source: Source, scales: tuple[int, ...]) -> tuple[Level, ...]:
    """The levels an original gets, largest first, as JPEG q95 without chroma subsampling. Only static JPEGs
    get any: measured, a resized lossless level of a PNG with alpha renders to visibly different pixels
    (SSIM 0.986 at 64 px) and 7-15% smaller WebP, so other formats always render from the original."""
    if source.format != "jpeg" or source.frames > 1:
        return ()
    found = []
    for scale in sorted(set(scales) & set(SCALES)):
        width, height = max(1, source.width // scale), max(1, source.height // scale)  # as libvips crops them
        if max(width, height) >= _MIN_SIDE:
            found.append(Level(scale, width, height))  # type: ignore[arg-type]
    return tuple(found)


def choose(
    levels: tuple[Level, ...], width: int, height: int, spec: TransformSpec, fmt: OutputFormat, animated: bool,
    limits: pipeline.PipelineLimits,
) -> Level | None:  # fmt: skip
    """The smallest level that still leaves the render at least 2x to resize, as the original's JPEG
    shrink-on-load would (`width` x `height` is the original); None when the render starts from the original."""
    if fmt not in _LEVEL_OUTPUTS or animated or not levels:
        return None
    plan = geometry.plan(width, height, spec, False, pipeline.max_dimension(fmt, limits))
    shrink = geometry.jpeg_shrink(width, height, plan)
    usable = [level for level in levels if level.scale <= shrink]
    return max(usable, key=lambda level: level.scale) if usable else None


def render_level(
    data: bytes, level: Level, spec: TransformSpec, fmt: OutputFormat, limits: pipeline.PipelineLimits,
    decoded: pipeline.DecodedSource | None, original_size: tuple[int, int], effort: Effort = "default",
    keep_pixels: bool = False,
) -> pipeline.Rendered:  # fmt: skip
    """Render from a level as if from the original: UndecodableImage if the stored bytes are not that level."""
    try:
        header = pyvips.Image.new_from_buffer(data, "", access="sequential")
        size = (header.width, header.height)
    except pyvips.Error as exc:
        raise UndecodableImage("the stored level is unreadable") from exc
    if size != (level.width, level.height):
        raise UndecodableImage(f"the stored level is {size[0]}x{size[1]}, not {level.width}x{level.height}")
    return pipeline.render(data, spec, fmt, limits, decoded, original_size, effort, keep_pixels)


def derive(data: bytes, levels: tuple[Level, ...], timeout: float) -> Derived:
    """Make every level (the JPEG decoded at each DCT scale), and the placeholder from the smallest, or from a
    small thumbnail when there is no level. Raises UndecodableImage, or RenderTimeout past `timeout` seconds."""
    pipeline.configure_libvips()
    started = time.thread_time()
    deadline = Deadline(timeout)
    try:
        header = pyvips.Image.new_from_buffer(data, "", access="sequential")
        # As a render does: only images with an embedded profile are transformed; the levels are sRGB, untagged.
        profile = {"output_profile": "srgb"} if header.get_typeof("icc-profile-data") != 0 else {}
        plain = header.interpretation in ("srgb", "b-w") and header.format == "uchar"  # CMYK: left to renders
        made, smallest = [], None
        for level in levels if plain else ():
            pixels = _level_pixels(data, level, profile, deadline)
            made.append((level, _save(pixels)))
            smallest = pixels
        if smallest is None:
            side = _HASH_SIDE * 4
            loaded = pyvips.Image.thumbnail_source(
                deadline.source(data), side, height=side, option_string="fail_on=error", **profile
            )
            smallest = pipeline.to_8bit(deadline.watch(loaded)).copy_memory()
        if deadline.expired():
            raise RenderTimeout("the derivation exceeded its deadline")
        placeholder = _placeholder(smallest)
    except pyvips.Error as exc:
        if deadline.expired():
            raise RenderTimeout("the derivation exceeded its deadline") from exc
        raise UndecodableImage("the original cannot be derived from") from exc
    finally:
        deadline.release()
    return Derived(tuple(made), placeholder, time.thread_time() - started)


def _level_pixels(data: bytes, level: Level, profile: dict[str, str], deadline: Deadline) -> pyvips.Image:
    """libjpeg's own scaling, as a render's shrink-on-load does, then the same colour transform and rotation."""
    image = pyvips.Image.new_from_source(
        deadline.source(data), "", access="sequential", fail_on="error", shrink=level.scale
    )
    image = deadline.watch(image).copy_memory()  # decoded once, in memory: rotating needs random access
    if profile:
        image = image.icc_transform("srgb", embedded=True)
    image = pipeline.to_8bit(image.autorot()).copy_memory()
    if (image.width, image.height) != (level.width, level.height):
        raise UndecodableImage(f"level 1/{level.scale} came out {image.width}x{image.height}")
    return image


def _save(image: pyvips.Image) -> bytes:
    return image.jpegsave_buffer(Q=95, subsample_mode="off", optimize_coding=True, keep="none")


def _rgba(image: pyvips.Image, side: int) -> pyvips.Image:
    small = image.thumbnail_image(side, height=side, size="down")
    if small.bands - int(small.hasalpha()) == 1:
        small = small.colourspace("srgb")
    return small if small.hasalpha() else small.bandjoin(255)


def _placeholder(image: pyvips.Image) -> Placeholder:
    hashed = _rgba(image, _HASH_SIDE)
    digest = thumbhash.encode(hashed.width, hashed.height, bytes(hashed.write_to_memory()))
    dominant, average = _colours(bytes(_rgba(image, _COLOUR_SIDE).write_to_memory()))
    return Placeholder(base64.b64encode(digest).decode(), dominant, average)


def _colours(rgba: bytes) -> tuple[str, str]:
    """(dominant, average) as #rrggbb: the mean of the most common 4-bit-per-channel colour bin, and the
    alpha-weighted mean of every pixel."""
    bins: dict[int, list[int]] = {}
    total = [0, 0, 0, 0]
    for i in range(0, len(rgba), 4):
        r, g, b, a = rgba[i], rgba[i + 1], rgba[i + 2], rgba[i + 3]
        total[0] += r * a
        total[1] += g * a
        total[2] += b * a
        total[3] += a
        if a >= 128:
            entry = bins.setdefault((r >> 4) << 8 | (g >> 4) << 4 | b >> 4, [0, 0, 0, 0])
            entry[0] += r
            entry[1] += g
            entry[2] += b
            entry[3] += 1
    weight = total[3] or 1
    average = _hex(total[0] / weight, total[1] / weight, total[2] / weight)
    if not bins:
        return average, average
    r, g, b, n = max(bins.values(), key=lambda entry: entry[3])
    return _hex(r / n, g / n, b / n), average


def _hex(r: float, g: float, b: float) -> str:
    return "#" + "".join(f"{min(255, round(v)):02x}" for v in (r, g, b))
