"""Postgres blob store: originals as `bytea` rows of the catalog database (`IMGSVC_STORAGE_URL=postgres:`).

For small deployments that want a single backup; a committed INSERT is as durable as the catalog.
A full disk is `InsufficientStorage`; an unreachable or failing database is `Unavailable`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from datetime import datetime

import asyncpg

from imgsvc.errors import BlobNotFound, InsufficientStorage, Unavailable
from imgsvc.storage import check_size, validate_key

_DOWN = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except asyncpg.DiskFullError:
        raise InsufficientStorage("the blob store (database) is full: nothing was stored") from None
    except _DOWN as exc:
        raise Unavailable(f"the blob store (database) is unavailable ({type(exc).__name__})") from None


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def put(self, key: str, data: bytes) -> None:
        sql = "INSERT INTO blobs (key, data) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING"
        with _translated():
            await self.pool.execute(sql, validate_key(key), data)

    async def get(self, key: str, max_bytes: int) -> bytes:
        # One round trip; the bytes only travel when they are within the cap.
        sql = (
            "SELECT octet_length(data) AS size, CASE WHEN octet_length(data) <= $2 THEN data END AS data "
            "FROM blobs WHERE key = $1"
        )
        with _translated():
            row = await self.pool.fetchrow(sql, validate_key(key), max_bytes)
        if row is None:
            raise BlobNotFound(key)
        check_size(row["size"], max_bytes)
        return bytes(row["data"])

    async def exists(self, key: str) -> bool:
        sql = "SELECT EXISTS (SELECT 1 FROM blobs WHERE key = $1)"
        with _translated():
            return bool(await self.pool.fetchval(sql, validate_key(key)))

    async def delete(self, key: str) -> None:
        with _translated():
            await self.pool.execute("DELETE FROM blobs WHERE key = $1", validate_key(key))

    async def list_blobs(self) -> AsyncIterator[tuple[str, datetime]]:
        with _translated():
            async with self.pool.acquire() as conn, conn.transaction():
                async for row in conn.cursor("SELECT key, created_at FROM blobs ORDER BY key"):
                    yield row["key"], row["created_at"]

    async def check(self) -> None:
        with _translated():
            await self.pool.fetchval("SELECT 1 FROM blobs LIMIT 1", timeout=2)

    async def close(self) -> None:
        return None  # the pool belongs to the catalog
