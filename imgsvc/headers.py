"""HTTP headers of rendered variants: strong ETags computed before rendering, caching, CORS, security.

Pure functions; `variant_headers` is the one place a render result becomes its response headers.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Literal, Protocol

from imgsvc.client_hints import ACCEPT_CH

CacheStatus = Literal["hit", "miss"]

ONE_YEAR = 31_536_000
PUBLIC_IMMUTABLE = f"public, max-age={ONE_YEAR}, immutable"
# A fast first encode (IMGSVC_ENCODE_SETTLE) is kept this long by browsers, nginx and CDNs, which then
# revalidate: 304 while it is still current, else 200 with the settled bytes.
PROVISIONAL_MAX_AGE = 60
ERROR_CACHEABLE = "public, max-age=60"
NO_STORE = "no-store"
CONTENT_SECURITY_POLICY = "script-src 'none'; frame-src 'none'; sandbox;"
NOSNIFF = (b"x-content-type-options", b"nosniff")  # added to every response by the request middleware
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


def variant_cache_control(*, public: bool, expires: int | None, now: float, settled: bool = True) -> str:
    """Immutable for public variants; a signed URL's expiry bounds any cache; private ones stay private; a fast
    first encode (not `settled`) is kept for PROVISIONAL_MAX_AGE at most."""
    longest = ONE_YEAR if settled else PROVISIONAL_MAX_AGE
    if expires is not None:
        max_age = max(0, min(expires - int(now), longest))
        return f"{'public' if public else 'private'}, max-age={max_age}"
    if not public:
        return "private, no-cache"
    return PUBLIC_IMMUTABLE if settled else f"public, max-age={PROVISIONAL_MAX_AGE}"


class Answer(Protocol):
    """What the headers of a rendered variant depend on (`render.RenderResult`)."""

    @property
    def image_id(self) -> str: ...
    @property
    def etag(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def public(self) -> bool: ...
    @property
    def vary_accept(self) -> bool: ...
    @property
    def vary_hints(self) -> tuple[str, ...]: ...
    @property
    def expires(self) -> int | None: ...
    @property
    def filename(self) -> str: ...
    @property
    def not_modified(self) -> bool: ...
    @property
    def settled(self) -> bool: ...


def cache_tag(image_id: str) -> str:
    """The tag of every variant of one image, by which a CDN purges them all at once."""
    return f"img-{image_id}"


def variant_headers(
    answer: Answer, *, cache_status: CacheStatus | None, length: int | None, now: float, tags: bool
) -> list[tuple[bytes, bytes]]:
    """The complete headers of a 200 (with `length`, or without it for a copy kept to answer again) or of its
    304, which repeats ETag, Vary, Cache-Control and the cache tags (RFC 9110 §15.4.5) but describes no body.
    `tags`: the image's cache tag in Fastly's `Surrogate-Key` and Cloudflare's `Cache-Tag`."""
    public = answer.public
    cache_control = variant_cache_control(public=public, expires=answer.expires, now=now, settled=answer.settled)
    headers = [
        (b"etag", answer.etag.encode()),
        (b"cache-control", cache_control.encode()),
        (b"timing-allow-origin", b"*"),
        (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    ]
    if public:
        headers += [(b"access-control-allow-origin", b"*"), (b"cross-origin-resource-policy", b"cross-origin")]
    else:
        headers.append((b"cross-origin-resource-policy", b"same-site"))
    vary = ("Accept",) * answer.vary_accept + answer.vary_hints
    if vary:
        headers.append((b"vary", ", ".join(vary).encode()))
    if answer.vary_hints:  # an answer to a client-hint URL asks for the hints it depends on
        headers.append((b"accept-ch", ACCEPT_CH.encode()))
    if tags:
        tag = cache_tag(answer.image_id).encode()
        headers += [(b"surrogate-key", tag), (b"cache-tag", tag)]
    if cache_status is not None:
        headers.append((b"x-cache", cache_status.encode()))
    if not answer.not_modified:
        headers += [
            (b"content-type", MEDIA_TYPES[answer.format].encode()),
            (b"content-disposition", f'inline; filename="{answer.filename}"'.encode()),
        ]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
    return headers


def error_cache_control(status: int, *, render_route: bool) -> str:
    """400/404 of render URLs are cheap to repeat at the edge for a minute; everything else is not stored."""
    return ERROR_CACHEABLE if render_route and status in (400, 404) else NO_STORE
