"""Byte-bounded LRU caches and single-flight.

`ByteLRU` (event loop only) holds rendered variants or hot originals; `SharedByteLRU` is its thread-safe
twin for decoded pixels, used from render workers; `SingleFlight` runs N identical concurrent misses once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from cachetools import LRUCache

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """An LRU bounded by the total size of its values, as measured by `size_of`.

    Each entry also remembers a group (the blob's sha256 for what is cached by content, the image id for
    remembered requests) so that a delete evicts all of it at once.
    """

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._lru: LRUCache[K, tuple[str, V]] | None = (
            LRUCache(maxsize=max_bytes, getsizeof=lambda entry: max(1, size_of(entry[1]))) if max_bytes > 0 else None
        )
        self._groups: dict[str, set[K]] = {}

    def get(self, key: K) -> V | None:
        if self._lru is None:
            return None
        entry = self._lru.get(key)
        return None if entry is None else entry[1]

    def put(self, key: K, value: V, group: str = "") -> None:
        if self._lru is None or self._size_of(value) > self.max_bytes:
            return
        self._lru[key] = (group, value)
        self._groups.setdefault(group, set()).add(key)
        self._prune_groups(group)

    def pop(self, key: K) -> None:
        if self._lru is not None:
            self._lru.pop(key, None)  # its group index forgets it when pruned

    def evict_group(self, group: str) -> int:
        if self._lru is None:
            return 0
        keys = self._groups.pop(group, set())
        for key in keys:
            self._lru.pop(key, None)
        return len(keys)

    def clear(self) -> None:
        if self._lru is not None:
            self._lru.clear()
        self._groups.clear()

    def _prune_groups(self, group: str) -> None:
        # The LRU drops entries silently; forget keys it no longer holds so the index stays bounded.
        assert self._lru is not None
        if len(self._groups) > 2 * len(self._lru) + 64:
            self._groups = {g: {k for k in ks if k in self._lru} for g, ks in self._groups.items()}
            self._groups = {g: ks for g, ks in self._groups.items() if ks}
        else:
            keys = self._groups.get(group)
            if keys and len(keys) > 64:
                keys.intersection_update(k for k in list(keys) if k in self._lru)

    @property
    def current_bytes(self) -> int:
        return 0 if self._lru is None else int(self._lru.currsize)

    def __len__(self) -> int:
        return 0 if self._lru is None else len(self._lru)


class SharedByteLRU(ByteLRU[K, V]):
    """A `ByteLRU` that worker threads may share: every operation holds one lock (they are all short)."""

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        super().__init__(max_bytes, size_of)
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            return super().get(key)

    def put(self, key: K, value: V, group: str = "") -> None:
        with self._lock:
            super().put(key, value, group)

    def evict_group(self, group: str) -> int:
        with self._lock:
            return super().evict_group(group)

    def clear(self) -> None:
        with self._lock:
            super().clear()


class SingleFlight(Generic[K, V]):
    """Concurrent calls with the same key share one run of the producer.

    The producer runs in its own task, so a cancelled waiter never cancels the
    others; failures reach every waiter and are not remembered.
    """

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Task[V]] = {}

    async def run(self, key: K, producer: Callable[[], Awaitable[V]]) -> V:
        task = self._running.get(key)
        if task is None:
            task = asyncio.ensure_future(producer())
            self._running[key] = task
            task.add_done_callback(lambda done: self._finish(key, done))
        return await asyncio.shield(task)

    def _finish(self, key: K, task: asyncio.Task[V]) -> None:
        self._running.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here so that a failure nobody awaited is not logged as lost

    def __len__(self) -> int:
        return len(self._running)
