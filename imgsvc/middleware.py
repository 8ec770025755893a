"""Pure ASGI middleware around every request: the request id, `nosniff`, metrics and the access log.

It also answers a remembered render request (an LRU hit, see `Renderer.remembered`) itself, before routing.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgsvc import logs, metrics
from imgsvc.headers import SECURITY
from imgsvc.render import RequestKey
from imgsvc.spec import accept_token

_RENDER_ROUTE = "/img/{id}"
# Requests a remembered answer may serve: no credentials to check, no validator to compare.
_FAST_PATH_BLOCKERS = frozenset({b"authorization", b"if-none-match", b"range"})
_REMEMBERED_REQUESTS = {m: metrics.requests_total.labels(_RENDER_ROUTE, m, "2xx") for m in ("GET", "HEAD")}
_REMEMBERED_SECONDS = metrics.request_seconds.labels(_RENDER_ROUTE, "2xx")
_BYTES_OUT = metrics.bytes_total.labels("out")


# A random per-process prefix and a counter: unique like a uuid4, without a getrandom() call per request
# (uuid4 was 14% of the CPU of an LRU hit).
_REQUEST_ID_PREFIX = uuid.uuid4().hex[:16]
_request_counter = itertools.count(1)


def _new_request_id() -> str:
    return f"{_REQUEST_ID_PREFIX}{next(_request_counter):016x}"


class RequestContext:
    def __init__(self, app: ASGIApp, access_log: bool = True) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = header(scope, b"x-request-id")
        if not rid or len(rid) > 128 or not rid.isascii() or not rid.isprintable():
            rid = _new_request_id()
        remembered = scope["path"].startswith("/img/") and scope["method"] in ("GET", "HEAD")
        if remembered and await self._send_remembered(scope, send, rid, started):
            return
        scope.setdefault("state", {})["request_id"] = rid
        token = logs.request_id.set(rid)
        status, sent, received = 500, 0, 0

        async def receive_counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        async def send_with_context(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode()))
                if not any(k.lower() == b"x-content-type-options" for k, _ in headers):
                    headers.append((b"x-content-type-options", SECURITY["X-Content-Type-Options"].encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive_counted, send_with_context)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            status_class = metrics.status_class(status)
            metrics.requests_total.labels(route, scope["method"], status_class).inc()
            metrics.request_seconds.labels(route, status_class).observe(elapsed)
            metrics.bytes_total.labels("in").inc(received)
            metrics.bytes_total.labels("out").inc(sent)
            logs.request_id.reset(token)
            if self.access_log and logs.access.isEnabledFor(logging.INFO):
                self._log(scope, route, status, elapsed, received, sent, rid)

    async def _send_remembered(self, scope: Scope, send: Send, rid: str, started: float) -> bool:
        """Answer from the renderer's remembered hits; False when this request must take the full path."""
        accept: str | None = None
        for key, value in scope["headers"]:
            key = key.lower()
            if key in _FAST_PATH_BLOCKERS:
                return False
            if key == b"accept" and accept is None:  # the first, as Starlette's headers.get() reads it
                accept = value.decode("latin-1")
        app = scope.get("app")
        services = getattr(getattr(app, "state", None), "services", None)
        if services is None:
            return False
        request: RequestKey = (scope["path"], scope["query_string"], accept_token(accept))
        answer = services.renderer.remembered(request)
        if answer is None:
            return False
        headers, body = answer
        headers = [*headers, (b"content-length", str(len(body)).encode()), (b"x-request-id", rid.encode())]
        if scope["method"] == "HEAD":
            body = b""
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        elapsed = time.perf_counter() - started
        _REMEMBERED_REQUESTS[scope["method"]].inc()
        _REMEMBERED_SECONDS.observe(elapsed)
        _BYTES_OUT.inc(len(body))
        if self.access_log and logs.access.isEnabledFor(logging.INFO):
            self._log(scope, _RENDER_ROUTE, 200, elapsed, 0, len(body), rid)
        return True

    @staticmethod
    def _log(scope: Scope, route: str, status: int, elapsed: float, received: int, sent: int, rid: str) -> None:
        client = (scope.get("client") or ("", 0))[0]  # the real one, behind a trusted proxy
        fields = {"method": scope["method"], "uri": loggable_uri(scope), "route": route, "status": status,
                  "ms": round(elapsed * 1000, 2), "bytes_in": received, "bytes_out": sent, "client": client,
                  "request_id": rid}  # fmt: skip
        logs.access.info("%s %s %d", scope["method"], scope["path"], status, extra={"fields": fields})


def loggable_uri(scope: Scope) -> str:
    """Path and query as received, with a signature's `s` redacted: a signed URL with `exp` is a capability."""
    query = scope.get("query_string", b"").decode("latin-1")
    if not query:
        return str(scope["path"])
    redacted = "&".join("s=REDACTED" if part.startswith("s=") else part for part in query.split("&"))
    return f"{scope['path']}?{redacted}"


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None
