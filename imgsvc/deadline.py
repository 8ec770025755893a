"""The render deadline: stops libvips evaluation and decoder reads once a render's time is up."""

from __future__ import annotations

import time

import pyvips


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
