"""CORS for the `/images` API: pages on the listed origins may call it from browsers with a bearer token.

Render routes (`/img/`) keep their own headers (see `headers.py`); cookies are never allowed (no credentials).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgsvc.errors import Forbidden

API_PATH = "/images"
ALLOW_METHODS = b"GET, HEAD, POST, DELETE"
ALLOW_HEADERS = b"Authorization, Content-Type, Idempotency-Key"
# What a page's script may read besides the CORS-safelisted headers (status and problem JSON it always can).
EXPOSE_HEADERS = b"Location, Idempotent-Replayed, Retry-After, WWW-Authenticate, X-Request-ID"
# Chromium caps it at 7200 s; a page that uploads often sends one preflight per URL per two hours.
MAX_AGE = b"7200"

ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]


def is_api(path: str) -> bool:
    return path == API_PATH or path.startswith(API_PATH + "/")


def allow_headers(origin: str) -> list[tuple[bytes, bytes]]:
    """What a response to a listed origin carries besides `Vary: Origin`."""
    return [(b"access-control-allow-origin", origin.encode()), (b"access-control-expose-headers", EXPOSE_HEADERS)]


def with_vary_origin(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers with `Origin` added to `Vary` (the answer depends on it for every request, listed or not)."""
    for index, (key, value) in enumerate(headers):
        if key.lower() == b"vary":
            if b"origin" not in value.lower():
                headers = [*headers[:index], (key, value + b", Origin"), *headers[index + 1 :]]
            return headers
    return [*headers, (b"vary", b"Origin")]


class Cors:
    """Answers preflights of `/images...` (204 for a listed origin, else 403 problem+json) and adds
    `Access-Control-Allow-Origin: <origin>` and `Vary: Origin` to its responses, errors included."""

    def __init__(self, app: ASGIApp, origins: Iterable[str], on_refused: ErrorHandler) -> None:
        self.app = app
        self.origins = frozenset(origins)
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_api(scope["path"]):
            await self.app(scope, receive, send)
            return
        origin: str | None = None
        preflight = False
        for key, value in scope["headers"]:
            key = key.lower()
            if key == b"origin" and origin is None:
                origin = value.decode("latin-1")
            elif key == b"access-control-request-method":
                preflight = scope["method"] == "OPTIONS"
        listed = origin is not None and origin in self.origins
        if preflight and origin is not None:
            await self._preflight(scope, receive, send, origin, listed)
            return
        extra = allow_headers(origin) if listed and origin is not None else []
        if extra:  # for the 500 handler, which answers from outside this middleware
            scope.setdefault("state", {})["cors_headers"] = [*extra, (b"vary", b"Origin")]

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": with_vary_origin([*message.get("headers", []), *extra])}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(self, scope: Scope, receive: Receive, send: Send, origin: str, listed: bool) -> None:
        if not listed:
            refused = Forbidden(f"the origin {origin!r} is not allowed to call this API (IMGSVC_CORS_ORIGINS)")
            response = await self.on_refused(Request(scope, receive), refused)
            response.raw_headers = with_vary_origin(response.raw_headers)
            await response(scope, receive, send)
            return
        headers = [
            (b"access-control-allow-origin", origin.encode()),
            (b"access-control-allow-methods", ALLOW_METHODS),
            (b"access-control-allow-headers", ALLOW_HEADERS),
            (b"access-control-max-age", MAX_AGE),
            (b"vary", b"Origin"),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
