"""Fail soft: while a blob store is unreachable, one request at a time probes it and the others get 503 at
once; its state changes (unreachable, full, back) are logged once each, never per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import TypeVar

from imgsvc.errors import BlobNotFound, InsufficientStorage, Unavailable
from imgsvc.storage import BlobStore, BlobTooLarge

log = logging.getLogger("imgsvc.storage")
T = TypeVar("T")
RETRY_AFTER = 2  # seconds; a probe (attempts x timeouts) usually ends within it


class GuardedStore:
    """Wraps a backend that raises `Unavailable` / `InsufficientStorage` for its own faults (and turns
    anything else it lets through into `Unavailable`)."""

    def __init__(self, inner: BlobStore, name: str) -> None:
        self.inner = inner
        self.name = name
        self.down_since: float | None = None
        self.reason = ""
        self.full = False
        self._probing = False

    async def _guard(self, operation: Callable[[], Awaitable[T]], *, probe_always: bool = False) -> T:
        probe = False
        if self.down_since is not None and not probe_always:
            if self._probing:
                raise Unavailable(f"the blob store is unavailable ({self.reason})", retry_after=RETRY_AFTER)
            self._probing = probe = True
        try:
            result = await operation()
        except (BlobNotFound, BlobTooLarge, ValueError, StopAsyncIteration):
            self._reachable()  # the store answered; the blob or the key is the problem
            raise
        except InsufficientStorage as exc:
            self._reachable()
            self._became_full(exc.detail)
            raise
        except Unavailable as exc:
            self._unreachable(exc.detail)
            raise Unavailable(exc.detail, retry_after=RETRY_AFTER) from None
        except Exception as exc:  # a backend let an unclassified error through: still a 503, logged once
            self._unreachable(f"{type(exc).__name__}: {exc}", exc_info=True)
            raise Unavailable(f"the blob store failed ({type(exc).__name__})", retry_after=RETRY_AFTER) from None
        finally:
            if probe:
                self._probing = False
        self._reachable()
        return result

    def _unreachable(self, reason: str, *, exc_info: bool = False) -> None:
        self.reason = reason
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("blob store %s unreachable: %s; answering 503 until it recovers", self.name, reason,
                        exc_info=exc_info)  # fmt: skip

    def _reachable(self) -> None:
        if self.down_since is not None:
            log.warning("blob store %s reachable again after %.1f s", self.name, time.monotonic() - self.down_since)
            self.down_since = None

    def _became_full(self, reason: str) -> None:
        if not self.full:
            self.full = True
            log.warning("blob store %s is full (%s): uploads answer 507 until space is freed", self.name, reason)

    async def put(self, key: str, data: bytes) -> None:
        await self._guard(lambda: self.inner.put(key, data))
        if self.full:
            self.full = False
            log.warning("blob store %s accepts writes again", self.name)

    async def get(self, key: str, max_bytes: int) -> bytes:
        return await self._guard(lambda: self.inner.get(key, max_bytes))

    async def exists(self, key: str) -> bool:
        return await self._guard(lambda: self.inner.exists(key))

    async def delete(self, key: str) -> None:
        await self._guard(lambda: self.inner.delete(key))

    async def list_blobs(self) -> AsyncIterator[tuple[str, datetime]]:
        blobs = aiter(self.inner.list_blobs())
        while True:
            try:
                item = await self._guard(lambda: anext(blobs), probe_always=True)
            except StopAsyncIteration:
                return
            yield item

    async def check(self) -> None:
        """Readiness always asks the store itself, so a probe's success also ends an outage."""
        await self._guard(self.inner.check, probe_always=True)

    async def close(self) -> None:
        await self.inner.close()
