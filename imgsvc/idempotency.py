"""Idempotency keys in Postgres: a retried upload gets the first answer, on every replica.

A key is claimed before the work and completed in the transaction that records the image; a
failed request releases it, and a claim whose holder died is taken over after `stale_after`.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import asyncpg

from imgsvc.errors import Conflict, IdempotencyKeyReused, InvalidParameter

KeyScope = Literal["upload", "import"]
MAX_KEY_LENGTH = 255
_KEY = re.compile(r"^[A-Za-z0-9._:~+/=-]{1,255}$")
HEADER = "Idempotency-Key"


def parse_key(header: str | None) -> str | None:
    """The key of an `Idempotency-Key` header: a structured-field string (`"..."`) or a bare token,
    1..255 of letters, digits and `. _ : ~ + / = -`; anything else is a 400 naming the header."""
    if header is None:
        return None
    text = header.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    if not _KEY.match(text):
        raise InvalidParameter(
            f"{HEADER} must be 1 to {MAX_KEY_LENGTH} letters, digits or . _ : ~ + / = - (optionally quoted)",
            param=HEADER,
        )
    return text


@dataclass(frozen=True, slots=True)
class Claim:
    """This request holds the key: do the work, then `complete` it in the same transaction."""

    owner: str
    scope: KeyScope
    key: str
    token: str


@dataclass(frozen=True, slots=True)
class Replay:
    """An earlier request with this key and the same fingerprint created `image_id`."""

    image_id: str


class IdempotencyKeys:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        ttl: timedelta = timedelta(hours=24),
        stale_after: timedelta = timedelta(minutes=2),
    ) -> None:
        self.pool = pool
        self.ttl = ttl
        self.stale_after = stale_after

    async def claim(self, owner: str, scope: KeyScope, key: str, fingerprint: str) -> Claim | Replay:
        """Claim the key, or wait while another request holds it; the same key with another fingerprint is 422.

        Upload keys expire after `ttl`; import keys never do (an import is resumable at any time)."""
        deadline = time.monotonic() + self.stale_after.total_seconds() + 5
        pause = 0.02
        while True:
            token = secrets.token_urlsafe(12)
            row = await self.pool.fetchrow(
                """WITH now AS (SELECT clock_timestamp() AS at)
                   INSERT INTO idempotency_keys AS k (owner, scope, key, fingerprint, claim, claimed_at, expires_at)
                   SELECT $1, $2, $3, $4, $5, now.at, CASE WHEN $2 = 'upload' THEN now.at + $6::interval END FROM now
                   ON CONFLICT (owner, scope, key) DO UPDATE
                      SET fingerprint = EXCLUDED.fingerprint, claim = EXCLUDED.claim, image_id = NULL,
                          claimed_at = EXCLUDED.claimed_at, expires_at = EXCLUDED.expires_at
                      WHERE k.expires_at < clock_timestamp()
                         OR (k.image_id IS NULL AND k.claimed_at < clock_timestamp() - $7::interval)
                   RETURNING NULL AS image_id, NULL AS fingerprint, true AS claimed""",
                owner, scope, key, fingerprint, token, self.ttl, self.stale_after,
            )  # fmt: skip
            if row is not None:
                return Claim(owner, scope, key, token)
            row = await self.pool.fetchrow(
                "SELECT fingerprint, image_id FROM idempotency_keys WHERE owner = $1 AND scope = $2 AND key = $3",
                owner, scope, key,
            )  # fmt: skip
            if row is None:  # released by a failed first request meanwhile: claim it now
                continue
            if row["fingerprint"] != fingerprint:
                raise IdempotencyKeyReused(
                    f"this key ({HEADER}) was already used for another upload (other bytes or options); "
                    "use a new key for a new upload",
                    param=HEADER,
                )
            if row["image_id"] is not None:
                return Replay(row["image_id"])
            if time.monotonic() > deadline:
                raise Conflict(f"an upload with this {HEADER} is still in progress", param=HEADER,
                               headers={"Retry-After": "5"})  # fmt: skip
            await asyncio.sleep(pause)  # the first request is still at work: wait for its answer
            pause = min(pause * 2, 0.25)

    async def complete(self, conn: asyncpg.Connection, claim: Claim, image_id: str) -> None:
        """Record the answer; raises (so the caller's transaction, and its image, roll back) if the claim
        was taken over meanwhile as stale."""
        status = await conn.execute(
            "UPDATE idempotency_keys SET image_id = $5 WHERE owner = $1 AND scope = $2 AND key = $3 AND claim = $4",
            claim.owner, claim.scope, claim.key, claim.token, image_id,
        )  # fmt: skip
        if status != "UPDATE 1":
            raise Conflict(f"this {HEADER} was taken over by a later request; retry with it", param=HEADER,
                           headers={"Retry-After": "1"})  # fmt: skip

    async def release(self, claim: Claim) -> None:
        """The request failed: a retry with the same key may try again."""
        await self.pool.execute(
            "DELETE FROM idempotency_keys WHERE owner = $1 AND scope = $2 AND key = $3 AND claim = $4 "
            "AND image_id IS NULL",
            claim.owner, claim.scope, claim.key, claim.token,
        )  # fmt: skip

    async def expire(self) -> int:
        """Delete upload keys past their 24 h (run by the garbage collector)."""
        status = await self.pool.execute("DELETE FROM idempotency_keys WHERE expires_at < clock_timestamp()")
        return int(status.split()[-1])
