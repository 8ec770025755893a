"""The derivation queue in Postgres: one row per blob, leased by a worker for a bounded time, so work left by a
crash or restart is taken again; finishing copies the placeholder to every image of the blob.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import asyncpg

DeriveState = Literal["pending", "done", "failed"]
MAX_ATTEMPTS = 3  # an original that fails this often (timeouts, a store outage mid-way) is left as it is


@dataclass(frozen=True, slots=True)
class Source:
    """What the worker needs to know of a blob, from any of its live images."""

    sha256: str
    format: str
    width: int
    height: int
    bytes: int
    frames: int
    has_alpha: bool


@dataclass(frozen=True, slots=True)
class Placeholder:
    thumbhash: str  # base64
    dominant_color: str  # #rrggbb
    average_color: str


async def enqueue(conn: asyncpg.Connection | asyncpg.Pool, sha256: str, *, new_blob: bool) -> None:
    """In the upload's transaction: a blob written now (first upload, or again after gc) is derived (again);
    `new_blob` also serves a render that found a damaged level."""
    if new_blob:
        await conn.execute(
            "INSERT INTO derivations (sha256) VALUES ($1) ON CONFLICT (sha256) DO UPDATE "
            "SET state = 'pending', attempts = 0, leased_until = NULL, levels = '{}', updated_at = clock_timestamp()",
            sha256,
        )
    else:
        await conn.execute("INSERT INTO derivations (sha256) VALUES ($1) ON CONFLICT (sha256) DO NOTHING", sha256)


async def backfill(pool: asyncpg.Pool, *, retry_failed: bool = False) -> int:
    """Queue every live blob not derived yet (images uploaded before the pyramid existed); returns how many."""
    added = await pool.fetchval(
        "WITH added AS (INSERT INTO derivations (sha256) SELECT DISTINCT sha256 FROM images WHERE deleted_at IS NULL "
        "ON CONFLICT (sha256) DO NOTHING RETURNING 1) SELECT count(*) FROM added"
    )
    if retry_failed:
        await pool.execute("UPDATE derivations SET state = 'pending', attempts = 0 WHERE state = 'failed'")
    return int(added)


async def lease(pool: asyncpg.Pool, seconds: float) -> Source | None:
    """Take the oldest pending blob whose lease is free for `seconds`; None when there is none."""
    while True:
        row = await pool.fetchrow(
            """WITH job AS (
                   SELECT sha256 FROM derivations
                   WHERE state = 'pending' AND (leased_until IS NULL OR leased_until < clock_timestamp())
                   ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
               UPDATE derivations d SET leased_until = clock_timestamp() + make_interval(secs => $1),
                                        attempts = d.attempts + 1, updated_at = clock_timestamp()
               FROM job WHERE d.sha256 = job.sha256
               RETURNING d.sha256""",
            seconds,
        )
        if row is None:
            return None
        image = await pool.fetchrow(
            "SELECT sha256, format, width, height, bytes, frames, has_alpha FROM images "
            "WHERE sha256 = $1 AND deleted_at IS NULL LIMIT 1",
            row["sha256"],
        )
        if image is not None:
            return Source(**dict(image))
        await pool.execute("DELETE FROM derivations WHERE sha256 = $1", row["sha256"])  # its images all went


async def finish(pool: asyncpg.Pool, sha256: str, levels: list[int], placeholder: Placeholder | None) -> None:
    """Record the stored levels, and the placeholder on every image of the blob, under the blob's lock (which an
    upload of the same bytes holds while it copies the placeholder to its new record)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", sha256)
        await conn.execute(
            "UPDATE derivations SET state = 'done', levels = $2, error = NULL, leased_until = NULL, "
            "updated_at = clock_timestamp() WHERE sha256 = $1",
            sha256,
            levels,
        )
        if placeholder is not None:
            await conn.execute(
                "UPDATE images SET thumbhash = $2, dominant_color = $3, average_color = $4 WHERE sha256 = $1",
                sha256, placeholder.thumbhash, placeholder.dominant_color, placeholder.average_color,
            )  # fmt: skip


async def fail(pool: asyncpg.Pool, sha256: str, error: str) -> DeriveState:
    """A failed attempt: pending again (once the lease lapses) until MAX_ATTEMPTS, then failed for good."""
    state = await pool.fetchval(
        "UPDATE derivations SET error = $2, updated_at = clock_timestamp(), "
        "state = CASE WHEN attempts >= $3 THEN 'failed' ELSE 'pending' END WHERE sha256 = $1 RETURNING state",
        sha256,
        error[:500],
        MAX_ATTEMPTS,
    )
    return state or "failed"


async def forget(conn: asyncpg.Connection, sha256: str) -> None:
    """Garbage collection removed the blob: its row goes too, unless a worker holds it right now."""
    await conn.execute(
        "DELETE FROM derivations WHERE sha256 = (SELECT sha256 FROM derivations WHERE sha256 = $1 "
        "FOR UPDATE SKIP LOCKED)",
        sha256,
    )


async def counts(pool: asyncpg.Pool) -> dict[str, int]:
    """Rows by state (for `imgsvc derive` and the tests)."""
    rows = await pool.fetch("SELECT state, count(*) AS n FROM derivations GROUP BY state")
    return {row["state"]: int(row["n"]) for row in rows}
