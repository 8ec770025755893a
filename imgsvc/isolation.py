"""Run a function in a child process that is killed at a deadline, for decoders no callback can interrupt.

Children are started on first use and reused; a killed or dead child is replaced on the next call.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from imgsvc.errors import ImgsvcError

T = TypeVar("T")


class Expired(Exception):
    """The deadline passed before the child answered; the child was killed."""


class ChildDied(Exception):
    """The child exited while working (e.g. a crashing decoder)."""


class _Child:
    """`python -m imgsvc.isolation`, talking pickles over two pipes (a fresh interpreter: forking a threaded
    process is unsafe, and multiprocessing's spawn would import the parent's `__main__`, here the server)."""

    def __init__(self) -> None:
        requests_in, requests_out = os.pipe()
        results_in, results_out = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imgsvc.isolation", str(requests_in), str(results_out)],
            pass_fds=(requests_in, results_out),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            # A child reports no metrics; in multiprocess mode its files would outlive it in the shared directory.
            env={name: value for name, value in os.environ.items() if name != "PROMETHEUS_MULTIPROC_DIR"},
        )
        os.close(requests_in)
        os.close(results_out)
        self.requests = Connection(requests_out, readable=False)
        self.results = Connection(results_in, writable=False)

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(5)
        self.requests.close()
        self.results.close()

    def stop(self) -> None:
        """Close its requests pipe: an idle child exits on the end of its input."""
        self.requests.close()
        try:
            self.process.wait(2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.results.close()


class KillablePool:
    """Idle children, at most one per calling thread at a time."""

    def __init__(self) -> None:
        self._idle: list[_Child] = []
        self._lock = threading.Lock()
        atexit.register(self.close)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for child in idle:
            child.stop()

    def run(self, fn: Callable[..., T], args: tuple[Any, ...], *, expires: float) -> T:
        """`fn(*args)` in a child; raises Expired once `time.monotonic()` passes `expires`, and what `fn` raised
        (ImgsvcError subclasses keep their detail, param and headers)."""
        with self._lock:
            child = self._idle.pop() if self._idle else None
        if child is None or not child.alive():
            child = _Child()
        if time.monotonic() >= expires:  # starting the child took the time left: keep it for the next call
            self._give(child)
            raise Expired
        try:
            child.requests.send((fn, args))
            answered = child.results.poll(max(0.0, expires - time.monotonic()))
            outcome = child.results.recv() if answered else None
        except (EOFError, OSError) as exc:
            child.kill()
            raise ChildDied from exc
        if outcome is None:
            child.kill()
            self._give(_Child())  # starts now, so the next call finds it ready rather than paying for its start
            raise Expired
        self._give(child)
        return _unwrap(outcome)

    def _give(self, child: _Child) -> None:
        with self._lock:
            self._idle.append(child)


def _serve(requests: Connection, results: Connection) -> None:
    while True:
        try:
            fn, args = requests.recv()
        except (EOFError, KeyboardInterrupt):
            return
        try:
            results.send(("ok", fn(*args)))
        except ImgsvcError as exc:
            results.send(("problem", (type(exc), exc.detail, exc.param, exc.headers)))
        except Exception as exc:  # anything else is raised again in the parent
            results.send(("error", exc))


def _unwrap(outcome: tuple[str, Any]) -> Any:
    kind, value = outcome
    if kind == "ok":
        return value
    if kind == "problem":
        cls, detail, param, headers = value
        raise cls(detail, param=param, headers=headers)
    raise value


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False))
