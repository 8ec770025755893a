"""Cheap structural checks of an original's bytes before any decoder sees them (no pixels, no pyvips).

Decoder bombs are small files whose structure makes a decoder loop: JPEG scans, PNG chunks, GIF frames, TIFF IFDs.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

from imgsvc.errors import TooComplex, TooManyFrames
from imgsvc.spec import SourceFormat


@dataclass(frozen=True, slots=True)
class StructureLimits:
    max_jpeg_scans: int = 100
    max_png_chunks: int = 10_000
    max_png_text_bytes: int = 8_000_000  # tEXt, zTXt and iTXt, decompressed, summed
    max_frames: int = 100  # GIF image blocks and TIFF IFDs


@dataclass(frozen=True, slots=True)
class Structure:
    parts: int  # JPEG scans, PNG chunks, GIF frames or TIFF IFDs; 0 for other formats
    truncated: bool = False  # the data ends inside image data (GIF only; the other decoders detect it)


# A marker inside or after entropy-coded data: 0xFF followed by anything but a stuffed 0x00, RST0-7 or a fill
# 0xFF, found in C so that a scan costs no Python loop. Measured: 1 ms for a 2.3 MB photo, 91 ms for 25 MB of
# 0xFF00 (a literal first byte lets `re` skip ahead; `\xff+` instead made it 40x slower).
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_SOS, _EOI = 0xDA, 0xD9
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field
_PNG_TEXT = frozenset({b"tEXt", b"zTXt", b"iTXt"})


def check(data: bytes, fmt: SourceFormat, limits: StructureLimits) -> Structure:
    """Walk the container structure of `data` (already sniffed as `fmt`) and enforce `limits`.

    Raises TooComplex or TooManyFrames (422). Costs one pass over the bytes, in C for entropy-coded data.
    """
    match fmt:
        case "jpeg":
            return _jpeg(data, limits.max_jpeg_scans)
        case "png":
            return _png(data, limits)
        case "gif":
            return _gif(data, limits.max_frames)
        case "tiff":
            return _tiff(data, limits.max_frames)
    return Structure(0)


def _jpeg(data: bytes, max_scans: int) -> Structure:
    """Count SOS segments the way libjpeg finds markers: segments are skipped by their length, entropy-coded
    data up to the next marker (stuffed 0xFF00 and RSTn belong to the scan), stray bytes between segments too."""
    scans, pos, size = 0, 2, len(data)
    while pos < size:
        found = _MARKER.search(data, pos)
        if found is None:
            break
        marker, pos = data[found.end() - 1], found.end()
        if marker == _EOI:
            break
        if marker in _STANDALONE:
            continue
        if pos + 2 > size:
            break
        length = int.from_bytes(data[pos : pos + 2], "big")
        if marker == _SOS:
            scans += 1
            if scans > max_scans:
                raise TooComplex(f"the jpeg has more than {max_scans} scans")
        pos += length  # after an SOS header, the search skips its entropy-coded data
    return Structure(scans)


def _png(data: bytes, limits: StructureLimits) -> Structure:
    chunks, text, pos, size = 0, 0, 8, len(data)
    while pos + 8 <= size:
        length, kind = struct.unpack_from(">I4s", data, pos)
        start = pos + 8
        pos += 12 + length
        chunks += 1
        if chunks > limits.max_png_chunks:
            raise TooComplex(f"the png has more than {limits.max_png_chunks} chunks")
        if kind in _PNG_TEXT:
            body = data[start : start + length]
            text += _png_text_bytes(kind, body, limits.max_png_text_bytes - text + 1)
            if text > limits.max_png_text_bytes:
                raise TooComplex(f"the png's text chunks exceed {limits.max_png_text_bytes} bytes")
        if kind == b"IEND":
            break
    return Structure(chunks)


def _png_text_bytes(kind: bytes, body: bytes, budget: int) -> int:
    """The text's size once decompressed, decompressing at most `budget` bytes (a zTXt bomb stops there)."""
    keyword, _, rest = body.partition(b"\x00")
    if kind == b"zTXt":
        return len(keyword) + _inflated_size(rest[1:], budget)
    if kind == b"iTXt" and rest[:1] == b"\x01":  # compression flag, method, language\0, translated keyword\0
        language, _, rest = rest[2:].partition(b"\x00")
        translated, _, compressed = rest.partition(b"\x00")
        return len(keyword) + len(language) + len(translated) + _inflated_size(compressed, budget)
    return len(body)


def _inflated_size(compressed: bytes, budget: int) -> int:
    inflater = zlib.decompressobj()
    try:
        return len(inflater.decompress(compressed, max(budget, 1)))
    except zlib.error:
        return len(compressed)  # corrupt: the decoder will say so; its stored size is what it holds


def _gif(data: bytes, max_frames: int) -> Structure:
    """Count image blocks; report truncation when the data ends inside one (a missing trailer is not)."""
    size = len(data)
    if size < 13:
        return Structure(0, truncated=True)
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    frames = 0
    while pos < size:
        introducer = data[pos]
        if introducer == 0x2C:  # image descriptor, optional local colour table, LZW code size, data sub-blocks
            frames += 1
            if frames > max_frames:
                raise TooManyFrames(f"the gif has more than {max_frames} frames")
            if pos + 10 > size:
                return Structure(frames, truncated=True)
            local = data[pos + 9]
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1
            pos = _gif_sub_blocks(data, pos)
            if pos > size:
                return Structure(frames, truncated=True)
        elif introducer == 0x21:  # extension: label, sub-blocks
            pos = _gif_sub_blocks(data, pos + 2)
        else:  # the trailer (0x3B), or bytes after the last block that no decoder reads
            break
    return Structure(frames)


def _gif_sub_blocks(data: bytes, pos: int) -> int:
    """The offset after a chain of data sub-blocks and its terminator; past the end when the data stops first."""
    size = len(data)
    while pos < size:
        length = data[pos]
        pos += 1 + length
        if length == 0:
            return pos
    return size + 1


def _tiff(data: bytes, max_ifds: int) -> Structure:
    """Follow the chain of IFDs (classic and BigTIFF), stopping at a loop or an offset outside the data."""
    order = "little" if data[:2] == b"II" else "big"
    big = int.from_bytes(data[2:4], order) == 43
    word, count_size, entry_size = (8, 8, 20) if big else (4, 2, 12)
    offset = int.from_bytes(data[8:16] if big else data[4:8], order)
    seen: set[int] = set()
    while 0 < offset < len(data) and offset not in seen:
        seen.add(offset)
        if len(seen) > max_ifds:
            raise TooManyFrames(f"the tiff has more than {max_ifds} image directories")
        entries = int.from_bytes(data[offset : offset + count_size], order)
        next_at = offset + count_size + entries * entry_size
        offset = int.from_bytes(data[next_at : next_at + word], order)
    return Structure(len(seen))
