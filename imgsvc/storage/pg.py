"""Postgres blob store: originals as `bytea` rows of the catalog database (`IMGSVC_STORAGE_URL=postgres:`).

For small deployments that want a single backup; a committed INSERT is as durable as the catalog.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg

from imgsvc.errors import BlobNotFound
from imgsvc.storage import check_size, validate_key


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def put(self, key: str, data: bytes) -> None:
        await self.pool.execute(
            "INSERT INTO blobs (key, data) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING", validate_key(key), data
        )

    async def get(self, key: str, max_bytes: int) -> bytes:
        # One round trip; the bytes only travel when they are within the cap.
        row = await self.pool.fetchrow(
            "SELECT octet_length(data) AS size, CASE WHEN octet_length(data) <= $2 THEN data END AS data "
            "FROM blobs WHERE key = $1",
            validate_key(key),
            max_bytes,
        )
        if row is None:
            raise BlobNotFound(key)
        check_size(row["size"], max_bytes)
        return bytes(row["data"])

    async def exists(self, key: str) -> bool:
        return bool(await self.pool.fetchval("SELECT EXISTS (SELECT 1 FROM blobs WHERE key = $1)", validate_key(key)))

    async def delete(self, key: str) -> None:
        await self.pool.execute("DELETE FROM blobs WHERE key = $1", validate_key(key))

    async def list_blobs(self) -> AsyncIterator[tuple[str, datetime]]:
        async with self.pool.acquire() as conn, conn.transaction():
            async for row in conn.cursor("SELECT key, created_at FROM blobs ORDER BY key"):
                yield row["key"], row["created_at"]

    async def check(self) -> None:
        await self.pool.fetchval("SELECT 1 FROM blobs LIMIT 1", timeout=2)

    async def close(self) -> None:
        return None  # the pool belongs to the catalog
