"""CDN purge outbox: jobs written in a delete's transaction, delivered to each purge target by one sender.

The sender runs on whichever replica holds a Postgres advisory lock; it is woken by NOTIFY and retries with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal
from urllib.parse import urlsplit

import asyncpg
import httpx

from imgsvc import metrics, nginx_deny

log = logging.getLogger("imgsvc.purge")
PURGE_CHANNEL = "imgsvc_purge"
_SENDER_LOCK = 0x70757267  # advisory lock id ("purg"): one sender at a time across replicas
TAKEOVER_SECONDS = 1.0  # how often a standby replica tries the sender lock (and the sender checks its connection)
Reason = Literal["delete", "resend"]
TargetKind = Literal["webhook", "cloudflare", "fastly", "nginx"]
SIGNATURE_HEADER = "Imgsvc-Signature"
DELIVERY_HEADER = "Imgsvc-Delivery"


def cache_tag(image_id: str) -> str:
    return f"img-{image_id}"


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    image_id: str
    reason: Reason
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Target:
    """One purge API: how a job becomes its HTTP request. `name` identifies it in the database."""

    kind: TargetKind
    url: str  # webhook: the URL; cloudflare/fastly: the API base URL; nginx: the node's deny-list feed
    account: str = ""  # cloudflare zone id, fastly service id
    secret: str = ""  # webhook signing secret, cloudflare API token, fastly API key, nginx feed key
    prefix: str = ""  # cloudflare: purge the URL prefix `<prefix><image id>` instead of the image's cache tag

    @property
    def name(self) -> str:
        """kind:scheme://host/path[/account]: without userinfo or query, which may carry credentials."""
        url = urlsplit(self.url)
        address = f"{url.scheme}://{url.hostname}{f':{url.port}' if url.port else ''}{url.path}"
        return f"{self.kind}:{address}" + (f"/{self.account}" if self.account else "")

    def request(self, job: Job, now: float) -> tuple[str, dict[str, str], bytes]:
        """(url, headers, body) of the POST that purges `job`'s image."""
        tag = cache_tag(job.image_id)
        base = self.url.rstrip("/")
        if self.kind == "cloudflare":
            what = {"prefixes": [f"{self.prefix}{job.image_id}"]} if self.prefix else {"tags": [tag]}
            body = json.dumps(what).encode()
            headers = {"Authorization": f"Bearer {self.secret}", "Content-Type": "application/json"}
            return f"{base}/zones/{self.account}/purge_cache", headers, body
        if self.kind == "fastly":
            return f"{base}/service/{self.account}/purge/{tag}", {"Fastly-Key": self.secret}, b""
        if self.kind == "nginx":
            return nginx_deny.feed_request(self.url, self.secret, [job.image_id])
        body = json.dumps(
            {"event": "image.purge", "reason": job.reason, "image_id": job.image_id, "tags": [tag], "job": job.id,
             "created_at": job.created_at.isoformat()}, separators=(",", ":"),
        ).encode()  # fmt: skip
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.secret, body, int(now)),
            DELIVERY_HEADER: str(job.id),  # the same on every attempt: receivers drop repeats by it
        }
        return self.url, headers, body


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """`t=<unix>,v1=<hex HMAC-SHA256 of "<t>." + body>`: the receiver recomputes it and rejects old timestamps."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base: float = 1.0
    cap: float = 60.0

    def delay(self, attempt: int) -> float:
        """Exponential from `base`, capped, with jitter (half to all of it) so retries of many jobs spread."""
        return min(self.cap, self.base * 2 ** min(attempt - 1, 30)) * random.uniform(0.5, 1.0)


NGINX_RETRY = RetryPolicy(base=0.2, cap=1.0)  # a node back from an outage gets its deletes within about a second


async def enqueue(conn: asyncpg.Connection, image_id: str, reason: Reason) -> int:
    """Write a purge job for every registered target, inside the caller's transaction; senders hear of it on commit."""
    job = int(await conn.fetchval("INSERT INTO purge_jobs (image_id, reason) VALUES ($1, $2) RETURNING id",
                                  image_id, reason))  # fmt: skip
    await conn.execute("INSERT INTO purge_deliveries (job_id, target) SELECT $1, name FROM purge_targets", job)
    await conn.execute("SELECT pg_notify($1, $2)", PURGE_CHANNEL, str(job))
    return job


@dataclass(frozen=True, slots=True)
class Pending:
    job: int
    image_id: str
    target: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime


async def pending(pool: asyncpg.Pool) -> list[Pending]:
    """Undelivered (job, target) pairs, per target in delivery order."""
    rows = await pool.fetch(
        "SELECT d.job_id AS job, j.image_id, d.target, d.attempts, d.next_attempt_at, d.last_error, j.created_at "
        "FROM purge_deliveries d JOIN purge_jobs j ON j.id = d.job_id WHERE d.delivered_at IS NULL "
        "ORDER BY d.target, d.job_id"
    )
    return [Pending(**dict(r)) for r in rows]


async def expire(pool: asyncpg.Pool, keep: timedelta) -> int:
    """Remove jobs older than `keep` that every target has received; return how many."""
    status = await pool.execute(
        "DELETE FROM purge_jobs j WHERE created_at < clock_timestamp() - $1::interval AND NOT EXISTS "
        "(SELECT 1 FROM purge_deliveries d WHERE d.job_id = j.id AND d.delivered_at IS NULL)",
        keep,
    )
    return int(status.split()[-1])


class PurgeSender:
    """Delivers the outbox while this replica holds the sender lock: one task per target, oldest job first, the
    next job only once the previous one is delivered (so each target sees deletes in order). A delivery counts
    as an attempt before its request is sent, so a crash mid-request retries after the backoff on any replica."""

    def __init__(
        self, dsn: str, pool: asyncpg.Pool, targets: Sequence[Target], retry: RetryPolicy, timeout: float
    ) -> None:
        self.dsn = dsn
        self.pool = pool
        self.targets = tuple(targets)
        self.retry = retry
        self.timeout = timeout
        self._wake = {t.name: asyncio.Event() for t in self.targets}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.targets:
            self._task = asyncio.create_task(self._supervise(), name="imgsvc-purge-sender")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _notified(self, _conn: object, _pid: int, _channel: str, _payload: str) -> None:
        for event in self._wake.values():
            event.set()

    async def _supervise(self) -> None:
        failures = 0
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=5)
                while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _SENDER_LOCK, timeout=5):
                    await asyncio.sleep(TAKEOVER_SECONDS)
                failures = 0
                log.info("purge sender active for %d targets", len(self.targets))
                await conn.add_listener(PURGE_CHANNEL, self._notified)
                await self._register(conn)
                await self._send_while_locked(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database went away: let go, reconnect, contend for the lock again
                failures += 1
                log.log(logging.WARNING if failures == 1 else logging.DEBUG, "purge sender paused (%r)", exc)
            finally:
                if conn is not None:
                    conn.terminate()  # closing the session releases the lock
            await asyncio.sleep(min(TAKEOVER_SECONDS * 2**failures, 10.0))

    async def _register(self, conn: asyncpg.Connection) -> None:
        """Make the configured targets the registered ones: new jobs get a delivery row for each."""
        names = [t.name for t in self.targets]
        async with conn.transaction():
            await conn.execute("DELETE FROM purge_targets WHERE name <> ALL($1::text[])", names)
            await conn.execute("INSERT INTO purge_targets (name) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
                               names)  # fmt: skip

    async def _send_while_locked(self, conn: asyncpg.Connection) -> None:
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as client, asyncio.TaskGroup() as tg:
            for target in self.targets:
                tg.create_task(self._deliver_forever(client, target))
                if target.kind == "nginx":
                    tg.create_task(nginx_deny.keep_synced(client, self.pool, target.url, target.secret))
            while True:  # a lost session has lost the lock: stop sending (the TaskGroup cancels the targets)
                await asyncio.sleep(TAKEOVER_SECONDS)
                count = await conn.fetchval("SELECT count(*) FROM purge_deliveries WHERE delivered_at IS NULL",
                                            timeout=5)  # fmt: skip
                metrics.purge_pending.set(count)

    async def _deliver_forever(self, client: httpx.AsyncClient, target: Target) -> None:
        wake = self._wake[target.name]
        while True:
            wake.clear()
            try:
                wait = await self._deliver_next(client, target)
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
                log.warning("purge %s: database error (%r)", target.name, exc)
                wait = TAKEOVER_SECONDS
            except Exception as exc:  # e.g. the pool's Unavailable during an outage
                log.warning("purge %s: %r", target.name, exc)
                wait = TAKEOVER_SECONDS
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=wait)

    async def _deliver_next(self, client: httpx.AsyncClient, target: Target) -> float:
        """Try the target's oldest undelivered job; return how long to wait before looking again (0: at once)."""
        row = await self.pool.fetchrow(
            "SELECT d.job_id, j.image_id, j.reason, j.created_at, d.attempts, "
            "extract(epoch FROM d.next_attempt_at - clock_timestamp())::float8 AS wait "
            "FROM purge_deliveries d JOIN purge_jobs j ON j.id = d.job_id "
            "WHERE d.target = $1 AND d.delivered_at IS NULL ORDER BY d.job_id LIMIT 1",
            target.name,
        )
        if row is None:
            return 30.0  # idle until a NOTIFY (the wait is a safety net for a missed one)
        if row["wait"] > 0:
            return float(row["wait"])
        job = Job(row["job_id"], row["image_id"], row["reason"], row["created_at"])
        attempt = row["attempts"] + 1
        retry = NGINX_RETRY if target.kind == "nginx" else self.retry
        await self.pool.execute(
            "UPDATE purge_deliveries SET attempts = $3, "
            "next_attempt_at = clock_timestamp() + make_interval(secs => $4) WHERE job_id = $1 AND target = $2",
            job.id, target.name, attempt, retry.delay(attempt),
        )  # fmt: skip
        error = await self._send(client, target, job)
        if error is None:
            lag = await self.pool.fetchval(
                "UPDATE purge_deliveries d SET delivered_at = clock_timestamp(), last_error = NULL FROM purge_jobs j "
                "WHERE d.job_id = $1 AND d.target = $2 AND j.id = d.job_id "
                "RETURNING extract(epoch FROM d.delivered_at - j.created_at)::float8",
                job.id, target.name,
            )  # fmt: skip
            metrics.purge_lag_seconds.observe(max(0.0, lag or 0.0))
            return 0.0
        metrics.purge_failures.labels(target.name).inc()
        log.warning("purge %s of %s failed (attempt %d): %s", target.name, job.image_id, attempt, error)
        await self.pool.execute(
            "UPDATE purge_deliveries SET last_error = $3 WHERE job_id = $1 AND target = $2",
            job.id, target.name, error[:500],
        )  # fmt: skip
        return 0.0  # the next look finds the backoff in next_attempt_at

    async def _send(self, client: httpx.AsyncClient, target: Target, job: Job) -> str | None:
        """None on a 2xx answer; otherwise what went wrong."""
        url, headers, body = target.request(job, time.time())
        timeout = min(self.timeout, nginx_deny.TIMEOUT) if target.kind == "nginx" else self.timeout
        try:
            response = await client.post(url, headers=headers, content=body, timeout=timeout)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:500] or type(exc).__name__
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}: {response.text[:200]}"
