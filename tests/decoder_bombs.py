"""Decoder bombs and odd-but-valid files, built from scratch here (no binary fixtures)."""

from __future__ import annotations

import functools
import struct
import zlib

import pyvips


def progressive_grey_jpeg(size: int) -> bytes:
    """A real progressive grey JPEG (a diagonal ramp), as libjpeg's default progression writes it."""
    xy = pyvips.Image.xyz(size, size)
    ramp = ((xy[0] + xy[1]) * (255 / (2 * size))).cast("uchar").copy(interpretation="b-w")
    return bytes(ramp.jpegsave_buffer(Q=75, interlace=True, keep="none"))


@functools.cache
def scan_bomb(scans: int = 10_000, size: int = 4096) -> bytes:
    """A valid progressive JPEG followed by `scans` more AC scans (Ss=1, Se=63, Ah=Al=0) of a single EOB run.

    Each appended scan is 40 bytes, yet libjpeg visits every 8x8 block of the image for it. A full-precision
    scan may legally repeat (libjpeg only checks that Ah matches the bits already decoded, here 0), so libjpeg
    decodes it without a warning and the image is unchanged: 10,000 scans of 4096x4096 are ~400 KB.
    """
    base = progressive_grey_jpeg(size)
    blocks = (size // 8) ** 2
    assert base.endswith(b"\xff\xd9") and size % 1024 == 0 and blocks % 16384 == 0
    component = base[base.index(b"\xff\xc2") + 10]  # the SOF2's first (only) component id
    # AC table 1: a single 1-bit code for EOB14 (0xE0), a run of 2^14 blocks plus 14 extra bits (here 0).
    table = bytes([0x11, 1, *[0] * 15, 0xE0])
    dht = b"\xff\xc4" + struct.pack(">H", 2 + len(table)) + table
    sos = b"\xff\xda" + struct.pack(">HBBBBBB", 8, 1, component, 0x01, 1, 63, 0x00)
    # 15 zero bits per EOB14 run, padded with 1 bits to a whole byte: never a 0xFF, nothing to stuff.
    bits = blocks // 16384 * 15
    padding = -bits % 8
    entropy = ((1 << padding) - 1).to_bytes((bits + padding) // 8, "big")
    return base[:-2] + dht + (sos + entropy) * scans + b"\xff\xd9"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with(extra: list[bytes], *, idat_pieces: int = 1, size: int = 16) -> bytes:
    """A valid grey PNG with `extra` chunks before its image data, which is split into `idat_pieces` chunks."""
    ihdr = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\x00" + bytes(range(size)) for _ in range(size)))
    step = -(-len(pixels) // idat_pieces)
    idats = [png_chunk(b"IDAT", pixels[i : i + step]) for i in range(0, len(pixels), step)]
    return b"".join([b"\x89PNG\r\n\x1a\n", png_chunk(b"IHDR", ihdr), *extra, *idats, png_chunk(b"IEND", b"")])


def ztxt(keyword: bytes, text: bytes) -> bytes:
    return png_chunk(b"zTXt", keyword + b"\x00\x00" + zlib.compress(text, 9))


def gif(frames: int = 2, size: int = 8) -> bytes:
    strip = pyvips.Image.arrayjoin(
        [pyvips.Image.black(size, size, bands=3).linear(1, [40 * i % 256, 80, 200]) for i in range(frames)], across=1
    )
    strip = strip.cast("uchar").copy(interpretation="srgb")
    strip.set_type(pyvips.GValue.gint_type, "page-height", size)
    return bytes(strip.gifsave_buffer(keep="none"))


def tiff_pages(pages: int) -> bytes:
    strip = pyvips.Image.black(4, 4 * pages).cast("uchar").copy(interpretation="b-w")
    strip.set_type(pyvips.GValue.gint_type, "page-height", 4)
    return bytes(strip.tiffsave_buffer(keep="none"))


@functools.cache
def slow_frame(suffix: str, size: int = 4000) -> bytes:
    """Colour noise as lossy WebP or AVIF: one frame whose decode takes long (~0.7 s here at 16 MP)."""
    noise = pyvips.Image.gaussnoise(size, size, sigma=40, mean=128).cast("uchar")
    image = noise.bandjoin([noise.rot180(), noise.fliphor()]).copy(interpretation="srgb")
    return bytes(image.write_to_buffer(suffix, effort=0, Q=30 if suffix == ".avif" else 50))
