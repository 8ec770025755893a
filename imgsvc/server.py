"""uvicorn with a drain: on SIGTERM `/readyz` turns 503 at once, requests keep being served for
`drain_seconds` (so load balancers stop sending new ones), then uvicorn shuts down gracefully."""

from __future__ import annotations

import logging
import threading
from types import FrameType

import uvicorn
from starlette.applications import Starlette

log = logging.getLogger("imgsvc.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Starlette, drain_seconds: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_seconds = drain_seconds
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        services = getattr(self.app.state, "services", None)
        if services is not None:
            services.draining = True
        if self._draining or self.drain_seconds <= 0:  # a second signal, or no drain: stop now
            super().handle_exit(sig, frame)
            return
        self._draining = True
        log.info("draining: /readyz answers 503; shutting down in %.1f s", self.drain_seconds)
        timer = threading.Timer(self.drain_seconds, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()
