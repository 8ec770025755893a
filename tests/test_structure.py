"""Structural checks from the bytes alone, on real images, files built here and bombs; libvips confirms what
counts as a valid file."""

from __future__ import annotations

import struct
import time
import zlib

import pytest
import pyvips

from imgsvc import errors
from imgsvc.structure import Structure, StructureLimits, check
from tests.conftest import FLICKR, GIF_ANIMATED, PHOTO, PNG_ALPHA
from tests.decoder_bombs import gif, png_chunk, png_with, progressive_grey_jpeg, scan_bomb, tiff_pages, ztxt

LIMITS = StructureLimits()


def _decodes(data: bytes) -> bool:
    try:
        pyvips.Image.new_from_buffer(data, "", fail_on="warning").avg()
    except pyvips.Error:
        return False
    return True


def _colour_jpeg(**options: object) -> bytes:
    image = pyvips.Image.new_from_file(str(FLICKR), shrink=8)
    return bytes(image.jpegsave_buffer(keep="none", **options))


@pytest.mark.parametrize(
    ("data", "scans"),
    [
        (FLICKR.read_bytes(), 1),
        (PHOTO.read_bytes(), 1),
        (_colour_jpeg(interlace=True), 10),  # libjpeg's default progression for YCbCr
        (progressive_grey_jpeg(64), 6),
        (_colour_jpeg(restart_interval=1), 1),  # RSTn markers inside the entropy-coded data
        (_colour_jpeg(interlace=True, restart_interval=2), 10),
        (scan_bomb(500, 1024), 506),
    ],
)
def test_jpeg_scans_are_counted_like_libjpeg(data: bytes, scans: int) -> None:
    assert _decodes(data)
    assert check(data, "jpeg", StructureLimits(max_jpeg_scans=1000)) == Structure(scans)


def test_stuffed_bytes_and_marker_lookalikes_are_not_scans() -> None:
    base = _colour_jpeg()
    # An APP15 segment whose payload holds SOS-like bytes: skipped by its length, as libjpeg does.
    app = b"\xff\xda\x00\x08" * 100
    data = base[:2] + b"\xff\xef" + struct.pack(">H", 2 + len(app)) + app + base[2:]
    assert b"\xff\x00" in base[base.index(b"\xff\xda") :]  # the entropy-coded data has stuffed 0xFF bytes
    assert _decodes(data)
    assert check(data, "jpeg", LIMITS).parts == 1
    # After EOI nothing counts, even SOS markers (a JPEG + something polyglot).
    assert check(base + b"\xff\xda\x00\x08" * 500, "jpeg", LIMITS).parts == 1


def test_the_scan_bomb_is_valid_and_refused_in_milliseconds() -> None:
    bomb = scan_bomb()
    assert 350_000 < len(bomb) < 500_000
    header = pyvips.Image.new_from_buffer(bomb, "", fail_on="warning")
    assert (header.width, header.height, header.get("jpeg-multiscan")) == (4096, 4096, 1)
    assert _decodes(scan_bomb(200, 1024))  # the same construction, decoded in full without a warning
    started = time.perf_counter()
    with pytest.raises(errors.TooComplex) as raised:
        check(bomb, "jpeg", LIMITS)
    elapsed = time.perf_counter() - started
    print(f"\n10,000-scan bomb refused by the structure check in {elapsed * 1000:.2f} ms")
    assert raised.value.status == 422 and raised.value.type == "/problems/too-complex"
    assert "100 scans" in raised.value.detail
    assert check(bomb, "jpeg", StructureLimits(max_jpeg_scans=20_000)).parts == 10_006
    assert elapsed < 1.0


@pytest.mark.parametrize(
    ("extra", "pieces", "refused"),
    [
        ([png_chunk(b"tEXt", b"Comment\x00hello")] * 9997, 1, False),  # with IHDR, IDAT and IEND: 10,000
        ([png_chunk(b"tEXt", b"Comment\x00hello")] * 9998, 1, True),
        ([], 3000, False),  # image data split into many IDATs is ordinary
        ([ztxt(b"Comment", b"x" * 7_000_000)], 1, False),
        ([ztxt(b"Comment", b"x" * 9_000_000)], 1, True),  # ~9 KB that inflate to 9 MB
        ([png_chunk(b"tEXt", b"Comment\x00" + b"y" * 5_000_000)] * 2, 1, True),
        ([png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x01\x00en\x00\x00" + zlib.compress(b"x" * 9_000_000))], 1, True),
    ],
)
def test_png_chunk_and_text_limits(extra: list[bytes], pieces: int, refused: bool) -> None:
    data = png_with(extra, idat_pieces=pieces, size=64)
    assert _decodes(data)
    if refused:
        with pytest.raises(errors.TooComplex):
            check(data, "png", LIMITS)
    else:
        assert check(data, "png", LIMITS).parts >= 2  # IHDR, IEND and the extra chunks


def test_real_png_passes() -> None:
    assert check(PNG_ALPHA.read_bytes(), "png", LIMITS).parts >= 2


@pytest.mark.parametrize(
    ("cut", "truncated"),
    [
        (0, False),
        (1, False),  # no trailer: every browser shows it, libnsgif decodes it in full
        (2, True),  # the last image block's terminator is missing
        (20, True),
    ],
)
def test_gif_truncation_is_an_image_block_cut_short(cut: int, truncated: bool) -> None:
    data = gif(3)
    assert data.endswith(b"\x00\x3b")
    cut_data = data[: len(data) - cut]
    assert check(cut_data, "gif", LIMITS) == Structure(3, truncated)


def test_gif_with_trailing_bytes_is_complete() -> None:
    data = GIF_ANIMATED.read_bytes()
    assert check(data + b"<script>alert(1)</script>", "gif", LIMITS) == Structure(10)


def test_gif_frames_are_counted_before_decoding() -> None:
    data = gif(12)
    assert check(data, "gif", StructureLimits(max_frames=12)).parts == 12
    with pytest.raises(errors.TooManyFrames):
        check(data, "gif", StructureLimits(max_frames=11))


def test_tiff_directories_are_counted_and_a_loop_ends() -> None:
    data = tiff_pages(30)
    assert pyvips.Image.new_from_buffer(data, "").get("n-pages") == 30
    assert check(data, "tiff", LIMITS).parts == 30
    with pytest.raises(errors.TooManyFrames):
        check(data, "tiff", StructureLimits(max_frames=29))
    first = int.from_bytes(data[4:8], "little" if data[:2] == b"II" else "big")
    looped = bytearray(tiff_pages(1))
    order = "little" if looped[:2] == b"II" else "big"
    entries = int.from_bytes(looped[first : first + 2], order)
    next_at = first + 2 + 12 * entries
    looped[next_at : next_at + 4] = first.to_bytes(4, order)  # the only IFD points back to itself
    assert check(bytes(looped), "tiff", LIMITS).parts == 1


@pytest.mark.parametrize("fmt", ["webp", "avif", "heif"])
def test_other_formats_have_no_structure_check(fmt: str) -> None:
    assert check(b"anything", fmt, LIMITS) == Structure(0)  # type: ignore[arg-type]
