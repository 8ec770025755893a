"""pyvips: `probe(bytes)` validates an original, `render(bytes, spec, fmt)` makes one variant.

Synchronous, for worker threads; state: the optional shared cache of decoded sources, child decode processes.
`configure_libvips()` (imgsvc.vips_hardening) runs first, once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import pyvips

from imgsvc import geometry, isolation, metrics, structure
from imgsvc.cache import SharedByteLRU
from imgsvc.deadline import Deadline
from imgsvc.encoding import Effort, Pixels, choose, encode as encode_with
from imgsvc.errors import ImageTooLarge, RenderTimeout, TooManyFrames, UndecodableImage, UnsupportedFormat
from imgsvc.finishing import finish_frame, match_background, parse_rgb, per_frame, to_8bit
from imgsvc.sniffing import EXPECTED_LOADER, sniff_format
from imgsvc.spec import DEFAULT_QUALITY, OutputFormat, SourceFormat, TransformSpec
from imgsvc.vips_hardening import configure_libvips

log = logging.getLogger("imgsvc.pipeline")

__all__ = [
    "PIPELINE_VERSION",
    "DecodedSource",
    "PipelineLimits",
    "Probe",
    "Rendered",
    "configure_libvips",
    "decoded_bytes",
    "encode",
    "max_dimension",
    "probe",
    "render",
    "sniff_format",
    "to_8bit",
]

# Bump the leading number whenever output bytes could change (encoder settings, geometry, colour handling).
PIPELINE_VERSION = f"2-vips{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}"

_WEBP_MAX_DIMENSION = 16383  # libwebp's limit

# Sources whose decoded pixels may be kept for the next render of the same original: JPEG at each DCT
# scale (1/1, 1/2, 1/4, 1/8), PNG in full. The rest decode at a scale that varies with the output size.
_DECODE_CACHED_SOURCES: frozenset[SourceFormat] = frozenset({"jpeg", "png"})
_BAND_BYTES = {"uchar": 1, "char": 1, "ushort": 2, "short": 2, "uint": 4, "int": 4, "float": 4, "double": 8}

_ANIMATED_SOURCES: frozenset[SourceFormat] = frozenset({"gif", "webp"})
_ANIMATED_OUTPUTS: frozenset[OutputFormat] = frozenset({"gif", "webp"})

# libwebp (a lossy frame) and libheif decode a whole frame in one call after reading all of it, which neither
# the eval callback nor a refused read interrupts. Measured here, 0.05 s deadline, noise images: 16 MP answered
# after 0.71-0.78 s, 49 MP after 1.6 s. Frames above `isolate_pixels` are decoded in a child process instead,
# killed at the deadline (18 MP: 0.07 s); a child costs ~0.6 s to start, once, and its own libvips memory.
_ISOLATED_SOURCES: frozenset[SourceFormat] = frozenset({"webp", "avif", "heif"})
_decoders = isolation.KillablePool()
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PipelineLimits:
    max_pixels: int = 50_000_000  # width * height summed over all frames, checked from the header
    max_frames: int = 100
    max_output_dim: int = 8192  # a render without w/h is scaled down to fit this box
    timeout_seconds: float = 10.0  # per probe / render deadline
    max_jpeg_scans: int = 100  # structural limits, checked from the bytes before libvips sees them
    max_png_chunks: int = 10_000
    max_png_text_bytes: int = 8_000_000
    isolate_pixels: int = 16_000_000  # larger WebP/AVIF/HEIF frames are decoded in a killable child process

    @property
    def structural(self) -> structure.StructureLimits:
        return structure.StructureLimits(
            self.max_jpeg_scans, self.max_png_chunks, self.max_png_text_bytes, self.max_frames
        )


@dataclass(frozen=True, slots=True)
class Probe:
    format: SourceFormat
    width: int  # after EXIF orientation; per frame for animations
    height: int
    frames: int
    has_alpha: bool


@dataclass(frozen=True, slots=True)
class Rendered:
    data: bytes
    format: OutputFormat
    width: int
    height: int  # per frame
    frames: int
    pixel_seconds: float = 0.0  # decode, resize, crop/pad, blur: up to the finished pixels
    encode_seconds: float = 0.0
    final: bool = True  # False: a fast encode, which the settled effort would make smaller
    pixels: Pixels | None = None  # the finished pixels, when asked for and the encode was not final


@dataclass(frozen=True, slots=True)
class DecodedSource:
    """Where a render finds, or leaves, its original's decoded pixels: `cache[(key, jpeg shrink)]`.

    `key` names the original's bytes (its sha256); `group` is what a delete evicts by (the sha256 too).
    """

    cache: SharedByteLRU[tuple[str, int], pyvips.Image]
    key: str
    group: str = ""


def decoded_bytes(image: pyvips.Image) -> int:
    """Memory held by a decoded (in-memory) image."""
    return int(image.width * image.height * image.bands * _BAND_BYTES.get(image.format, 8))


@dataclass(frozen=True, slots=True)
class _Header:
    probe: Probe
    has_icc: bool
    palette: bool
    stored_size: tuple[int, int]  # as decoded, before EXIF orientation
    pixel_bytes: int  # bands x bytes per band
    truncated: bool  # from the structure: image data missing that the decoder may not notice


def probe(data: bytes, limits: PipelineLimits) -> Probe:
    """Validate an upload: allowed format, header limits, and that the pixel data really decodes.

    Raises UnsupportedFormat (415), ImageTooLarge / TooManyFrames / TooComplex / UndecodableImage (422),
    RenderTimeout.
    """
    configure_libvips()
    expires = time.monotonic() + limits.timeout_seconds
    header = _open_header(data, limits)
    # libnsgif decodes a truncated GIF without complaint (it drops or pads the last frame), so the structure
    # walk tells: data ending inside an image block is truncated; a missing trailer, as browsers agree, is not.
    if header.truncated:
        raise UndecodableImage(f"the {header.probe.format} data is truncated")
    if _isolate(header.probe, limits):
        return _in_child(_probe_pixels, (data, header, expires), expires)
    return _probe_pixels(data, header, expires)


def _probe_pixels(data: bytes, header: _Header, expires: float) -> Probe:
    configure_libvips()  # again: this may run in a child process
    deadline = Deadline.until(expires)
    # A header can be intact while the pixel data is truncated or corrupt, so decode every pixel once with
    # fail_on="error", as cheaply as the format allows: JPEG at 1/8 scale (libjpeg still reads all the
    # entropy data, which is what detects truncation), static WebP at 1/8, the rest in full (bounded by
    # max_pixels). Measured (2 cores): 4000x3000 JPEG 23 ms vs 51 ms decoded in full, and the header alone
    # 0.25 ms; 2725x2225 JPEG 9.5 ms; 2048x1536 RGBA PNG 12 ms; 10-frame 370x285 GIF 5 ms, WebP 22 ms. A
    # 32 px thumbnail_buffer costs the same for JPEG but twice as much for PNG/GIF (it resizes too).
    try:
        pixels = pyvips.Image.new_from_source(
            deadline.source(data), "", access="sequential", fail_on="error", **_probe_load_options(header.probe)
        )
        if pixels.hasalpha():
            # The same single pass also tells whether the alpha channel is used at all: libvips gives every GIF
            # an alpha band, and an opaque image must not be treated (e.g. negotiated to PNG) as transparent.
            opaque = 65535 if pixels.format == "ushort" else 255
            transparent = deadline.watch(pixels.extract_band(pixels.bands - 1)).min() < opaque
        else:
            deadline.watch(pixels).avg()
            transparent = False
    except pyvips.Error as exc:
        raise _render_error(deadline, f"the {header.probe.format} pixel data is truncated or corrupt", exc) from exc
    finally:
        deadline.release()
    return replace(header.probe, has_alpha=transparent)


def render(
    data: bytes,
    spec: TransformSpec,
    fmt: OutputFormat,
    limits: PipelineLimits,
    decoded: DecodedSource | None = None,
    plan_size: tuple[int, int] | None = None,
    effort: Effort = "default",
    keep_pixels: bool = False,
) -> Rendered:
    """Render one variant: orient, resize (never enlarging), crop/pad, blur, flatten, encode, strip metadata.

    Geometry follows sharp's `fit` with `withoutEnlargement`. Given only `width` or only `height`, every fit
    scales keeping the aspect ratio; given neither, the original size is kept. With both, a fit that would
    have to enlarge instead divides the whole target box by that enlargement factor (inside/outside: scale
    capped at 1; cover/fill: box / max(w/W, h/H); contain: box / min(w/W, h/H)), so the source is used 1:1
    and the requested aspect ratio is kept, at a smaller size. `contain` pads with the opaque `background`
    colour even for outputs with alpha (an explicit bg is the caller's choice), placed by `gravity`.
    smart/entropy gravity crops by libvips attention/entropy; for animations (and `contain`) it is `center`.
    With `decoded`, a static JPEG or PNG is decoded once per scale and later renders start from those pixels
    (the same output: libvips' own thumbnail from the same decode). `plan_size`: the geometry is planned for an
    image of that (oriented) size instead of `data`'s, which is then a reduced copy of that image (imgsvc.pyramid).
    `effort` picks the encoder settings (`encoding.choose`); with `keep_pixels`, a fast encode keeps its finished
    pixels for the settled one. Raises like `probe`; a render past its deadline raises RenderTimeout.
    """
    configure_libvips()
    expires = time.monotonic() + limits.timeout_seconds
    header = _open_header(data, limits)
    if _isolate(header.probe, limits):
        args = (data, header, spec, fmt, limits, expires, None, plan_size, effort, False)
        return _in_child(_render, args, expires)
    return _render(data, header, spec, fmt, limits, expires, decoded, plan_size, effort, keep_pixels)


def _render(
    data: bytes,
    header: _Header,
    spec: TransformSpec,
    fmt: OutputFormat,
    limits: PipelineLimits,
    expires: float,
    decoded: DecodedSource | None,
    plan_size: tuple[int, int] | None = None,
    effort: Effort = "default",
    keep_pixels: bool = False,
) -> Rendered:
    configure_libvips()  # again: this may run in a child process
    deadline = Deadline.until(expires)
    source = header.probe
    animate = source.frames > 1 and source.format in _ANIMATED_SOURCES and fmt in _ANIMATED_OUTPUTS
    width, height = plan_size or (source.width, source.height)
    plan = geometry.plan(width, height, spec, animate, max_dimension(fmt, limits))
    quality = spec.quality if spec.quality is not None else DEFAULT_QUALITY[fmt]
    rgb = parse_rgb(spec.background)
    # Only images with an embedded profile pay for the ICC transform; untagged is assumed sRGB and CMYK is
    # always converted to sRGB by thumbnail itself.
    profile = {"output_profile": "srgb"} if header.has_icc else {}
    started = time.perf_counter()
    try:
        # A reduced copy (plan_size) is decoded at the scale the original's own decode would have reached.
        shrink = max(1, round(geometry.jpeg_shrink(width, height, plan) * source.width / width)) if plan_size else None
        use_decode = (decoded or shrink) and not animate
        pixels = _cached_decode(data, header, plan, deadline, decoded, shrink) if use_decode else None
        if pixels is not None:  # `size="force"`: `plan` already decided the exact size (and never enlarges)
            image = pyvips.Image.thumbnail_image(pixels, plan.resize[0], height=plan.resize[1], size="force", **profile)
        else:
            image = pyvips.Image.thumbnail_source(
                deadline.source(data),
                plan.resize[0],
                height=plan.resize[1],
                size="force",
                option_string=_load_options(animate=animate),
                **profile,
            )
        image = to_8bit(deadline.watch(image))
        frames = source.frames if animate else 1
        image = per_frame(image, frames, lambda frame: finish_frame(frame, plan, spec, rgb, deadline))
        if fmt == "jpeg" and image.hasalpha():
            image, colour = match_background(image, rgb)
            image = image.flatten(background=colour)
        # The finished pixels are computed first, under the deadline: libheif's and the GIF quantiser's
        # own passes cannot be interrupted, so a long encode that is already late is not started. It
        # also splits the time between pixel work and encoding for the metrics (output-sized: cheap).
        image = image.copy_memory()
        pixels_done = time.perf_counter()
        if deadline.expired():
            raise RenderTimeout("the render exceeded its deadline", headers={"Retry-After": "1"})
        choice = choose(fmt, image.width, image.height // frames, frames, effort)
        out = encode_with(image, fmt, quality, palette=header.palette, choice=choice)
    except pyvips.Error as exc:
        raise _render_error(deadline, "the image cannot be rendered", exc) from exc
    finally:
        deadline.release()
    kept = Pixels(image, fmt, quality, header.palette, frames) if keep_pixels and not choice.final else None
    return Rendered(out, fmt, image.width, image.height // frames, frames, pixels_done - started,
                    time.perf_counter() - pixels_done, choice.final, kept)  # fmt: skip


def _isolate(source: Probe, limits: PipelineLimits) -> bool:
    return source.format in _ISOLATED_SOURCES and source.width * source.height > limits.isolate_pixels


def _in_child(fn: Callable[..., T], args: tuple[object, ...], expires: float) -> T:
    try:
        return _decoders.run(fn, args, expires=expires)
    except isolation.Expired:
        raise RenderTimeout("the render exceeded its deadline", headers={"Retry-After": "1"}) from None
    except isolation.ChildDied:
        log.warning("a decoding process died on an image")
        raise UndecodableImage("the image cannot be decoded") from None


def _open_header(data: bytes, limits: PipelineLimits) -> _Header:
    """Sniff, check the structure, open the header only, and enforce the loader allow-list and the pixel and
    frame limits."""
    fmt = sniff_format(data[:32])
    if fmt is None:
        raise UnsupportedFormat("the body is not a JPEG, PNG, WebP, GIF, AVIF/HEIF or TIFF image")
    shape = structure.check(data, fmt, limits.structural)
    try:
        image = pyvips.Image.new_from_buffer(data, "", access="sequential", fail_on="error")
        loader = str(image.get("vips-loader"))
        frames = _int_field(image, "n-pages", 1)
        orientation = _int_field(image, "orientation", 1)
        has_icc = image.get_typeof("icc-profile-data") != 0
        palette = _int_field(image, "palette", 0) != 0
        width, height, has_alpha = image.width, image.height, bool(image.hasalpha())
        stored, pixel_bytes = (width, height), image.bands * _BAND_BYTES.get(image.format, 8)
    except pyvips.Error as exc:
        raise UndecodableImage(f"the {fmt} header cannot be read") from exc
    if loader != EXPECTED_LOADER[fmt]:
        raise UnsupportedFormat(f"the {fmt} body was not accepted by the {fmt} decoder")
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    if frames > limits.max_frames:
        raise TooManyFrames(f"the image has {frames} frames; at most {limits.max_frames} are allowed")
    if width * height * frames > limits.max_pixels:
        raise ImageTooLarge(
            f"{width}x{height} pixels x {frames} frame(s) exceeds the limit of {limits.max_pixels} pixels"
        )
    return _Header(Probe(fmt, width, height, frames, has_alpha), has_icc, palette, stored, pixel_bytes, shape.truncated)


def _cached_decode(
    data: bytes,
    header: _Header,
    plan: geometry.Plan,
    deadline: Deadline,
    decoded: DecodedSource | None,
    shrink: int | None = None,
) -> pyvips.Image | None:
    """The source decoded as libvips' thumbnail would load it (or at JPEG scale 1/`shrink`), from `decoded.cache`
    or decoded into it. None when the source is not cacheable (format, animation, or more bytes than a quarter
    of the cache) and no `shrink` was asked for.
    """
    source = header.probe
    if source.format not in _DECODE_CACHED_SOURCES or source.frames > 1:
        return None
    asked = shrink is not None
    if shrink is None:
        shrink = geometry.jpeg_shrink(source.width, source.height, plan)
    shrink = shrink if source.format == "jpeg" else 1
    width, height = (-(-side // shrink) for side in header.stored_size)
    if decoded is None or width * height * header.pixel_bytes > decoded.cache.max_bytes // 4:
        return _decode(data, shrink, deadline) if asked else None
    key = (decoded.key, shrink)
    pixels = decoded.cache.get(key)
    metrics.cache_total.labels("decoded", "miss" if pixels is None else "hit").inc()
    if pixels is None:
        pixels = _decode(data, shrink, deadline)
        decoded.cache.put(key, pixels, decoded.group)
    return pixels


def _decode(data: bytes, shrink: int, deadline: Deadline) -> pyvips.Image:
    options = {"shrink": shrink} if shrink > 1 else {}
    loaded = pyvips.Image.new_from_source(deadline.source(data), "", access="sequential", fail_on="error", **options)
    pixels = deadline.watch(loaded).copy_memory()
    if deadline.expired():
        raise RenderTimeout("the render exceeded its deadline", headers={"Retry-After": "1"})
    return pixels


def _int_field(image: pyvips.Image, name: str, default: int) -> int:
    return int(image.get(name)) if image.get_typeof(name) != 0 else default


def _load_options(*, animate: bool) -> str:
    # thumbnail_buffer accepts `fail_on` but never hands it to the loader (libvips#5195, open in 8.18.7: a
    # truncated JPEG renders half grey with no error), so it goes in the loader's option string, which
    # thumbnail_source takes as well.
    # The header was checked with n-pages <= max_frames, so loading every frame is within the limits.
    return "n=-1,fail_on=error" if animate else "fail_on=error"


def _probe_load_options(source: Probe) -> dict[str, int | float]:
    if source.frames > 1 and source.format in _ANIMATED_SOURCES:
        return {"n": -1}
    if source.format == "jpeg":
        return {"shrink": 8}
    return {"scale": 0.125} if source.format == "webp" else {}


def _render_error(deadline: Deadline, detail: str, exc: pyvips.Error) -> UndecodableImage | RenderTimeout:
    # A killed evaluation surfaces as a pyvips.Error; the libvips message itself is never shown to clients.
    if deadline.expired() or "killed for image" in str(exc):
        return RenderTimeout("the render exceeded its deadline", headers={"Retry-After": "1"})
    log.info("libvips refused an image: %s", str(exc).strip().replace("\n", " | ")[:500])
    return UndecodableImage(detail)


def max_dimension(fmt: OutputFormat, limits: PipelineLimits) -> int:
    return min(limits.max_output_dim, _WEBP_MAX_DIMENSION) if fmt == "webp" else limits.max_output_dim


def encode(image: pyvips.Image, fmt: OutputFormat, quality: int, *, palette: bool, effort: Effort = "default") -> bytes:
    """Encode one (single-frame) image at `effort`, with `keep="none"`."""
    choice = choose(fmt, image.width, image.height, 1, effort)
    return encode_with(image, fmt, quality, palette=palette, choice=choice)
