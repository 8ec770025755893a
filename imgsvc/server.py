"""uvicorn as imgsvc runs it: slow clients cut (header deadline, bounded connections, no lingering bodies),
and a drain: on SIGTERM `/readyz` turns 503 at once, requests keep being served for `drain_seconds`, then
uvicorn shuts down gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from imgsvc import logs
from imgsvc.errors import ImgsvcError, Overloaded, RequestTimeout

log = logging.getLogger("imgsvc.server")
FD_RESERVE = 256  # descriptors kept for everything but client connections: database pool, blobs, logs, libvips
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
    def __init__(self, config: uvicorn.Config, draining: threading.Event, drain_seconds: float) -> None:
        super().__init__(config)
        self.draining = draining  # the flag /readyz reports (`app.create_app(draining=...)`)
        self.drain_seconds = drain_seconds
        self._draining = False

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn ends a process stopped by a signal with that signal again, which skips `atexit`: the queued
        log lines are written before."""
        with super().capture_signals():
            try:
                yield
            finally:
                logs.flush()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.draining.set()
        if self._draining or self.drain_seconds <= 0:  # a second signal, or no drain: stop now
            super().handle_exit(sig, frame)
            return
        self._draining = True
        log.info("draining: /readyz answers 503; shutting down in %.1f s", self.drain_seconds)
        timer = threading.Timer(self.drain_seconds, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()


@dataclass(frozen=True, slots=True)
class ClientLimits:
    header_timeout: float = 10.0
    max_connections: int = 1000
    linger: float = 5.0  # after a response sent before its request body ended, keep discarding it this long


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus what it lacks against slow clients: a deadline for each request's
    headers, a bound on open connections, and a bounded linger after a response that did not wait for its body."""

    limits: ClassVar[ClientLimits] = ClientLimits()
    refusing: ClassVar[bool] = False  # at the connection limit: logged once per change, not per connection

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        full = len(self.connections) >= self.limits.max_connections
        super().connection_made(transport)
        limit = self.limits.max_connections
        if full != type(self).refusing:
            type(self).refusing = full
            if full:
                log.warning("%d connections open, the limit: new ones are answered 503 and closed", limit)
            else:
                log.info("below the limit of %d open connections again", limit)
        if full:
            error = Overloaded(f"the server holds its limit of {limit} open connections; retry shortly")
            self._refuse(error, "Too many open connections", retry_after=1)
        else:
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._header_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._unset_keepalive_if_required()  # armed when an early-answered body ended in this same read
        if self._header_timer is None:
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._linger_timer is not None:  # the rest of a body answered early has arrived: keep-alive as usual
            self._linger_timer.cancel()
            self._linger_timer = None
            if self.timeout_keep_alive_task is None and not self.transport.is_closing():
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle  # the newest request: a pipelined one may have started meanwhile
        if cycle is not None and cycle.response_complete and cycle.more_body and not self.transport.is_closing():
            self._linger_timer = self.loop.call_later(self.limits.linger, self.transport.close)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._headers_late)

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # a pipelined request is late: finish the current answer, then close
            return
        timeout = self.limits.header_timeout
        error = RequestTimeout(f"the request headers were not complete after {timeout:g} s")
        log.info("408 to %s: %s", self.client, error.detail)  # no request, hence no access-log line
        self._refuse(error, "Request headers incomplete")

    def _refuse(self, error: ImgsvcError, title: str, retry_after: int | None = None) -> None:
        """Answer without the application (no request was parsed) and close."""
        if self.transport.is_closing():
            return
        body = json.dumps(error.problem() | {"title": title}).encode()
        head = [STATUS_LINE[error.status]]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head.append(b"content-type: application/problem+json\r\ncache-control: no-store\r\n")
        head.append(b"x-content-type-options: nosniff\r\nconnection: close\r\n")
        if retry_after is not None:
            head.append(b"retry-after: %d\r\n" % retry_after)
        head.append(b"content-length: %d\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def guarded_protocol(limits: ClientLimits) -> type[GuardedHttpProtocol]:
    """The protocol class to hand uvicorn as `http=` (uvicorn instantiates it once per connection)."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"limits": limits})


def fit_connections(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE (up to the hard one) so that max_connections fit with FD_RESERVE to spare;
    the number of connections that fit (fewer, with a warning, when the hard limit is too low)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max_connections + FD_RESERVE
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return max_connections
    soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft < needed:
        fitting = max(1, soft - FD_RESERVE)
        log.warning("IMGSVC_MAX_CONNECTIONS=%d needs %d file descriptors, the hard limit is %d: "
                    "serving at most %d connections", max_connections, needed, soft, fitting)  # fmt: skip
        return fitting
    return max_connections


def shared_socket(host: str, port: int) -> socket.socket:
    """A socket bound with SO_REUSEPORT: several imgsvc processes bind the same port, and the kernel spreads new
    connections over them. Not listening yet: uvicorn listens once the application has started, so no
    connection waits in the backlog of a process that is still starting."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def supervise(command: list[str], env: dict[str, str], processes: int) -> int:
    """Run `processes` copies of `command` (each binding the port with SO_REUSEPORT); SIGTERM/SIGINT are passed
    on to every one (each drains and stops by itself); when one ends on its own, the others are stopped too.
    The exit status is the first nonzero one of the copies."""
    children = [subprocess.Popen(command, env=env) for _ in range(processes)]
    log.info("serving with %d processes: pids %s", processes, " ".join(str(c.pid) for c in children))
    stopping = threading.Event()

    def forward(sig: int, frame: FrameType | None) -> None:
        stopping.set()
        for child in children:
            if child.poll() is None:
                child.send_signal(sig)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while all(child.poll() is None for child in children) and not stopping.is_set():
            stopping.wait(0.5)
        if not stopping.is_set():
            ended = next(child for child in children if child.poll() is not None)
            log.error("process %d ended with status %s: stopping the others", ended.pid, ended.returncode)
            forward(signal.SIGTERM, None)
        codes = [child.wait() for child in children]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return next((code for code in codes if code not in (0, -signal.SIGTERM, -signal.SIGINT)), 0)
