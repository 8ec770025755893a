"""Filesystem blob store: one file per key under a root, written atomically (temporary file, fsync,
rename, directory fsync), so a crash or a full disk never leaves a partial blob. A full disk is
`InsufficientStorage`; any other I/O failure is `Unavailable`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import anyio

from imgsvc.errors import BlobNotFound, InsufficientStorage, Unavailable
from imgsvc.storage import check_size, validate_key

_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno in _FULL:
            raise InsufficientStorage(f"the blob store is full: nothing was stored ({exc.strerror})") from None
        raise Unavailable(f"the blob store failed to {action} ({exc.strerror or type(exc).__name__})") from None


class FilesystemStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"unsafe blob key: {key!r}")
        return path

    async def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        with _translated("write"):
            await anyio.to_thread.run_sync(self._put, path, data)

    @staticmethod
    def _put(path: Path, data: bytes) -> None:
        if path.exists() and path.stat().st_size == len(data):
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    async def get(self, key: str, max_bytes: int) -> bytes:
        path = self._path(key)
        with _translated("read"):
            return await anyio.to_thread.run_sync(self._get, path, max_bytes)

    @staticmethod
    def _get(path: Path, max_bytes: int) -> bytes:
        try:
            with path.open("rb") as src:
                check_size(os.fstat(src.fileno()).st_size, max_bytes)
                return src.read(max_bytes + 1)
        except FileNotFoundError:
            raise BlobNotFound(str(path.name)) from None

    async def exists(self, key: str) -> bool:
        path = self._path(key)
        with _translated("read"):
            return await anyio.to_thread.run_sync(path.is_file)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        with _translated("delete"):
            await anyio.to_thread.run_sync(lambda: path.unlink(missing_ok=True))

    async def list_blobs(self) -> AsyncIterator[tuple[str, datetime]]:
        with _translated("list"):
            found = await anyio.to_thread.run_sync(self._list)
        for item in found:
            yield item

    def _list(self) -> list[tuple[str, datetime]]:
        blobs = []
        for path in self.root.rglob("*"):
            if path.is_file() and not path.name.startswith(".tmp-"):
                modified = datetime.fromtimestamp(path.stat().st_mtime, UTC)
                blobs.append((path.relative_to(self.root).as_posix(), modified))
        return blobs

    async def check(self) -> None:
        """Reachable and writable; a full disk still serves reads, so it does not fail readiness."""
        if not await anyio.to_thread.run_sync(lambda: self.root.is_dir() and os.access(self.root, os.W_OK)):
            raise Unavailable("the blob store's root directory is missing or not writable")

    async def close(self) -> None:
        return None
