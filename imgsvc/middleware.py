"""Pure ASGI middleware around every request: the request id, `nosniff`, metrics, view counts, the access log.

It is the outermost layer, so it also answers a remembered render request (see `hits.HitIndex`) before routing.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgsvc import logs, metrics
from imgsvc.headers import NOSNIFF
from imgsvc.hits import HitIndex, request_key
from imgsvc.views import VIEWED_STATUSES, ViewCounter

RENDER_ROUTE = "/img/{id}"
RENDER_PREFIX = RENDER_ROUTE.split("{", 1)[0]
# Requests a remembered answer may serve: no credentials to check, no range to cut (If-None-Match is compared).
_FAST_PATH_BLOCKERS = frozenset({b"authorization", b"range"})
_BYTES_IN, _BYTES_OUT = metrics.bytes_total.labels("in"), metrics.bytes_total.labels("out")


# A random per-process prefix and a counter: unique like a uuid4, without a getrandom() call per request
# (uuid4 was 14% of the CPU of an LRU hit).
_REQUEST_ID_PREFIX = uuid.uuid4().hex[:16]
_request_counter = itertools.count(1)


def _new_request_id() -> str:
    return f"{_REQUEST_ID_PREFIX}{next(_request_counter):016x}"


def context_headers(rid: str) -> list[tuple[bytes, bytes]]:
    """What every response carries, whatever answered it: its request id and `nosniff`."""
    return [(b"x-request-id", rid.encode()), NOSNIFF]


class RequestContext:
    """Gives each request its id (the client's `X-Request-ID` if sane), adds the context headers to its
    response, counts it in the metrics (and, answered 200/304 to a GET /img/, as a view of its image) and writes
    the access log line; a remembered hit is answered here."""

    def __init__(self, app: ASGIApp, hits: HitIndex, access_log: bool = True, views: ViewCounter | None = None) -> None:
        self.app = app
        self.hits = hits
        self.access_log = access_log
        self.views = views
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = header(scope, b"x-request-id")
        if not rid or len(rid) > 128 or not rid.isascii() or not rid.isprintable():
            rid = _new_request_id()
        remembered = scope["path"].startswith(RENDER_PREFIX) and scope["method"] in ("GET", "HEAD")
        if remembered and await self._send_remembered(scope, send, rid, started):
            return
        scope.setdefault("state", {})["request_id"] = rid
        token = logs.request_id.set(rid)
        status, sent, received, cache = 500, 0, 0, ""

        async def receive_counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        async def send_with_context(message: Message) -> None:
            nonlocal status, sent, cache
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = []
                for key, value in message.get("headers", []):
                    name = key.lower()
                    if name == b"x-cache":
                        cache = value.decode("latin-1")
                    if name != b"x-request-id":
                        headers.append((key, value))
                message = {**message, "headers": headers + context_headers(rid)}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive_counted, send_with_context)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self._finish(scope, route, status, started, received, sent, rid, cache)
            logs.request_id.reset(token)

    async def _send_remembered(self, scope: Scope, send: Send, rid: str, started: float) -> bool:
        """Answer from the hit index; False when this request must take the full path."""
        accept: str | None = None
        if_none_match: str | None = None
        for key, value in scope["headers"]:
            key = key.lower()
            if key in _FAST_PATH_BLOCKERS:
                return False
            if key == b"accept" and accept is None:  # the first, as Starlette's headers.get() reads it
                accept = value.decode("latin-1")
            elif key == b"if-none-match" and if_none_match is None:
                if_none_match = value.decode("latin-1")
        answer = self.hits.answer(request_key(scope["path"], scope["query_string"], accept), if_none_match)
        if answer is None:
            return False
        body = answer.body
        headers = [*answer.headers, *context_headers(rid)]
        if answer.status == 200:
            headers.insert(len(answer.headers), (b"content-length", str(len(body)).encode()))
        if scope["method"] == "HEAD":
            body = b""
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self._finish(scope, RENDER_ROUTE, answer.status, started, 0, len(body), rid, "hit")
        return True

    def _finish(self, scope: Scope, route: str, status: int, started: float, received: int, sent: int,
                rid: str, cache: str) -> None:  # fmt: skip
        elapsed = time.perf_counter() - started
        if status in VIEWED_STATUSES and route == RENDER_ROUTE and scope["method"] == "GET" and self.views is not None:
            self.views.count(scope["path"][len(RENDER_PREFIX) :])  # a view: remembered or full path, 200 or 304
        labels = (route, scope["method"], status)
        children = self._children.get(labels)
        if children is None:  # bounded: routes x methods x statuses
            status_class = metrics.status_class(status)
            children = (
                metrics.requests_total.labels(route, scope["method"], status_class),
                metrics.request_seconds.labels(route, status_class),
            )
            self._children[labels] = children
        children[0].inc()
        children[1].observe(elapsed)
        if received:
            _BYTES_IN.inc(received)
        _BYTES_OUT.inc(sent)
        if self.access_log and logs.access.isEnabledFor(logging.INFO):
            client = (scope.get("client") or ("", 0))[0]  # the real one, behind a trusted proxy
            query = scope.get("query_string", b"")
            logs.log_access(logs.AccessEntry(time.time(), scope["method"], scope["path"], query, route, status,
                                             elapsed, received, sent, client, rid, cache))  # fmt: skip


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None
