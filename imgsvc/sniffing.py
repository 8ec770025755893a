"""Format sniffing: the allowed source format an original's magic bytes announce, and the loader it needs."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from imgsvc.spec import SourceFormat

# The loader (`vips-loader`) that must have opened each sniffed format; anything else is a 415.
EXPECTED_LOADER: Mapping[SourceFormat, str] = MappingProxyType(
    {
        "jpeg": "jpegload_buffer",
        "png": "pngload_buffer",
        "webp": "webpload_buffer",
        "gif": "gifload_buffer",
        "avif": "heifload_buffer",
        "heif": "heifload_buffer",
        "tiff": "tiffload_buffer",
    }
)

_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1"})


def sniff_format(head: bytes) -> SourceFormat | None:
    """The allowed format that the first 32 bytes announce, or None."""
    head = head[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[4:8] == b"ftyp":
        # ISO-BMFF `ftyp` box: major brand at 8, minor version at 12, compatible brands from 16 to the box end.
        end = min(len(head), int.from_bytes(head[:4], "big"))
        brands = {head[8:12], *(head[i : i + 4] for i in range(16, end - 3, 4))}
        if brands & _AVIF_BRANDS:
            return "avif"
        if brands & _HEIF_BRANDS:
            return "heif"
    return None
