"""The image catalog in Postgres through asyncpg: records, keyset listing, soft delete, migrations.

A database that cannot be reached, times out or is shutting down is `Unavailable` (503) at the pool.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from types import TracebackType
from typing import Literal

import asyncpg

from imgsvc.errors import InvalidParameter, Unavailable
from imgsvc.purge import enqueue

log = logging.getLogger("imgsvc.catalog")
Visibility = Literal["public", "private"]
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{22}$")
_CURSOR = re.compile(r"^[A-Za-z0-9_-]+$")
DELETES_CHANNEL = "imgsvc_deleted"
LOCK_WAIT_SECONDS = 120.0  # a blob's advisory lock is held while an upload stores it (bounded by the store's timeouts)
_MIGRATION_LOCK = 0x696D6773  # advisory lock id ("imgs"): one replica migrates at a time
_MIGRATION_TIMEOUT = 3600.0  # migrations (and waiting for another replica's) are not bound by the query timeout
# Raised by a query when the server went away, refused, timed out or is shutting down (not by a bad query).
_OUTAGES = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin/crash shutdown, starting up, statement timeout
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    ConnectionError,
    TimeoutError,
)


@dataclass(frozen=True, slots=True)
class ImageRecord:
    id: str
    sha256: str
    owner: str
    category: str
    visibility: Visibility
    format: str
    width: int
    height: int
    bytes: int
    frames: int
    has_alpha: bool
    original_filename: str | None
    created_at: datetime
    deleted_at: datetime | None = None
    thumbhash: str | None = None  # the placeholder (imgsvc.derive): None until derived
    dominant_color: str | None = None
    average_color: str | None = None


@dataclass(frozen=True, slots=True)
class Page:
    items: list[ImageRecord]
    next_cursor: str | None


def new_image_id() -> str:
    """128 random bits, URL-safe: unguessable, so a URL is no hint to any other image."""
    return secrets.token_urlsafe(16)


def is_image_id(text: str) -> bool:
    return bool(ID_PATTERN.match(text))


_COLUMNS = (
    "id, sha256, owner, category, visibility, format, width, height, bytes, frames, has_alpha, "
    "original_filename, created_at, deleted_at, thumbhash, dominant_color, average_color"
)


def _record(row: asyncpg.Record) -> ImageRecord:
    return ImageRecord(**dict(row))


def encode_cursor(record: ImageRecord) -> str:
    raw = json.dumps([record.created_at.isoformat(), record.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) position of a cursor from `encode_cursor`; anything else is a 400."""
    invalid = InvalidParameter("cursor is not one this service issued", param="cursor")
    if len(cursor) > 200 or not _CURSOR.match(cursor):
        raise invalid
    try:
        created, image_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        position = datetime.fromisoformat(created)
        position.astimezone(UTC)  # rejects dates that overflow once normalised
    except Exception as exc:  # any malformed payload: wrong JSON shape, types, dates
        raise invalid from exc
    if position.tzinfo is None or not isinstance(image_id, str) or not is_image_id(image_id):
        raise invalid
    return position, image_id


class Availability:
    """Whether the database answered the last time it was used; logs one warning per change of state."""

    def __init__(self) -> None:
        self.up = True

    def down(self, exc: BaseException) -> Unavailable:
        if self.up:
            self.up = False
            log.warning("database unavailable (%s)", type(exc).__name__)
        return Unavailable("the database is unavailable; retry later")

    def back(self) -> None:
        if not self.up:
            self.up = True
            log.warning("database back")


class GuardedPool(asyncpg.Pool):
    """An asyncpg pool whose every acquire is bounded in time and turns a database outage (in the acquire or in
    the queries run on the connection) into `Unavailable`, recorded in `availability`; other errors pass."""

    def __init__(self, dsn: str, *, min_size: int, max_size: int, timeout: float) -> None:
        super().__init__(
            dsn,
            min_size=min_size,
            max_size=max_size,
            max_queries=50_000,
            max_inactive_connection_lifetime=300.0,
            loop=None,
            connection_class=asyncpg.Connection,
            record_class=asyncpg.Record,
            command_timeout=timeout,  # every query, unless it passes its own
            timeout=timeout,  # establishing a connection
        )
        self.availability = Availability()
        self.acquire_timeout = timeout

    def acquire(self, *, timeout: float | None = None) -> _GuardedAcquire:  # type: ignore[override]
        return _GuardedAcquire(self, super().acquire(timeout=timeout or self.acquire_timeout))


class _GuardedAcquire:
    def __init__(self, pool: GuardedPool, inner: asyncpg.pool.PoolAcquireContext) -> None:
        self.availability = pool.availability
        self.inner = inner
        self.connection: asyncpg.Connection | None = None

    async def __aenter__(self) -> asyncpg.Connection:
        try:
            self.connection = await self.inner.__aenter__()
        except (*_OUTAGES, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise self.availability.down(exc) from exc
        return self.connection

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # A connection cut mid-operation may also surface as asyncpg's InternalClientError (its protocol left in
        # an unexpected state) or as an InterfaceError on the closed connection.
        lost = exc is not None and (
            isinstance(exc, (*_OUTAGES, asyncpg.exceptions.InternalClientError))
            or (isinstance(exc, asyncpg.InterfaceError) and _closed(self.connection))
        )
        try:
            await self.inner.__aexit__(exc_type, exc, tb)  # releases the connection (a broken one is replaced)
        except (*_OUTAGES, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError) as release_exc:
            if exc is None:
                raise self.availability.down(release_exc) from release_exc
        if lost:
            assert exc is not None
            raise self.availability.down(exc) from exc
        self.availability.back()


def _closed(connection: asyncpg.Connection | None) -> bool:
    try:
        return connection is None or connection.is_closed()
    except asyncpg.InterfaceError:  # the pool detached it before its release: its connection was closed
        return True


class Catalog:
    """The `images` table: one record per upload (its bytes' sha256, owner, visibility, probed size), read
    by id and listed per owner newest first; a delete is soft and announced to every replica on commit.

    Uploads and blob garbage collection of the same sha256 serialise on its advisory lock (`blob_lock`).
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 0, max_size: int = 10, timeout: float = 30.0) -> Catalog:
        """A catalog over a pool whose queries and connection waits are bounded by `timeout` seconds.

        No floor of connections by default: released ones stay open for reuse anyway, and asyncpg's upkeep of a
        floor logs a traceback per reconnect attempt while the database is down."""
        pool = await GuardedPool(dsn, min_size=min_size, max_size=max_size, timeout=timeout)
        return cls(pool)

    @property
    def available(self) -> bool:
        """False from a failed database operation until the next one that succeeds."""
        return not isinstance(self.pool, GuardedPool) or self.pool.availability.up

    async def close(self) -> None:
        await self.pool.close()

    async def check(self) -> None:
        await self.pool.fetchval("SELECT 1", timeout=2)

    async def migrate(self) -> list[str]:
        """Apply the SQL files of `imgsvc/migrations` not applied yet, each in its own transaction."""
        applied: list[str] = []
        files = sorted(
            (f for f in resources.files("imgsvc.migrations").iterdir() if f.name.endswith(".sql")),
            key=lambda f: f.name,
        )
        async with self.pool.acquire(timeout=_MIGRATION_TIMEOUT) as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK, timeout=_MIGRATION_TIMEOUT)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for file in files:
                version = file.name.removesuffix(".sql")
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(file.read_text(), timeout=_MIGRATION_TIMEOUT)
                    await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
                applied.append(version)
                log.info("applied migration %s", version)
        return applied

    @contextlib.asynccontextmanager
    async def blob_lock(self, sha256: str) -> AsyncIterator[asyncpg.Connection]:
        """Hold the blob's advisory lock: uploads (store + record) and garbage collection (check + delete)
        of the same bytes never interleave. Use the yielded connection inside, so the lock never waits on
        the pool it holds a connection of."""
        async with self.pool.acquire() as conn:
            # Waiting for another upload of the same bytes (storing the blob) is no outage: its own bound.
            await conn.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", sha256, timeout=LOCK_WAIT_SECONDS)
            try:
                yield conn
            finally:
                await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", sha256)

    async def live_references(self, conn: asyncpg.Connection, sha256: str) -> int:
        return int(await conn.fetchval("SELECT count(*) FROM images WHERE sha256 = $1 AND deleted_at IS NULL", sha256))

    async def references(self, conn: asyncpg.Connection, sha256: str) -> tuple[int, datetime | None]:
        """(live images of these bytes, when the last deleted one was deleted)."""
        row = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE deleted_at IS NULL) AS live, max(deleted_at) AS last_deleted "
            "FROM images WHERE sha256 = $1",
            sha256,
        )
        return int(row["live"]), row["last_deleted"]

    async def insert(self, record: ImageRecord, conn: asyncpg.Connection | None = None) -> ImageRecord:
        """A new image: every upload is its own record, even of bytes another image already has (whose placeholder,
        derived once per blob, it shares: the caller holds the blob's lock, which finishing a derivation takes)."""
        row = await (conn or self.pool).fetchrow(
            f"""INSERT INTO images (id, sha256, owner, category, visibility, format, width, height, bytes,
                                    frames, has_alpha, original_filename, thumbhash, dominant_color, average_color)
                SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
                       same.thumbhash, same.dominant_color, same.average_color
                FROM (SELECT 1) AS one LEFT JOIN LATERAL (
                    SELECT thumbhash, dominant_color, average_color FROM images
                    WHERE sha256 = $2 AND thumbhash IS NOT NULL LIMIT 1) AS same ON true
                RETURNING {_COLUMNS}""",
            record.id, record.sha256, record.owner, record.category, record.visibility, record.format,
            record.width, record.height, record.bytes, record.frames, record.has_alpha, record.original_filename,
        )  # fmt: skip
        return _record(row)

    async def get(self, image_id: str, *, include_deleted: bool = False) -> ImageRecord | None:
        """The live image with this id, or None (unknown, malformed or deleted ids alike)."""
        if not is_image_id(image_id):
            return None
        live = "" if include_deleted else " AND deleted_at IS NULL"
        row = await self.pool.fetchrow(f"SELECT {_COLUMNS} FROM images WHERE id = $1{live}", image_id)
        return _record(row) if row else None

    async def list(self, owner: str, *, category: str | None, limit: int, cursor: str | None) -> Page:
        args: list[object] = [owner]
        where = ["owner = $1", "deleted_at IS NULL"]
        if category is not None:
            args.append(category)
            where.append(f"category = ${len(args)}")
        if cursor is not None:
            created_at, last_id = decode_cursor(cursor)
            args.extend([created_at, last_id])
            where.append(f"(created_at, id) < (${len(args) - 1}, ${len(args)})")
        args.append(limit + 1)
        rows = await self.pool.fetch(
            f"SELECT {_COLUMNS} FROM images WHERE {' AND '.join(where)} "
            f"ORDER BY created_at DESC, id DESC LIMIT ${len(args)}",
            *args,
        )
        items = [_record(r) for r in rows[:limit]]
        next_cursor = encode_cursor(items[-1]) if len(rows) > limit else None
        return Page(items, next_cursor)

    async def soft_delete(self, image_id: str) -> Deleted | None:
        """Mark one image deleted and announce it to every replica; other images of its bytes stay."""
        if not is_image_id(image_id):
            return None
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"UPDATE images SET deleted_at = clock_timestamp() WHERE id = $1 AND deleted_at IS NULL "
                f"RETURNING {_COLUMNS}",
                image_id,
            )
            if row is None:
                return None
            record = _record(row)
            # Under the blob's lock (held by uploads of these bytes too, and by concurrent deletes of its
            # other images), so exactly the delete that takes the last live image says so.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", record.sha256, timeout=LOCK_WAIT_SECONDS
            )
            deleted = Deleted(record, blob_orphaned=await self.live_references(conn, record.sha256) == 0)
            # Delivered to every replica's listener when this transaction commits.
            await conn.execute("SELECT pg_notify($1, $2)", DELETES_CHANNEL, deleted.notice.payload())
            await enqueue(conn, image_id, "delete")  # the CDN purge job commits with the delete, or neither does
            await conn.execute("DELETE FROM image_views WHERE image_id = $1", image_id)  # see views.add_views
        return deleted


@dataclass(frozen=True, slots=True)
class Deleted:
    """A delete as every replica hears it: which image, its blob, and whether any live image still uses it."""

    image: ImageRecord
    blob_orphaned: bool

    @property
    def notice(self) -> DeleteNotice:
        return DeleteNotice(self.image.id, self.image.sha256, self.blob_orphaned)


@dataclass(frozen=True, slots=True)
class DeleteNotice:
    image_id: str
    sha256: str | None  # None from a replica of an older version, whose notices carry the id alone
    blob_orphaned: bool

    def payload(self) -> str:
        return f"{self.image_id} {self.sha256} {'orphaned' if self.blob_orphaned else 'shared'}"

    @classmethod
    def parse(cls, payload: str) -> DeleteNotice:
        parts = payload.split()
        if len(parts) == 3:
            return cls(parts[0], parts[1], parts[2] == "orphaned")
        return cls(payload.strip(), None, True)
