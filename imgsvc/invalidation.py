"""Deletes that reach every replica: a Postgres LISTEN on the delete channel, kept alive and reconnected.

While the listener is down a replica cannot trust what it cached about images, so it says so
(`on_state(False)`) and the renderer reads the catalog on every request until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg

from imgsvc.catalog import DELETES_CHANNEL, DeleteNotice

log = logging.getLogger("imgsvc.invalidation")
APPLICATION_NAME = "imgsvc-delete-listener"  # how the listening connection shows in pg_stat_activity


class DeleteListener:
    def __init__(
        self,
        dsn: str,
        on_delete: Callable[[DeleteNotice], None],
        on_state: Callable[[bool], None],
        *,
        check_every: float = 0.5,
    ) -> None:
        self.dsn = dsn
        self.on_delete = on_delete
        self.on_state = on_state
        self.check_every = check_every
        self.connection: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._connect()
        self._task = asyncio.create_task(self._supervise(), name="imgsvc-delete-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.connection.close(timeout=2)

    async def _connect(self) -> None:
        connection = await asyncpg.connect(self.dsn, timeout=5, server_settings={"application_name": APPLICATION_NAME})
        await connection.add_listener(DELETES_CHANNEL, self._notified)
        self.connection = connection
        self.on_state(True)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.on_delete(DeleteNotice.parse(payload))

    async def _supervise(self) -> None:
        """Ping the listening connection; on failure, distrust caches and reconnect with backoff."""
        delay, failures = self.check_every, 0
        while True:
            await asyncio.sleep(delay)
            try:
                assert self.connection is not None
                if self.connection.is_closed():
                    raise ConnectionError("listener connection closed")
                await self.connection.fetchval("SELECT 1", timeout=2)
                delay = self.check_every
                continue
            except Exception as exc:
                self.on_state(False)
                if failures == 0:
                    log.warning("delete listener lost (%s); reconnecting", type(exc).__name__)
            with contextlib.suppress(Exception):
                assert self.connection is not None
                self.connection.terminate()
            try:
                await self._connect()
                log.info("delete listener reconnected")
                delay, failures = self.check_every, 0
            except Exception as exc:  # the database is down: one line per outage, not per attempt
                failures += 1
                level = logging.INFO if failures == 1 else logging.DEBUG
                log.log(level, "delete listener reconnect failed (%s); retrying", type(exc).__name__)
                delay = min(delay * 2, 5.0)
