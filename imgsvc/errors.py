"""One exception hierarchy for everything a client can be told.

Each class carries its HTTP status and a stable RFC 9457 problem type; only the
handler in `app.py` turns them into `application/problem+json` responses.
"""

from __future__ import annotations

from collections.abc import Mapping

PROBLEM_BASE = "/problems/"


class ImgsvcError(Exception):
    """Base of every error a client may see; the message is the problem's `detail`."""

    status: int = 500
    slug: str = "internal-error"
    title: str = "Internal error"

    def __init__(self, detail: str, *, param: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})

    @property
    def type(self) -> str:
        return PROBLEM_BASE + self.slug

    def problem(self) -> dict[str, object]:
        body: dict[str, object] = {"type": self.type, "title": self.title, "status": self.status, "detail": self.detail}
        if self.param is not None:
            body["param"] = self.param
        return body


class InvalidParameter(ImgsvcError):
    status, slug, title = 400, "invalid-parameter", "Invalid parameter"


class BadRequest(ImgsvcError):
    status, slug, title = 400, "bad-request", "Bad request"


class Unauthorized(ImgsvcError):
    status, slug, title = 401, "unauthorized", "Authentication required"


class Forbidden(ImgsvcError):
    status, slug, title = 403, "forbidden", "Forbidden"


class NotFound(ImgsvcError):
    status, slug, title = 404, "not-found", "Not found"


class RequestTimeout(ImgsvcError):
    status, slug, title = 408, "request-timeout", "The request body stopped arriving"


class Conflict(ImgsvcError):
    status, slug, title = 409, "conflict", "Conflicts with a request in progress"


class PayloadTooLarge(ImgsvcError):
    status, slug, title = 413, "payload-too-large", "Upload too large"


class UnsupportedFormat(ImgsvcError):
    status, slug, title = 415, "unsupported-format", "Unsupported image format"


class UndecodableImage(ImgsvcError):
    status, slug, title = 422, "undecodable-image", "Image cannot be decoded"


class ImageTooLarge(ImgsvcError):
    status, slug, title = 422, "image-too-large", "Image exceeds the pixel limit"


class TooManyFrames(ImgsvcError):
    status, slug, title = 422, "too-many-frames", "Image has too many frames"


class TooComplex(ImgsvcError):
    """A structural limit (JPEG scans, PNG chunks or text) is exceeded: refused before any decoding."""

    status, slug, title = 422, "too-complex", "Image structure exceeds a limit"


class RateLimited(ImgsvcError):
    status, slug, title = 429, "rate-limited", "Too many requests"


class Overloaded(ImgsvcError):
    status, slug, title = 503, "overloaded", "Render capacity exhausted"


class RenderTimeout(ImgsvcError):
    status, slug, title = 503, "render-timeout", "Render exceeded its deadline"


class Unavailable(ImgsvcError):
    """The database or the blob store cannot be reached, or timed out: the client may retry later."""

    status, slug, title = 503, "unavailable", "A backing service is unavailable"

    def __init__(self, detail: str, *, retry_after: int = 5, param: str | None = None) -> None:
        super().__init__(detail, param=param, headers={"Retry-After": str(retry_after)})


class InsufficientStorage(ImgsvcError):
    """The blob store is full: nothing was written or recorded."""

    status, slug, title = 507, "insufficient-storage", "The blob store is full"


class IdempotencyKeyReused(ImgsvcError):
    status, slug, title = 422, "idempotency-key-reused", "Idempotency-Key reused with another request"


class OriginalUnavailable(ImgsvcError):
    status, slug, title = 500, "original-unavailable", "The stored original cannot be read"


class RoutingError(ImgsvcError):
    """Starlette's own 404/405 (no such route, method not allowed), in the same problem format."""

    def __init__(self, status: int, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail, headers=headers)
        self.status = status
        self.slug = {404: "not-found", 405: "method-not-allowed"}.get(status, "http-error")
        self.title = self.slug.replace("-", " ").capitalize()


class BlobNotFound(Exception):
    """Raised by storage backends; never shown to clients as such."""
