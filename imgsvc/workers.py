"""The render worker pool: pyvips work runs here, never on the event loop.

A capacity limiter bounds concurrent renders; a bounded queue in front of it refuses
work with 503 + Retry-After instead of letting latency and memory grow without bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio

from imgsvc.errors import Overloaded

T = TypeVar("T")


class WorkerPool:
    def __init__(self, workers: int, queue: int) -> None:
        self.workers = workers
        self.queue = queue
        self._limiter = anyio.CapacityLimiter(workers)
        self._admitted = 0

    @property
    def running(self) -> int:
        return int(self._limiter.borrowed_tokens)

    @property
    def waiting(self) -> int:
        return self._admitted - self.running

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        if self._admitted >= self.workers + self.queue:
            raise Overloaded(
                f"all {self.workers} render workers are busy and {self.queue} renders are queued",
                headers={"Retry-After": "1"},
            )
        self._admitted += 1
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        finally:
            self._admitted -= 1
