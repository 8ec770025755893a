"""The render worker pool: pyvips work runs here, never on the event loop.

A capacity limiter bounds concurrent renders; a bounded queue in front of it refuses
work with 503 + Retry-After instead of letting latency and memory grow without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import anyio

from imgsvc import metrics
from imgsvc.errors import Overloaded

T = TypeVar("T")


class WorkerPool:
    def __init__(self, workers: int, queue: int) -> None:
        self.workers = workers
        self.queue = queue
        self._limiter = anyio.CapacityLimiter(workers)
        self._admitted = 0
        self._idle = asyncio.Event()  # no render admitted: what low-priority work waits for
        self._idle.set()

    @property
    def running(self) -> int:
        return int(self._limiter.borrowed_tokens)

    @property
    def waiting(self) -> int:
        return self._admitted - self.running

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a place (running or queued) for a job, or refuse at once with 503 when none is left.

        Callers take it before any costly preparation (reading an original), so a refusal is cheap.
        """
        if self._admitted >= self.workers + self.queue:
            metrics.render_rejections.labels("queue_full").inc()
            raise Overloaded(
                f"all {self.workers} render workers are busy and {self.queue} renders are queued",
                headers={"Retry-After": "1"},
            )
        self._admitted += 1
        self._idle.clear()
        metrics.renders_waiting.inc()
        try:
            yield
        finally:
            self._admitted -= 1
            if self._admitted == 0:
                self._idle.set()
            metrics.renders_waiting.dec()

    async def idle(self) -> None:
        """Return once no render is running or queued."""
        await self._idle.wait()

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run in a worker thread; the caller holds a place from `admit()`."""
        async with self._limiter:  # counted as running only once a worker is free
            metrics.renders_waiting.dec()
            metrics.renders_running.inc()
            try:
                return await anyio.to_thread.run_sync(fn, *args)
            finally:
                metrics.renders_running.dec()
                metrics.renders_waiting.inc()

    async def submit(self, fn: Callable[..., T], *args: object) -> T:
        with self.admit():
            return await self.run(fn, *args)
