"""Garbage collection: remove blobs (and what was derived from them) that no live image has referenced for
longer than a grace period, and idempotency keys past their 24 h.
Each blob is checked and deleted under the same advisory lock that an upload of those bytes holds
while it stores the blob and commits its record, so a concurrent upload never loses its blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from imgsvc import derivations
from imgsvc.catalog import Catalog
from imgsvc.errors import ImgsvcError
from imgsvc.idempotency import IdempotencyKeys
from imgsvc.purge import expire as expire_purge_jobs
from imgsvc.storage import BlobStore, blob_key, blob_of

log = logging.getLogger("imgsvc.gc")


@dataclass(slots=True)
class GcReport:
    dry_run: bool
    examined: int = 0
    kept: int = 0
    removed: list[str] = field(default_factory=list)
    expired_keys: int = 0  # idempotency keys past their 24 h
    expired_purge_jobs: int = 0  # CDN purge jobs delivered everywhere and older than the purge keep period


async def collect_garbage(
    catalog: Catalog,
    store: BlobStore,
    grace: timedelta,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
    purge_keep: timedelta = timedelta(days=7),
) -> GcReport:
    now = now or datetime.now(UTC)
    cutoff = now - grace
    report = GcReport(dry_run=dry_run)
    if not dry_run:
        report.expired_keys = await IdempotencyKeys(catalog.pool).expire()
        report.expired_purge_jobs = await expire_purge_jobs(catalog.pool, purge_keep)
    async for key, written in store.list_blobs():
        report.examined += 1
        sha256 = blob_of(key)  # an original, or a level derived from one: they go together
        if sha256 is None or written > cutoff:
            report.kept += 1  # not ours, or too fresh: an upload may be on its way to reference it
            continue
        async with catalog.blob_lock(sha256) as conn:
            live, last_deleted = await catalog.references(conn, sha256)
            if live or (last_deleted is not None and last_deleted > cutoff):
                report.kept += 1
                continue
            if not dry_run:
                await store.delete(key)
                if key == blob_key(sha256):
                    await derivations.forget(conn, sha256)  # bytes uploaded again are derived again
                log.info("removed blob %s", key)
        report.removed.append(key)
    return report


@contextlib.asynccontextmanager
async def periodic_collection(
    catalog: Catalog, store: BlobStore, grace: timedelta, every_seconds: float, purge_keep: timedelta
) -> AsyncIterator[None]:
    """Collect garbage every `every_seconds` (with jitter, so replicas spread out) while the block runs."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(every_seconds * random.uniform(0.8, 1.2))
            try:
                report = await collect_garbage(catalog, store, grace, purge_keep=purge_keep)
                log.info("gc: examined %d blobs, removed %d", report.examined, len(report.removed))
            except ImgsvcError as exc:  # the database or the store is unavailable: they log the outage
                log.warning("gc run skipped (%s); trying again next period", exc.detail)
            except Exception:
                log.exception("gc run failed; trying again next period")

    task = asyncio.create_task(loop(), name="imgsvc-gc") if every_seconds > 0 else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
