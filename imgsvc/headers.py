"""HTTP headers of rendered variants: strong ETags computed before rendering, caching, CORS, security.

Pure functions; the render flow computes the ETag, endpoints attach the rest.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Literal

CacheStatus = Literal["hit", "miss"]

ONE_YEAR = 31_536_000
PUBLIC_IMMUTABLE = f"public, max-age={ONE_YEAR}, immutable"
ERROR_CACHEABLE = "public, max-age=60"
NO_STORE = "no-store"
SECURITY = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "script-src 'none'; frame-src 'none'; sandbox;",
}
MEDIA_TYPES = {
    "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif",
    "avif": "image/avif", "heif": "image/heif", "tiff": "image/tiff",
}  # fmt: skip
_ETAG_ITEM = re.compile(r'\s*(W/)?("[^"]*"|\*)\s*(,|$)')


def render_etag(sha256: str, render_key: str, output_format: str, pipeline_version: str) -> str:
    """Strong ETag from everything that determines the bytes, so it is known before rendering."""
    digest = hashlib.sha256(f"{sha256}|{render_key}|{output_format}|{pipeline_version}".encode()).digest()
    return '"' + base64.b32encode(digest).decode().rstrip("=").lower()[:32] + '"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison of If-None-Match against our ETag."""
    if not if_none_match:
        return False
    pos = 0
    while pos < len(if_none_match):
        match = _ETAG_ITEM.match(if_none_match, pos)
        if match is None:
            return False
        if match.group(2) in ("*", etag):
            return True
        pos = match.end()
    return False


def variant_cache_control(*, public: bool, expires: int | None, now: float) -> str:
    """Immutable for public variants; a signed URL's expiry bounds any cache; private ones stay private."""
    if expires is not None:
        max_age = max(0, min(expires - int(now), ONE_YEAR))
        return f"{'public' if public else 'private'}, max-age={max_age}"
    return PUBLIC_IMMUTABLE if public else "private, no-cache"


def render_headers(
    *,
    etag: str,
    media_type: str,
    public: bool,
    cache_control: str,
    vary_accept: bool,
    filename: str,
    cache_status: CacheStatus | None,
) -> dict[str, str]:
    """Headers shared by a 200 and its 304 (RFC 9110 §15.4.5: the 304 repeats ETag, Vary, Cache-Control)."""
    headers = {
        "ETag": etag,
        "Cache-Control": cache_control,
        "Content-Type": media_type,
        "Content-Disposition": f'inline; filename="{filename}"',
        "Timing-Allow-Origin": "*",
        **SECURITY,
    }
    if public:
        headers["Access-Control-Allow-Origin"] = "*"
        headers["Cross-Origin-Resource-Policy"] = "cross-origin"
    else:
        headers["Cross-Origin-Resource-Policy"] = "same-site"
    if vary_accept:
        headers["Vary"] = "Accept"
    if cache_status is not None:
        headers["X-Cache"] = cache_status
    return headers


def error_cache_control(status: int, *, render_route: bool) -> str:
    """400/404 of render URLs are cheap to repeat at the edge for a minute; everything else is not stored."""
    return ERROR_CACHEABLE if render_route and status in (400, 404) else NO_STORE
