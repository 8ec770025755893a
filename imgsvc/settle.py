"""Settling in the background: work offered by a fast first answer runs one job at a time, only when no render
is running or queued, in one thread at the lowest CPU priority (nice 19); the queue is bounded and drops under load."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from imgsvc import metrics
from imgsvc.workers import WorkerPool

log = logging.getLogger("imgsvc.settle")
T = TypeVar("T")
Job = Callable[[], Awaitable[None]]


def _lowest_priority() -> None:
    # Linux nice values are per thread (and inherited by the threads it starts, e.g. libaom's), so a render
    # that arrives while a settle runs gets the CPU first.
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class Settler:
    """At most `queue` jobs (and `max_bytes` of what they hold) wait; one more is dropped, and its variant is
    offered again by the next request for it. A job already waiting under the same key is not queued twice."""

    def __init__(self, pool: WorkerPool, queue: int, max_bytes: int) -> None:
        self.pool = pool
        self.queue = queue
        self.max_bytes = max_bytes
        self._jobs: deque[tuple[str, Job, int]] = deque()
        self._pending: set[str] = set()
        self._bytes = 0
        self._wake = asyncio.Event()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="imgsvc-settle", initializer=_lowest_priority)
        self._task: asyncio.Task[None] | None = None

    def offer(self, key: str, job: Job, nbytes: int = 0) -> bool:
        """Queue `job` unless it is already waiting; False when it was dropped (the queue or its bytes full)."""
        if key in self._pending:
            return True
        if len(self._pending) >= self.queue or self._bytes + nbytes > self.max_bytes:
            metrics.settles_total.labels("dropped").inc()
            return False
        metrics.settles_total.labels("queued").inc()
        self._pending.add(key)
        self._bytes += nbytes
        self._jobs.append((key, job, nbytes))
        self._wake.set()
        return True

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn` in the low-priority settle thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, functools.partial(fn, *args))

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            await self.pool.idle()
            if not self._jobs:
                self._wake.clear()
                continue
            key, job, nbytes = self._jobs.popleft()
            try:
                await job()
                metrics.settles_total.labels("settled").inc()
            except Exception as exc:  # the variant stays fast; the next request for it offers it again
                metrics.settles_total.labels("failed").inc()
                log.info("settling %s failed: %s", key, type(exc).__name__)
            finally:
                self._pending.discard(key)
                self._bytes -= nbytes
