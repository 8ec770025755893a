"""Pure ASGI middleware around every request: the request id, `nosniff`, metrics and the access log."""

from __future__ import annotations

import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgsvc import logs, metrics
from imgsvc.headers import SECURITY


class RequestContext:
    def __init__(self, app: ASGIApp, access_log: bool = True) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = header(scope, b"x-request-id")
        if not rid or len(rid) > 128 or not rid.isascii() or not rid.isprintable():
            rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = logs.request_id.set(rid)
        started = time.perf_counter()
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
            if self.access_log:
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
