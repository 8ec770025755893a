"""libvips hardening for untrusted input: loader allow-list, magic-byte sniffing, and the render deadline.

Follows reference/conventions.md §5; `imgsvc.pipeline` is the only user and re-exports the public names.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from types import MappingProxyType

import pyvips

from imgsvc.spec import SourceFormat

MIN_LIBVIPS = (8, 15)  # `keep=` on savers; blocking calls are silent no-ops before 8.13

# The only loader classes left runnable (each unblocks its file/buffer/source subclasses). Everything else,
# including svg, pdf, magick, matrix/csv/vips and uhdr, stays blocked, and libvips then skips it when it
# looks for a loader: an SVG body fails with "not in a known format".
ALLOWED_LOADER_CLASSES = (
    "VipsForeignLoadJpeg",
    "VipsForeignLoadPng",
    "VipsForeignLoadWebp",
    "VipsForeignLoadNsgif",
    "VipsForeignLoadHeif",
    "VipsForeignLoadTiff",
)

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


_configured: str | None = None
_configuring = threading.Lock()


def configure_libvips() -> str:
    """Harden libvips for untrusted input (idempotent, thread-safe) and return its version, e.g. "8.18.7".

    Raises RuntimeError when libvips is older than 8.15.
    """
    global _configured
    with _configuring:  # a second thread must not re-block the loaders while the first has unblocked them
        if _configured is None:
            _configured = _configure()
        return _configured


def _configure() -> str:
    version = f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}"
    if not pyvips.at_least_libvips(*MIN_LIBVIPS):
        raise RuntimeError(f"libvips >= {MIN_LIBVIPS[0]}.{MIN_LIBVIPS[1]} is required, found {version}")
    # VIPS_BLOCK_UNTRUSTED is read by vips_init(), which already ran on `import pyvips`: set it for child
    # processes and make the same call at run time.
    os.environ["VIPS_BLOCK_UNTRUSTED"] = "1"
    pyvips.block_untrusted_set(True)
    pyvips.operation_block_set("VipsForeignLoad", True)
    for name in ALLOWED_LOADER_CLASSES:
        pyvips.operation_block_set(name, False)
    # The operation cache only helps repeated identical calls; for a proxy it is memory and open files.
    pyvips.cache_set_max(0)
    pyvips.cache_set_max_mem(0)
    pyvips.cache_set_max_files(0)
    return version


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


class Deadline:
    """Kills libvips evaluation of the images it watches once `seconds` have passed since creation.

    Python cannot stop a thread; the eval callback's `set_kill` and a refused read of `source()` are the only
    ways to stop the C computation. Progress signals propagate to every image derived from a watched one, so
    watching the thumbnail covers decode, resize, crop, blur and the pixel side of encoding (not libheif/libwebp's
    own compression pass); decoding from `source()` also covers a decoder's long calls between two callbacks.
    """

    __slots__ = ("_watched", "expires")

    def __init__(self, seconds: float) -> None:
        self.expires = time.monotonic() + seconds
        # pyvips frees a signal's callback handle with the Python object, while the C pipeline derived from it
        # still signals: keep the watched images and sources alive as long as the deadline (one render).
        self._watched: list[pyvips.Image | pyvips.SourceCustom] = []

    @classmethod
    def until(cls, expires: float) -> Deadline:
        """A deadline at `expires` on the `time.monotonic()` clock (shared by every process of the machine)."""
        deadline = cls(0.0)
        deadline.expires = expires
        return deadline

    def expired(self) -> bool:
        return time.monotonic() >= self.expires

    def watch(self, image: pyvips.Image) -> pyvips.Image:
        image.set_progress(True)
        image.signal_connect("eval", self._on_eval)
        self._watched.append(image)
        return image

    def source(self, data: bytes) -> pyvips.SourceCustom:
        """`data` as a libvips source that reports the end of the data once the deadline has passed.

        A decoder can run long between two eval callbacks: libjpeg consumes every scan of a progressive JPEG in
        one call. It reads its input 4 KiB at a time meanwhile, so a refused read stops it (as truncated data).
        """
        view, position = memoryview(data), 0
        source = pyvips.SourceCustom()

        def read(size: int) -> bytes:
            nonlocal position
            if self.expired():
                return b""
            chunk = view[position : position + size]
            position += len(chunk)
            return bytes(chunk)

        def seek(offset: int, whence: int) -> int:
            nonlocal position
            position = (0, position, len(data))[whence] + offset
            return position

        source.on_read(read)
        source.on_seek(seek)
        self._watched.append(source)
        return source

    def release(self) -> None:
        """Drop the watched images once the render is over. Each one holds the callback, which holds this
        object: without this, the cycle keeps whole decoded images alive until Python's cyclic GC runs."""
        self._watched.clear()

    def _on_eval(self, image: pyvips.Image, _progress: object) -> None:
        if self.expired():
            image.set_kill(True)
