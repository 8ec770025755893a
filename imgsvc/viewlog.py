"""`imgsvc views ingest`: views answered by a cache in front (nginx's hits, a CDN's edge hits) counted from its
JSON access log, read from a saved offset that commits with the counts, so no line is counted twice."""

from __future__ import annotations

import asyncio
import glob
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote

import asyncpg

from imgsvc.catalog import is_image_id
from imgsvc.errors import ImgsvcError
from imgsvc.views import VIEWED_STATUSES, ViewCounter, ViewRow, add_views

log = logging.getLogger("imgsvc.views.ingest")
# Answered by the cache itself. REVALIDATED asked imgsvc (a 304 it counted), so its line is skipped by the
# upstream_status rule below; a CDN log marks its edge hits HIT.
CACHE_ANSWERS = frozenset({"HIT", "STALE", "UPDATING", "REVALIDATED"})
_UPSTREAM_CODES = re.compile(r"[\s,:]+")
CHUNK_BYTES = 1 << 20  # lines are read and committed in chunks of up to this much
HEAD_BYTES = 256


def counted_view(line: bytes) -> tuple[str, datetime] | None:
    """(image id, time) if the line is a view the tier behind never saw, else None. A line is a JSON object:
    `uri` (path and query), `status` and `ts` (ISO 8601, or unix seconds) are required; `method` (default GET),
    `cache` (the cache status) and `upstream_status` are optional, as in nginx's `imgsvc_json` format."""
    try:
        entry = json.loads(line)
        if not isinstance(entry, dict) or entry.get("method", "GET") != "GET":
            return None
        if int(entry["status"]) not in VIEWED_STATUSES or str(entry.get("cache", "")).upper() not in CACHE_ANSWERS:
            return None
        if any(code in ("200", "304") for code in _UPSTREAM_CODES.split(str(entry.get("upstream_status", "")))):
            return None  # the tier behind answered it, and counted it
        path = str(entry["uri"]).split("?", 1)[0]
        image_id = unquote(path.removeprefix("/img/"))
        if not path.startswith("/img/") or not is_image_id(image_id):
            return None
        return image_id, _timestamp(entry["ts"])
    except (ValueError, KeyError, TypeError, OverflowError):
        return None


def _timestamp(value: object) -> datetime:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    at = datetime.fromisoformat(str(value))
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def tally(lines: Iterator[bytes]) -> tuple[list[ViewRow], int]:
    """(one row per image and UTC day, views counted) of a batch of lines."""
    counter = ViewCounter(max_pending=sys.maxsize)
    viewed = 0
    for line in lines:
        view = counted_view(line)
        if view is not None:
            counter.count(view[0], view[1].timestamp())
            viewed += 1
    return counter.take(), viewed


@dataclass(frozen=True, slots=True)
class Position:
    """A file by identity (device, inode: a rotated log keeps them under its new name), an offset in it, and the
    file's first bytes up to `HEAD_BYTES` (a log truncated and grown past the offset again starts differently)."""

    device: int
    inode: int
    offset: int
    head: bytes = b""

    def same_start(self, stream: BinaryIO) -> bool:
        return os.pread(stream.fileno(), len(self.head), 0) == self.head

    def same_file(self, stat: os.stat_result) -> bool:
        return (self.device, self.inode) == (stat.st_dev, stat.st_ino)


class PositionMoved(Exception):
    """Another ingest of the same source committed first: start again from the saved position."""


async def saved_position(conn: asyncpg.Connection | asyncpg.Pool, source: str) -> Position | None:
    row = await conn.fetchrow("SELECT device, inode, position, head FROM view_log_offsets WHERE source = $1", source)
    return Position(row["device"], row["inode"], row["position"], row["head"]) if row else None


async def commit(
    pool: asyncpg.Pool, source: str, before: Position | None, after: Position, rows: list[ViewRow]
) -> None:
    """Add the counts and move the offset in one transaction, if the saved offset is still `before`."""
    async with pool.acquire() as conn, conn.transaction():
        current = await conn.fetchrow(
            "SELECT device, inode, position, head FROM view_log_offsets WHERE source = $1 FOR UPDATE", source
        )
        if (Position(*current) if current else None) != before:
            raise PositionMoved(source)
        await add_views(conn, rows)
        await conn.execute(
            "INSERT INTO view_log_offsets (source, device, inode, position, head) VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT (source) DO UPDATE SET device = $2, inode = $3, position = $4, head = $5, "
            "updated_at = clock_timestamp()",
            source, after.device, after.inode, after.offset, after.head,
        )  # fmt: skip


@dataclass(slots=True)
class IngestReport:
    lines: int = 0  # complete lines read
    views: int = 0  # of them, views counted


class LogIngest:
    """Follows one access log: the saved file from its saved offset (found under its rotated name if the log was
    rotated since), then the current file from its start. Only complete lines are read and counted."""

    def __init__(self, pool: asyncpg.Pool, path: Path, source: str, rotate_grace: float = 5.0) -> None:
        self.pool = pool
        self.path = path
        self.source = source
        self.rotate_grace = rotate_grace  # how long a rotated file must stay quiet before its reader moves on
        self.report = IngestReport()

    async def run(self, *, follow: bool, interval: float = 1.0) -> IngestReport:
        """Read to the end (`follow=False`), or keep reading every `interval` seconds until cancelled."""
        while True:
            try:
                await self._read(follow, interval)
                return self.report
            except PositionMoved:
                log.warning("another ingest moved the offset of %s: continuing from it", self.source)
            except (OSError, ImgsvcError) as exc:  # the log, or the database (Unavailable): try again
                if not follow:
                    raise
                log.warning("ingest of %s paused (%s); trying again", self.path, exc)
                await asyncio.sleep(max(interval, 1.0))

    async def _read(self, follow: bool, interval: float) -> None:
        stream, position = await self._open(await saved_position(self.pool, self.source))
        try:
            quiet_since: float | None = None
            while True:
                position, moved = await self._drain(stream, position)
                current = _stat(self.path)
                if current is not None and not position.same_file(current):  # rotated: finish the old file first
                    now = asyncio.get_running_loop().time()
                    if moved or quiet_since is None:
                        quiet_since = now
                    if not follow or now - quiet_since >= self.rotate_grace:
                        stream.close()
                        stream = self.path.open("rb")
                        position, quiet_since = await self._move(position, stream), None
                        continue
                elif current is not None and (current.st_size < position.offset or not position.same_start(stream)):
                    log.warning("%s was truncated: reading it again from its start", self.path)
                    position = await self._move(position, stream)
                    continue
                if not follow:
                    return
                await asyncio.sleep(interval)
        finally:
            stream.close()

    async def _move(self, before: Position | None, stream: BinaryIO) -> Position:
        """Save "the start of `stream`" as the position (a rotated or truncated log, or the first run)."""
        after = _position(stream, 0)
        await commit(self.pool, self.source, before, after, [])
        return after

    async def _open(self, saved: Position | None) -> tuple[BinaryIO, Position]:
        """The file to read and where: the saved one from its offset (perhaps under a rotated name), else the
        log from its start."""
        if saved is not None:
            stream = self.path.open("rb")
            stat = os.fstat(stream.fileno())
            if saved.same_file(stat):
                if stat.st_size >= saved.offset and saved.same_start(stream):
                    return stream, saved
                log.warning("%s was truncated: reading it again from its start", self.path)
                return stream, await self._move(saved, stream)
            stream.close()
            for sibling in sorted(self.path.parent.glob(f"{glob.escape(self.path.name)}*")):
                if sibling != self.path and saved.same_file(sibling.stat()):
                    log.info("%s was rotated: finishing %s from offset %d first", self.path, sibling, saved.offset)
                    return sibling.open("rb"), saved
            log.warning("%s was rotated and its previous file is gone: its lines after offset %d are not counted",
                        self.path, saved.offset)  # fmt: skip
        stream = self.path.open("rb")
        return stream, await self._move(saved, stream)

    async def _drain(self, stream: BinaryIO, position: Position) -> tuple[Position, bool]:
        """Count every complete line after `position`, a chunk per transaction; (new position, whether it moved)."""
        moved = False
        while True:
            stream.seek(position.offset)
            chunk = stream.read(CHUNK_BYTES)
            end = chunk.rfind(b"\n") + 1
            if end == 0 and len(chunk) == CHUNK_BYTES:
                end = len(chunk)  # a line longer than a chunk is not a log line: skipped
            if end == 0:
                return position, moved
            rows, views = tally(iter(chunk[:end].splitlines()))
            offset = position.offset + end
            head = position.head if len(position.head) == HEAD_BYTES else os.pread(stream.fileno(), HEAD_BYTES, 0)
            after = Position(position.device, position.inode, offset, head[: min(offset, HEAD_BYTES)])
            await commit(self.pool, self.source, position, after, rows)
            self.report.lines += chunk.count(b"\n", 0, end)
            self.report.views += views
            position, moved = after, True


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:  # between a rotation's rename and the new file's creation
        return None


def _position(stream: BinaryIO, offset: int) -> Position:
    stat = os.fstat(stream.fileno())
    return Position(stat.st_dev, stat.st_ino, offset)
