"""The pyvips pipeline against real photos and fixtures generated here with pyvips; outputs are decoded to check."""

from __future__ import annotations

import functools
import re
import struct
import time
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
import pyvips

from imgsvc import errors
from imgsvc.cache import SharedByteLRU
from imgsvc.headers import MEDIA_TYPES
from imgsvc.pipeline import (
    PIPELINE_VERSION,
    DecodedSource,
    PipelineLimits,
    Probe,
    Rendered,
    configure_libvips,
    decoded_bytes,
    probe,
    render,
    sniff_format,
)
from imgsvc.spec import OutputFormat, TransformSpec
from tests.decoder_bombs import scan_bomb, slow_frame

IMAGES = Path(__file__).resolve().parent / "images"  # copies of the shared benchmark corpus, with its README
PHOTO = IMAGES / "photo-4000x3000.jpg"
SHARP_JPEG = IMAGES / "2569067123_aca715a2ee_o.jpg"
ALPHA_PNG = IMAGES / "alpha-premultiply-2048x1536-paper.png"
ANIMATED_GIF = IMAGES / "animated-loop-3.gif"
ANIMATED_WEBP = IMAGES / "animated-loop-3.webp"
LIMITS = PipelineLimits()
FORMATS: tuple[OutputFormat, ...] = ("jpeg", "png", "webp", "avif", "gif")
LOADERS = {"jpeg": "jpegload_buffer", "png": "pngload_buffer", "webp": "webpload_buffer",
           "avif": "heifload_buffer", "gif": "gifload_buffer"}  # fmt: skip
RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'


@functools.cache
def _read(path: Path) -> bytes:
    return path.read_bytes()


def _solid(width: int, height: int, colour: tuple[int, ...], *, deep: bool = False) -> pyvips.Image:
    """A uniform image; `deep` makes it 16-bit (rgb16 / grey16)."""
    image = (pyvips.Image.black(width, height, bands=len(colour)) + list(colour)).cast("ushort" if deep else "uchar")
    colour_space = ("rgb16" if deep else "srgb") if len(colour) >= 3 else ("grey16" if deep else "b-w")
    return image.copy(interpretation=colour_space)


def _quadrants(width: int = 400, height: int = 300) -> pyvips.Image:
    """Top-left red, top-right green, bottom-left blue, bottom-right yellow."""
    w, h = width // 2, height // 2
    top = _solid(w, h, RED).join(_solid(width - w, h, GREEN), "horizontal")
    bottom = _solid(w, height - h, BLUE).join(_solid(width - w, height - h, YELLOW), "horizontal")
    return top.join(bottom, "vertical")


@functools.cache
def _quadrants_jpeg() -> bytes:
    return _quadrants().jpegsave_buffer(Q=95, keep="none")


def _with_fields(image: pyvips.Image, **fields: int | str | bytes) -> pyvips.Image:
    image = image.copy()
    for name, value in fields.items():
        gtype = {int: pyvips.GValue.gint_type, str: pyvips.GValue.gstr_type, bytes: pyvips.GValue.blob_type}
        image.set_type(gtype[type(value)], name.replace("_", "-"), value)
    return image


def _decode(data: bytes, *, animated: bool = False) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(data, "", n=-1) if animated else pyvips.Image.new_from_buffer(data, "")


def _near(pixel: list[float], expected: tuple[int, ...], tolerance: float = 24) -> bool:
    return len(pixel) == len(expected) and all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def _render(data: bytes, fmt: OutputFormat = "jpeg", limits: PipelineLimits = LIMITS, **spec: object) -> Rendered:
    return render(data, TransformSpec(**spec), fmt, limits)  # type: ignore[arg-type]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


# --- set-up and sniffing ---------------------------------------------------------------------------------------


def test_configure_libvips_is_idempotent_and_reports_the_version() -> None:
    version = configure_libvips()
    assert version == configure_libvips()
    assert re.fullmatch(r"8\.\d+\.\d+", version)
    assert PIPELINE_VERSION.endswith("-vips" + version)
    assert re.fullmatch(r"\d+-vips8\.\d+\.\d+", PIPELINE_VERSION)
    assert set(FORMATS) <= set(MEDIA_TYPES)
    assert MEDIA_TYPES["avif"] == "image/avif"


def test_configure_libvips_blocks_svg_and_other_loaders(tmp_path: Path) -> None:
    configure_libvips()
    with pytest.raises(pyvips.Error):
        pyvips.Image.new_from_buffer(SVG, "")
    with pytest.raises(pyvips.Error, match="blocked"):
        pyvips.Image.svgload_buffer(SVG)
    matrix = tmp_path / "m.mat"
    matrix.write_text("2 2\n1 2\n3 4\n")
    with pytest.raises(pyvips.Error):
        pyvips.Image.new_from_file(str(matrix))
    tiff = _quadrants(40, 30).tiffsave_buffer()
    assert pyvips.Image.new_from_buffer(tiff, "").get("vips-loader") == "tiffload_buffer"


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "jpeg"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "png"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "webp"),
        (b"GIF87a\x01\x00", "gif"),
        (b"GIF89a\x01\x00", "gif"),
        (b"II*\x00\x08\x00\x00\x00", "tiff"),
        (b"MM\x00*\x00\x00\x00\x08", "tiff"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf", "avif"),
        (b"\x00\x00\x00\x1cftypavis\x00\x00\x00\x00avismsf1miaf", "avif"),
        (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1avif", "avif"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "heif"),
        (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1heic", "heif"),
        (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2", None),  # MP4 video
        (SVG, None),
        (b"<?xml version='1.0'?><svg", None),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3", None),
        (b"<!DOCTYPE html><html><script>", None),
        (b"BM6\x00\x00\x00", None),
        (b"", None),
        (b"\xff\xd8", None),
    ],
)
def test_sniff_format(head: bytes, expected: str | None) -> None:
    assert sniff_format(head) == expected


# --- probe -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (PHOTO, Probe("jpeg", 4000, 3000, 1, False)),
        (SHARP_JPEG, Probe("jpeg", 2725, 2225, 1, False)),
        (ALPHA_PNG, Probe("png", 2048, 1536, 1, True)),
        (ANIMATED_GIF, Probe("gif", 370, 285, 10, False)),  # alpha band present but fully opaque
        (ANIMATED_WEBP, Probe("webp", 370, 285, 10, True)),
    ],
)
def test_probe_real_images(path: Path, expected: Probe) -> None:
    assert probe(_read(path), LIMITS) == expected


@pytest.mark.parametrize(("orientation", "size"), [(1, (64, 48)), (3, (64, 48)), (6, (48, 64)), (8, (48, 64))])
def test_probe_reports_oriented_size(orientation: int, size: tuple[int, int]) -> None:
    data = _with_fields(_quadrants(64, 48), orientation=orientation).jpegsave_buffer(keep="exif")
    result = probe(data, LIMITS)
    assert (result.width, result.height) == size


def test_probe_generated_formats() -> None:
    avif = _render(_quadrants_jpeg(), "avif", width=100).data
    assert probe(avif, LIMITS) == Probe("avif", 100, 75, 1, False)
    tiff = _quadrants(40, 30).tiffsave_buffer(compression="deflate")
    assert probe(tiff, LIMITS) == Probe("tiff", 40, 30, 1, False)


@pytest.mark.parametrize(
    "body", [SVG, b"%PDF-1.4\n1 0 obj<<>>endobj\n", b"<!doctype html><script>alert(1)</script>", b""]
)
def test_unsupported_formats_are_415(body: bytes) -> None:
    with pytest.raises(errors.UnsupportedFormat) as raised:
        probe(body, LIMITS)
    assert raised.value.status == 415
    with pytest.raises(errors.UnsupportedFormat):
        _render(body, width=10)


def _truncated(kind: str) -> bytes:
    source = {"jpeg": _read(SHARP_JPEG), "png": _read(ALPHA_PNG), "gif": _read(ANIMATED_GIF)}[kind]
    return source[: len(source) * 3 // 4]


@pytest.mark.parametrize("kind", ["jpeg", "png", "gif"])
def test_truncated_images_are_422(kind: str) -> None:
    with pytest.raises(errors.UndecodableImage) as raised:
        probe(_truncated(kind), LIMITS)
    assert raised.value.status == 422
    assert "vips" not in raised.value.detail.lower()


def test_truncated_jpeg_render_is_422() -> None:
    with pytest.raises(errors.UndecodableImage):
        _render(_truncated("jpeg"), width=100)


@pytest.mark.parametrize("body", [b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, b"\xff\xd8\xff" + bytes(100), b"GIF89a"])
def test_garbage_after_magic_is_422(body: bytes) -> None:
    with pytest.raises(errors.UndecodableImage):
        probe(body, LIMITS)


def test_png_bomb_header_is_rejected_before_decoding() -> None:
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )
    assert len(bomb) < 100
    with pytest.raises(errors.ImageTooLarge) as raised:
        probe(bomb, LIMITS)
    assert raised.value.status == 422
    with pytest.raises(errors.ImageTooLarge):
        _render(bomb, width=10)


def test_pixel_limit_sums_frames() -> None:
    gif = _read(ANIMATED_GIF)  # 370 x 285 x 10 = 1,054,500 pixels
    with pytest.raises(errors.ImageTooLarge):
        probe(gif, PipelineLimits(max_pixels=1_000_000))
    assert probe(gif, PipelineLimits(max_pixels=1_100_000)).frames == 10
    with pytest.raises(errors.ImageTooLarge):
        _render(_read(PHOTO), limits=PipelineLimits(max_pixels=12_000_000 - 1), width=10)


def test_too_many_frames() -> None:
    black = _solid(16, 16, (0, 0, 0))
    frames = [black.draw_rect([255, 255, 255], i % 16, i // 16, 1, 1) for i in range(150)]  # all distinct
    gif = pyvips.Image.arrayjoin(frames, across=1).copy()
    gif.set_type(pyvips.GValue.gint_type, "page-height", 16)
    data = gif.gifsave_buffer()
    assert _decode(data).get("n-pages") == 150
    with pytest.raises(errors.TooManyFrames) as raised:
        probe(data, PipelineLimits(max_frames=100))
    assert raised.value.status == 422
    with pytest.raises(errors.TooManyFrames):
        _render(data, "gif", PipelineLimits(max_frames=100), width=4)
    assert probe(data, PipelineLimits(max_frames=150)).frames == 150


def test_ultrahdr_jpeg_is_read_as_plain_jpeg_and_loses_its_gain_map() -> None:
    hdr = _quadrants(64, 48).cast("float").colourspace("scrgb")
    data = hdr.uhdrsave_buffer()
    gain_map = b"urn:iso:std:iso:ts:21496"  # the ISO 21496-1 gain map metadata
    assert gain_map in data
    assert probe(data, LIMITS) == Probe("jpeg", 64, 48, 1, False)
    out = _render(data, width=32).data
    assert gain_map not in out
    assert b"MPF" not in out


# --- geometry --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "size"),
    [
        ({}, (400, 300)),
        ({"width": 200}, (200, 150)),
        ({"height": 150}, (200, 150)),
        ({"width": 200, "fit": "cover"}, (200, 150)),  # one side given: every fit keeps the aspect ratio
        ({"height": 30, "fit": "fill"}, (40, 30)),
        ({"width": 200, "height": 200}, (200, 150)),
        ({"width": 200, "height": 200, "fit": "inside"}, (200, 150)),
        ({"width": 200, "height": 200, "fit": "outside"}, (267, 200)),
        ({"width": 200, "height": 200, "fit": "cover"}, (200, 200)),
        ({"width": 200, "height": 200, "fit": "contain"}, (200, 200)),
        ({"width": 200, "height": 100, "fit": "fill"}, (200, 100)),
        ({"width": 1, "height": 1, "fit": "cover"}, (1, 1)),
        # never enlarge
        ({"width": 800}, (400, 300)),
        ({"height": 900}, (400, 300)),
        ({"width": 800, "height": 800}, (400, 300)),
        ({"width": 800, "height": 800, "fit": "outside"}, (400, 300)),
        ({"width": 800, "height": 400, "fit": "cover"}, (400, 200)),  # box / 2
        ({"width": 800, "height": 800, "fit": "cover"}, (300, 300)),  # box / (8/3)
        ({"width": 500, "height": 100, "fit": "cover"}, (400, 80)),  # box / 1.25
        ({"width": 800, "height": 800, "fit": "contain"}, (400, 400)),  # box / 2: image 1:1, padded
        ({"width": 800, "height": 800, "fit": "fill"}, (300, 300)),
        ({"width": 200, "height": 600, "fit": "fill"}, (100, 300)),
    ],
)
def test_dimensions(spec: dict[str, object], size: tuple[int, int]) -> None:
    result = _render(_quadrants_jpeg(), "png", **spec)
    decoded = _decode(result.data)
    assert (decoded.width, decoded.height) == size == (result.width, result.height)
    assert result.frames == 1


@pytest.mark.parametrize("fit", ["inside", "outside", "cover", "contain", "fill"])
def test_dimensions_on_the_real_photo(fit: str) -> None:
    expected = {"inside": (640, 480), "outside": (853, 640), "cover": (640, 640), "contain": (640, 640),
                "fill": (640, 640)}[fit]  # fmt: skip
    result = _render(_read(PHOTO), "webp", width=640, height=640, fit=fit)
    decoded = _decode(result.data)
    assert (decoded.width, decoded.height) == expected


@pytest.mark.parametrize(
    ("gravity", "size", "samples"),
    [
        ("center", (100, 300), {(10, 50): RED, (90, 50): GREEN, (10, 250): BLUE, (90, 250): YELLOW}),
        ("west", (100, 300), {(50, 50): RED, (50, 250): BLUE}),
        ("nw", (100, 300), {(50, 50): RED, (50, 250): BLUE}),
        ("east", (100, 300), {(50, 50): GREEN, (50, 250): YELLOW}),
        ("se", (100, 300), {(50, 50): GREEN, (50, 250): YELLOW}),
        ("north", (400, 100), {(100, 50): RED, (300, 50): GREEN}),
        ("ne", (400, 100), {(100, 50): RED, (300, 50): GREEN}),
        ("south", (400, 100), {(100, 50): BLUE, (300, 50): YELLOW}),
        ("sw", (400, 100), {(100, 50): BLUE, (300, 50): YELLOW}),
    ],
)
def test_cover_gravity(
    gravity: str, size: tuple[int, int], samples: dict[tuple[int, int], tuple[int, int, int]]
) -> None:
    result = _render(_quadrants_jpeg(), "png", width=size[0], height=size[1], fit="cover", gravity=gravity)
    decoded = _decode(result.data)
    assert (decoded.width, decoded.height) == size
    for (x, y), colour in samples.items():
        assert _near(decoded(x, y), colour), (gravity, x, y, decoded(x, y))


def _patch_near(edge: str) -> pyvips.Image:
    """Flat grey 600×200 with a 120×200 saturated checkerboard 20 px from its east or west edge."""
    xy = pyvips.Image.xyz(120, 200)
    checker = ((xy[0] & 8) ^ (xy[1] & 8)).ifthenelse([255, 40, 0], [0, 60, 255]).cast("uchar")
    return _solid(600, 200, (128, 128, 128)).insert(checker, 460 if edge == "east" else 20, 0)


@pytest.mark.parametrize("edge", ["east", "west"])
@pytest.mark.parametrize("gravity", ["smart", "entropy"])
def test_cover_smart_crops(gravity: str, edge: str) -> None:
    """On an image made for it, smart/entropy crop around the detail where the centre crop is flat grey."""
    source = _patch_near(edge)
    data = source.pngsave_buffer()
    centre, chosen = (_decode(_render(data, "png", width=200, height=200, fit="cover", gravity=g).data)
                      for g in ("center", gravity))  # fmt: skip
    assert (chosen.width, chosen.height) == (200, 200)
    assert centre.deviate() < 1 and chosen.deviate() > 50  # flat vs the checkerboard
    offsets = [x for x in range(401) if (source.crop(x, 0, 200, 200) - chosen).abs().max() <= 2]
    assert len(offsets) == 1 and offsets[0] in (range(380, 401) if edge == "east" else range(21)), offsets


@pytest.mark.parametrize(
    ("gravity", "grey_at", "pad_at"),
    [("center", [(100, 100)], [(100, 5), (100, 195)]), ("north", [(100, 5)], [(100, 195)]),
     ("south", [(100, 195)], [(100, 5)])],
)  # fmt: skip
def test_contain_pads_with_background(
    gravity: str, grey_at: list[tuple[int, int]], pad_at: list[tuple[int, int]]
) -> None:
    source = _solid(400, 300, (128, 128, 128)).jpegsave_buffer()
    result = _render(source, "png", width=200, height=200, fit="contain", gravity=gravity, background="ff00ff")
    decoded = _decode(result.data)
    assert (decoded.width, decoded.height) == (200, 200)
    for x, y in grey_at:
        assert _near(decoded(x, y), (128, 128, 128), 4)
    for x, y in pad_at:
        assert _near(decoded(x, y), (255, 0, 255), 4)


def test_contain_keeps_alpha_and_pads_opaquely() -> None:
    source = _solid(400, 300, (0, 0, 255, 0)).pngsave_buffer()
    decoded = _decode(_render(source, "png", width=200, height=200, fit="contain", background="00ff00").data)
    assert decoded(100, 100)[3] == 0
    assert _near(decoded(100, 5), (0, 255, 0, 255), 1)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(orientation: int) -> None:
    upright = _quadrants(64, 48)
    transpose = upright.rot90().fliphor()
    stored = {
        1: upright,
        2: upright.fliphor(),
        3: upright.rot180(),
        4: upright.flipver(),
        5: transpose,
        6: upright.rot270(),
        7: upright.rot90().flipver(),
        8: upright.rot90(),
    }[orientation]
    data = _with_fields(stored, orientation=orientation).jpegsave_buffer(Q=95, keep="exif")
    assert _decode(data).get("orientation") == orientation
    decoded = _decode(_render(data, "png").data)
    assert (decoded.width, decoded.height) == (64, 48)
    assert "orientation" not in decoded.get_fields()
    for (x, y), colour in {(4, 4): RED, (60, 4): GREEN, (4, 44): BLUE, (60, 44): YELLOW}.items():
        assert _near(decoded(x, y), colour), (orientation, x, y, decoded(x, y))


# --- colour, alpha, blur ---------------------------------------------------------------------------------------


def test_cmyk_jpeg_becomes_srgb() -> None:
    cmyk = _solid(64, 64, (200, 30, 40)).icc_transform("cmyk")
    untagged = cmyk.copy()
    untagged.remove("icc-profile-data")
    for data in (cmyk.jpegsave_buffer(), untagged.jpegsave_buffer(keep="none")):
        assert _decode(data).interpretation == "cmyk"
        decoded = _decode(_render(data, "jpeg", width=32).data)
        assert (decoded.interpretation, decoded.bands) == ("srgb", 3)
        assert _near(decoded(16, 16), (200, 30, 40), 16)


def test_embedded_profile_is_converted_to_srgb() -> None:
    p3 = _solid(64, 64, (200, 30, 40)).icc_transform("p3")
    data = p3.pngsave_buffer()
    assert _decode(data).get_typeof("icc-profile-data") != 0
    assert not _near(_decode(data)(8, 8), (200, 30, 40), 8)  # the raw P3 numbers differ ...
    decoded = _decode(_render(data, "png").data)
    assert decoded.get_typeof("icc-profile-data") == 0
    assert _near(decoded(8, 8), (200, 30, 40), 4)  # ... and are converted back to sRGB


@pytest.mark.parametrize(
    ("image", "fmt", "interpretation", "bands"),
    [
        (_solid(32, 32, (50000, 1000, 20000), deep=True), "png", "srgb", 3),
        (_solid(32, 32, (40000,), deep=True), "png", "b-w", 1),
        (_solid(32, 32, (90,)), "jpeg", "b-w", 1),
        (_solid(32, 32, (90, 200)), "png", "b-w", 2),
        (_solid(32, 32, (90, 200)), "webp", "srgb", 4),
    ],
)
def test_bit_depth_and_grey(image: pyvips.Image, fmt: OutputFormat, interpretation: str, bands: int) -> None:
    decoded = _decode(_render(image.pngsave_buffer(), fmt).data)
    assert (decoded.format, decoded.interpretation, decoded.bands) == ("uchar", interpretation, bands)


def test_sixteen_bit_values_are_scaled() -> None:
    data = _solid(32, 32, (65535, 0, 32896), deep=True).pngsave_buffer()
    assert _decode(data).format == "ushort"
    assert _near(_decode(_render(data, "png").data)(4, 4), (255, 0, 128), 1)


def _half_transparent() -> bytes:
    """Left half fully transparent (green underneath), right half opaque red."""
    return _solid(32, 32, (0, 255, 0, 0)).join(_solid(32, 32, (255, 0, 0, 255)), "horizontal").pngsave_buffer()


@pytest.mark.parametrize("fmt", FORMATS)
def test_alpha_is_kept_or_flattened(fmt: OutputFormat) -> None:
    decoded = _decode(_render(_half_transparent(), fmt, background="0000ff").data)
    if fmt == "jpeg":
        assert decoded.bands == 3
        assert _near(decoded(8, 16), (0, 0, 255))
        assert _near(decoded(56, 16), RED)
    else:
        assert decoded.hasalpha()
        assert decoded(8, 16)[3] == 0
        assert _near(decoded(56, 16), (*RED, 255))


def test_grey_alpha_flattens_onto_colour_background() -> None:
    data = _solid(16, 16, (0, 0)).pngsave_buffer()
    decoded = _decode(_render(data, "jpeg", background="ff0000").data)
    assert decoded.bands == 3
    assert _near(decoded(8, 8), RED)


def test_real_alpha_png() -> None:
    kept = _decode(_render(_read(ALPHA_PNG), "png", width=256).data)
    assert (kept.width, kept.height, kept.bands) == (256, 192, 4)
    assert kept[3].min() < 255
    flat = _decode(_render(_read(ALPHA_PNG), "jpeg", width=256).data)
    assert flat.bands == 3


def test_palette_png_stays_palette() -> None:
    palette_source = _quadrants(64, 48).pngsave_buffer(palette=True)
    assert _decode(palette_source).get_typeof("palette") != 0
    assert _decode(_render(palette_source, "png", width=32).data).get_typeof("palette") != 0
    assert _decode(_render(_quadrants(64, 48).pngsave_buffer(), "png", width=32).data).get_typeof("palette") == 0


def test_blur_changes_pixels() -> None:
    sharp = _decode(_render(_quadrants_jpeg(), "png").data)
    blurred = _decode(_render(_quadrants_jpeg(), "png", blur=8.0).data)
    assert (blurred.width, blurred.height) == (400, 300)
    assert (sharp - blurred).abs().max() > 40
    assert _near(blurred(100, 75), RED)  # far from the edges nothing changes
    assert not _near(blurred(199, 75), sharp(199, 75), 20)  # at the red/green edge, everything does


def test_quality_changes_size() -> None:
    low = _render(_read(SHARP_JPEG), "jpeg", width=640, quality=30).data
    high = _render(_read(SHARP_JPEG), "jpeg", width=640, quality=90).data
    assert len(low) < len(high) / 2


# --- formats, metadata, animation ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_output_formats(fmt: OutputFormat) -> None:
    result = _render(_read(SHARP_JPEG), fmt, width=320)
    expected_sniff = "avif" if fmt == "avif" else fmt
    assert sniff_format(result.data) == expected_sniff
    decoded = _decode(result.data)
    assert decoded.get("vips-loader") == LOADERS[fmt]
    assert (decoded.width, decoded.height) == (320, 261) == (result.width, result.height)
    assert decoded.interpretation == "srgb"
    assert result.format == fmt


def _spy_jpeg() -> bytes:
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        b'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" dc:creator="SecretAuthor"/></rdf:RDF>'
        b"</x:xmpmeta>"
    )
    image = _with_fields(
        _quadrants(64, 48),
        exif_ifd0_Make="SpyCam",
        exif_ifd3_GPSLatitudeRef="N",
        exif_ifd3_GPSLatitude="51/1 30/1 0/1",
        xmp_data=xmp,
        iptc_data=b"\x1c\x02\x50\x00\x0bSecretOwner",
    )
    return image.jpegsave_buffer(keep="all")


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_is_stripped(fmt: OutputFormat) -> None:
    source = _spy_jpeg()
    assert {"exif-data", "xmp-data", "exif-ifd3-GPSLatitude"} <= set(_decode(source).get_fields())
    assert all(marker in source for marker in (b"Exif", b"SpyCam", b"SecretAuthor", b"SecretOwner"))
    out = _render(source, fmt, width=32).data
    fields = set(_decode(out).get_fields())
    assert not fields & {"exif-data", "xmp-data", "iptc-data", "icc-profile-data"}
    assert not [field for field in fields if field.startswith("exif-")]
    for marker in (b"Exif", b"SpyCam", b"SecretAuthor", b"SecretOwner", b"GPS", b"xmpmeta"):
        assert marker not in out


@pytest.mark.parametrize(
    ("path", "fmt", "frames"),
    [
        (ANIMATED_GIF, "gif", 10),
        (ANIMATED_WEBP, "webp", 10),
        (ANIMATED_GIF, "webp", 10),
        (ANIMATED_WEBP, "gif", 10),
        (ANIMATED_GIF, "jpeg", 1),
        (ANIMATED_GIF, "png", 1),
        (ANIMATED_WEBP, "avif", 1),
    ],
)
def test_animation(path: Path, fmt: OutputFormat, frames: int) -> None:
    result = _render(_read(path), fmt, width=100)
    assert (result.width, result.height, result.frames) == (100, 77, frames)
    decoded = _decode(result.data, animated=fmt in ("gif", "webp"))
    assert (decoded.get("n-pages") if decoded.get_typeof("n-pages") else 1) == frames
    assert (decoded.width, decoded.height) == (100, 77 * frames)
    if frames > 1:
        assert decoded.get("page-height") == 77
        assert decoded.get("loop") == 3
        assert decoded.get("delay") == [3000] * 9 + [15000]


@pytest.mark.parametrize(("fit", "size"), [("cover", (100, 100)), ("contain", (100, 100)), ("fill", (50, 100))])
def test_animation_crop_and_pad_every_frame(fit: str, size: tuple[int, int]) -> None:
    result = _render(_read(ANIMATED_GIF), "gif", width=size[0], height=size[1], fit=fit, blur=1.0)
    assert (result.width, result.height, result.frames) == (*size, 10)
    decoded = _decode(result.data, animated=True)
    assert (decoded.get("n-pages"), decoded.get("page-height"), decoded.width) == (10, size[1], size[0])


# --- deadline --------------------------------------------------------------------------------------------------


def test_deadline_kills_the_render() -> None:
    with pytest.raises(errors.RenderTimeout) as raised:
        _render(_read(PHOTO), "jpeg", PipelineLimits(timeout_seconds=0.0001), width=640)
    assert raised.value.status == 503


def test_deadline_interrupts_a_running_evaluation() -> None:
    # A heavy blur at full size takes ~0.3 s here; the kill must land mid-evaluation.
    with pytest.raises(errors.RenderTimeout):
        _render(_read(PHOTO), "jpeg", PipelineLimits(timeout_seconds=0.05), blur=50.0)


def test_deadline_applies_to_probe() -> None:
    with pytest.raises(errors.RenderTimeout):
        probe(_read(PHOTO), PipelineLimits(timeout_seconds=0.0001))


# --- decoder bombs, and leniency where browsers are lenient ------------------------------------------------------


def test_scan_bomb_is_refused_before_decoding() -> None:
    for attempt in (lambda: probe(scan_bomb(), LIMITS), lambda: _render(scan_bomb(), width=64)):
        started = time.perf_counter()
        with pytest.raises(errors.TooComplex):
            attempt()
        assert time.perf_counter() - started < 1.0  # ~2 ms; decoding it costs ~16 s of CPU


@pytest.mark.parametrize("step", ["probe", "render", "cached decode"])
def test_deadline_holds_while_libjpeg_consumes_scans(step: str) -> None:
    # libjpeg consumes every scan inside one call that never reaches libvips' eval callback; the decode reads its
    # input through the deadline's source, which stops feeding it once the deadline has passed.
    limits = PipelineLimits(max_jpeg_scans=20_000, timeout_seconds=1.0)
    cache: SharedByteLRU[tuple[str, int], pyvips.Image] = SharedByteLRU(256 << 20, decoded_bytes)
    started = time.perf_counter()
    with pytest.raises(errors.RenderTimeout):
        if step == "probe":
            probe(scan_bomb(), limits)
        else:
            decoded = DecodedSource(cache, "bomb") if step == "cached decode" else None
            render(scan_bomb(), TransformSpec(width=256), "jpeg", limits, decoded)
    elapsed = time.perf_counter() - started
    print(f"\n{step} of the 10,000-scan bomb, 1 s deadline: RenderTimeout after {elapsed:.2f} s")
    assert elapsed < limits.timeout_seconds + 1.0
    assert len(cache) == 0


def _without_trailer(data: bytes) -> bytes:
    assert data.endswith(b"\x3b")
    return data[:-1]


@pytest.mark.parametrize("path", [ANIMATED_GIF])
def test_gif_without_trailer_is_accepted_and_renders_like_the_whole_file(path: Path) -> None:
    whole, cut = _read(path), _without_trailer(_read(path))
    assert probe(cut, LIMITS) == probe(whole, LIMITS)
    assert _render(cut, "gif", width=100).data == _render(whole, "gif", width=100).data
    with pytest.raises(errors.UndecodableImage):
        probe(cut[:-1], LIMITS)  # the last frame's data is cut: truly truncated


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("garbage", [b"trailing-garbage" * 100, b"\xff\xd8\xff\xda\x00\x08" + bytes(5000)])
def test_jpeg_with_trailing_garbage_is_accepted_and_the_output_is_clean(progressive: bool, garbage: bytes) -> None:
    clean = bytes(pyvips.Image.new_from_file(str(SHARP_JPEG), shrink=4).jpegsave_buffer(interlace=progressive))
    data = clean + garbage
    assert probe(data, LIMITS) == probe(clean, LIMITS)
    for fmt in ("jpeg", "png", "webp"):
        out = _render(data, fmt, width=200).data  # type: ignore[arg-type]
        assert out == _render(clean, fmt, width=200).data  # type: ignore[arg-type]
        assert garbage[:16] not in out
    with pytest.raises(errors.UndecodableImage):
        probe(clean[: len(clean) // 2], LIMITS)


# --- decoders that no callback interrupts, in a killable child process --------------------------------------------


ISOLATE_ALL = PipelineLimits(isolate_pixels=0)


@pytest.mark.parametrize("suffix", [".webp", ".avif"])
def test_isolated_decodes_answer_like_in_process_ones(suffix: str) -> None:
    data = bytes(_quadrants(400, 300).write_to_buffer(suffix))
    assert probe(data, ISOLATE_ALL) == probe(data, LIMITS)
    for fmt in ("jpeg", "webp"):
        isolated = _render(data, fmt, ISOLATE_ALL, width=200, blur=1.0)  # type: ignore[arg-type]
        local = _render(data, fmt, LIMITS, width=200, blur=1.0)  # type: ignore[arg-type]
        assert replace(isolated, pixel_seconds=0, encode_seconds=0) == replace(local, pixel_seconds=0, encode_seconds=0)
    cut = bytes(_quadrants(400, 300).webpsave_buffer())
    with pytest.raises(errors.UndecodableImage):  # raised in the child, same problem in the parent
        probe(cut[: len(cut) * 3 // 4], ISOLATE_ALL)


@pytest.mark.parametrize("suffix", [".webp", ".avif"])
def test_deadline_kills_an_isolated_decode_and_the_next_one_runs(suffix: str) -> None:
    data, small = slow_frame(suffix), bytes(_quadrants(64, 48).write_to_buffer(suffix))
    assert _render(small, "jpeg", ISOLATE_ALL, width=32).width == 32  # a child is ready
    figures = {}
    for name, isolate in [("in-process", 10**9), ("child", 0)]:
        limits = PipelineLimits(timeout_seconds=0.1, isolate_pixels=isolate)
        started = time.perf_counter()
        with pytest.raises(errors.RenderTimeout):
            render(data, TransformSpec(width=256), "jpeg", limits)
        figures[name] = time.perf_counter() - started
    print(f"\n{suffix} 4000x4000 noise, 0.1 s deadline: RenderTimeout after {figures['child']:.2f} s in a child, "
          f"{figures['in-process']:.2f} s in-process")  # fmt: skip
    assert figures["child"] < 0.1 + 1.0
    assert figures["child"] < figures["in-process"]  # in-process, the decode runs to its end whatever the deadline
    assert _render(small, "jpeg", ISOLATE_ALL, width=32).width == 32  # a new child replaced the killed one
