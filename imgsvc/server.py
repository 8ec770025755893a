"""uvicorn with a drain: on SIGTERM `/readyz` turns 503 at once, requests keep being served for
`drain_seconds` (so load balancers stop sending new ones), then uvicorn shuts down gracefully."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading
from types import FrameType

import uvicorn
from starlette.applications import Starlette

log = logging.getLogger("imgsvc.server")
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8  # glibc's mallopt parameters


def tune_malloc(mmap_threshold: int = 128 * 1024, arena_max: int = 2) -> bool:
    """glibc only, before any thread starts: serve large buffers (originals, renders) from mmap, so freeing
    them returns memory to the OS (glibc's sliding threshold otherwise keeps them on the heap, and RSS only
    grows), and cap per-thread arenas. Environment variables (MALLOC_ARENA_MAX, ...) still take precedence."""
    if sys.platform != "linux" or not ctypes.util.find_library("c"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallopt"):
        return False
    ok = True
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        ok &= bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
    if "MALLOC_ARENA_MAX" not in os.environ:
        ok &= bool(libc.mallopt(_M_ARENA_MAX, arena_max))
    return ok


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
