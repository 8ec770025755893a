"""View counts: answers per image and UTC day, counted in memory on the event loop and added to Postgres in
batches (one row per image and day per flush), kept (bounded) in memory while the database is away."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import asyncpg
from prometheus_client import Counter

from imgsvc.errors import ImgsvcError

log = logging.getLogger("imgsvc.views")
VIEWED_STATUSES = frozenset({200, 304})  # a GET /img/ answered with the image, or "the copy you have is current"
SECONDS_PER_DAY = 86_400
_flushed = Counter("imgsvc_views_flushed_total", "Views this process wrote to the database.")
_dropped = Counter("imgsvc_views_dropped_total", "Views not counted: the pending counts were at their bound.")
_flushes = Counter("imgsvc_views_flushes_total", "View count flushes to the database, by outcome.", ["outcome"])


@dataclass(frozen=True, slots=True)
class ViewRow:
    image_id: str
    day: date  # UTC
    views: int
    last_viewed_at: datetime


class ViewCounter:
    """Pending counts by UTC day and image id. `count` is a dict update on the event loop (no lock, no I/O);
    at most `max_pending` (image, day) entries are kept: past that, views of images not yet pending are dropped
    (and counted in `imgsvc_views_dropped_total`), so a long database outage cannot exhaust memory."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self._days: dict[int, dict[str, list[float]]] = {}  # day number -> image id -> [views, last seen]
        self._today: dict[str, list[float]] = {}
        self._day_ends = 0.0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def count(self, image_id: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if now >= self._day_ends or now < self._day_ends - SECONDS_PER_DAY:
            self._switch_day(now)
        tally = self._today.get(image_id)
        if tally is not None:
            tally[0] += 1
            tally[1] = now
        elif self._size < self.max_pending:
            self._today[image_id] = [1, now]
            self._size += 1
        else:
            _dropped.inc()

    def _switch_day(self, now: float) -> None:
        day = int(now // SECONDS_PER_DAY)
        self._today = self._days.setdefault(day, {})
        self._day_ends = (day + 1) * SECONDS_PER_DAY

    def take(self) -> list[ViewRow]:
        """Every pending count as rows (sorted: concurrent flushes lock rows in one order), pending reset."""
        days, self._days, self._day_ends, self._size = self._days, {}, 0.0, 0
        self._today = {}
        rows = [
            ViewRow(image_id, _day(day), int(views), datetime.fromtimestamp(last, UTC))
            for day, images in days.items()
            for image_id, (views, last) in images.items()
        ]
        return sorted(rows, key=lambda row: (row.image_id, row.day))

    def restore(self, rows: Iterable[ViewRow]) -> None:
        """Put back rows a flush could not write, within the bound (newer counts of the same key are kept)."""
        for row in rows:
            images = self._days.setdefault((row.day - _EPOCH).days, {})
            tally = images.get(row.image_id)
            if tally is not None:
                tally[0] += row.views
                tally[1] = max(tally[1], row.last_viewed_at.timestamp())
            elif self._size < self.max_pending:
                images[row.image_id] = [row.views, row.last_viewed_at.timestamp()]
                self._size += 1
            else:
                _dropped.inc(row.views)
        self._day_ends = 0.0  # `count` finds today's dict again


_EPOCH = date(1970, 1, 1)


def _day(number: int) -> date:
    return _EPOCH + timedelta(days=number)


_ADD = """
WITH live AS (  -- FOR SHARE waits for a delete of the image in progress, and sees it once it committed
    SELECT id FROM images WHERE id = ANY($1::text[]) AND deleted_at IS NULL ORDER BY id FOR SHARE
)
INSERT INTO image_views (image_id, day, views, last_viewed_at)
SELECT v.image_id, v.day, v.views, v.last_viewed_at
FROM unnest($1::text[], $2::date[], $3::bigint[], $4::timestamptz[]) AS v (image_id, day, views, last_viewed_at)
JOIN live ON live.id = v.image_id
ORDER BY v.image_id, v.day
ON CONFLICT (image_id, day) DO UPDATE
SET views = image_views.views + EXCLUDED.views,
    last_viewed_at = greatest(image_views.last_viewed_at, EXCLUDED.last_viewed_at)
"""


async def add_views(conn: asyncpg.Connection | asyncpg.Pool, rows: Sequence[ViewRow]) -> None:
    """Add the rows' counts in one statement; counts of unknown or deleted images are dropped (a delete removes
    an image's counts in its own transaction, so none arrive after it). At most one row per (image, day)."""
    if rows:
        columns = list(zip(*((r.image_id, r.day, r.views, r.last_viewed_at) for r in rows), strict=True))
        await conn.execute(_ADD, *columns)


@dataclass(frozen=True, slots=True)
class ViewReport:
    total: int  # every view ever counted
    last_viewed_at: datetime | None
    days: list[tuple[date, int]]  # the window, oldest first, zeros included; the last one is today (UTC)

    def json(self) -> dict[str, object]:
        return {
            "total": self.total,
            "last_viewed_at": self.last_viewed_at.isoformat() if self.last_viewed_at else None,
            "days": [{"date": day.isoformat(), "views": views} for day, views in self.days],
        }


async def read_views(pool: asyncpg.Pool, image_id: str, days: int, today: date) -> ViewReport:
    """Counts flushed so far (what replicas still hold in memory arrives within their flush interval)."""
    first = today - timedelta(days=days - 1)
    async with pool.acquire() as conn:
        totals = await conn.fetchrow(
            "SELECT coalesce(sum(views), 0) AS total, max(last_viewed_at) AS last FROM image_views WHERE image_id = $1",
            image_id,
        )
        rows = await conn.fetch(
            "SELECT day, views FROM image_views WHERE image_id = $1 AND day BETWEEN $2 AND $3", image_id, first, today
        )
    by_day = {row["day"]: int(row["views"]) for row in rows}
    window = [first + timedelta(days=n) for n in range(days)]
    return ViewReport(int(totals["total"]), totals["last"], [(day, by_day.get(day, 0)) for day in window])


class ViewFlusher:
    """Writes the counter's pending counts to the database; a failed write puts them back for the next try."""

    def __init__(self, counter: ViewCounter, pool: asyncpg.Pool) -> None:
        self.counter = counter
        self.pool = pool
        self._failing = False

    async def flush(self) -> bool:
        rows = self.counter.take()
        if not rows:
            return True
        try:
            await add_views(self.pool, rows)
        except Exception as exc:  # whatever failed, the counts stay; an outage is logged once by the pool
            self.counter.restore(rows)
            _flushes.labels("failed").inc()
            if not self._failing:
                self._failing = True
                log.warning("view counts kept in memory, the flush failed (%s)", type(exc).__name__,
                            exc_info=not isinstance(exc, ImgsvcError))  # fmt: skip
            return False
        _flushes.labels("ok").inc()
        _flushed.inc(sum(row.views for row in rows))
        if self._failing:
            self._failing = False
            log.warning("view counts flushed again")
        return True


@contextlib.asynccontextmanager
async def flushing(counter: ViewCounter, pool: asyncpg.Pool, interval: float) -> AsyncIterator[ViewFlusher]:
    """Flush every `interval` seconds while the block runs, and once more when it ends (a clean shutdown).
    The loop is stopped, never cancelled: a write in progress ends, so its counts are neither lost nor repeated."""
    flusher = ViewFlusher(counter, pool)
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            await flusher.flush()
        if len(counter):
            log.warning("view counts of %d (image, day) pairs lost at shutdown: no database", len(counter))

    task = asyncio.create_task(loop(), name="imgsvc-views")
    try:
        yield flusher
    finally:
        stop.set()
        await task
