"""The derivation worker: takes queued blobs (imgsvc.derivations), makes their pyramid levels and placeholder in
its own small pool, stores the levels beside the blob, and records both; renders keep priority.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import asyncpg

from imgsvc import derivations, metrics, pyramid
from imgsvc.errors import BlobNotFound, ImgsvcError
from imgsvc.storage import BlobStore, BlobTooLarge, blob_key
from imgsvc.workers import WorkerPool

log = logging.getLogger("imgsvc.derive")

_POLL_SECONDS = 5.0  # how often an idle worker looks for work queued by another replica or a backfill
_YIELD_SECONDS = 2.0  # at most this long a job waits for queued renders to start first


@dataclass(frozen=True, slots=True)
class DeriveSettings:
    scales: tuple[int, ...]  # the pyramid's levels, 1/scale of the original each; empty: placeholders only
    workers: int
    timeout_seconds: float

    @property
    def lease_seconds(self) -> float:
        return 2 * self.timeout_seconds + 10  # a crashed worker's job is taken again after this


class Deriver:
    """One loop per worker slot; `wake()` after an upload starts the work at once instead of at the next poll."""

    def __init__(
        self, pool: asyncpg.Pool, store: BlobStore, settings: DeriveSettings, renders: WorkerPool | None = None
    ) -> None:
        self.pool = pool
        self.store = store
        self.settings = settings
        self.renders = renders
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run_once(self) -> bool:
        """Derive one queued blob; False when none is waiting."""
        source = await derivations.lease(self.pool, self.settings.lease_seconds)
        if source is None:
            return False
        await self._yield_to_renders()
        try:
            derived = await self._derive(source)
        except (ImgsvcError, BlobTooLarge) as exc:
            state = await derivations.fail(self.pool, source.sha256, str(exc))
            metrics.derivations.labels("failed" if state == "failed" else "retry").inc()
            log.warning("derivation of blob %s failed (%s), now %s", source.sha256[:12], exc, state)
            return True
        levels = [level.scale for level, _ in derived.levels]
        await derivations.finish(self.pool, source.sha256, levels, derived.placeholder)
        metrics.derivations.labels("done").inc()
        metrics.derive_seconds.observe(derived.seconds)
        log.info("derived blob %s: levels %s in %.0f ms", source.sha256[:12], levels, derived.seconds * 1000)
        return True

    async def _derive(self, source: derivations.Source) -> pyramid.Derived:
        try:
            data = await self.store.get(blob_key(source.sha256), source.bytes)
        except BlobNotFound:  # removed by gc after the lease: nothing left to derive from
            return pyramid.Derived((), None, 0.0)
        levels = pyramid.levels_for(source, self.settings.scales)
        # One thread per worker loop (settings.workers of them): bounded apart from the render pool and its gauges.
        derived = await anyio.to_thread.run_sync(pyramid.derive, data, levels, self.settings.timeout_seconds)
        for level, blob in derived.levels:
            await self.store.put(level.key(source.sha256), blob)
        return derived

    async def _yield_to_renders(self) -> None:
        waited = 0.0
        while self.renders is not None and self.renders.waiting > 0 and waited < _YIELD_SECONDS:
            await asyncio.sleep(0.05)
            waited += 0.05

    async def drain(self) -> int:
        """Derive until the queue is empty (what `imgsvc derive` runs); returns how many blobs were taken."""
        done = 0
        while await self.run_once():
            done += 1
        return done

    async def _loop(self) -> None:
        while True:
            try:
                if await self.run_once():
                    continue
            except ImgsvcError as exc:  # the database or store is unavailable: it logs the outage itself
                log.debug("derivation paused: %s", exc.detail)
            except Exception:
                log.exception("derivation worker failed; going on")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _POLL_SECONDS)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Deriver]:
        """The worker loops run while the block does (none when the pyramid and placeholders are off)."""
        count = self.settings.workers
        tasks = [asyncio.create_task(self._loop(), name=f"imgsvc-derive-{i}") for i in range(count)]
        try:
            yield self
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
