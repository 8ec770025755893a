"""Thin HTTP handlers: parse the request, call the flow, shape the response."""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, quote

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from imgsvc import metrics, openapi
from imgsvc.auth import Principal, Scope, authenticate, authorize
from imgsvc.catalog import ImageRecord
from imgsvc.client_hints import NO_HINTS, ClientHints, client_hints
from imgsvc.config import DEFAULT_WIDTHS
from imgsvc.errors import BadRequest, ImgsvcError, InvalidParameter, NotFound
from imgsvc.headers import CONTENT_SECURITY_POLICY, MEDIA_TYPES, NO_STORE, variant_headers
from imgsvc.hits import RawHeaders, request_key
from imgsvc.idempotency import HEADER as IDEMPOTENCY_HEADER, parse_key
from imgsvc.ratelimit import client_key
from imgsvc.services import Services
from imgsvc.spec import parse_query
from imgsvc.upload import RetryKey, read_body, upload_options
from imgsvc.views import read_views

API_CACHE_CONTROL = "private, no-cache"
MAX_LIST_LIMIT = 100
MAX_VIEW_DAYS = 365


def services(request: Request) -> Services:
    return request.state.services  # type: ignore[no-any-return]  # lifespan state, see app.create_app


class _Prebuilt(Response):
    """A response whose complete header list is already built (see `headers.variant_headers`)."""

    def __init__(self, status_code: int, headers: RawHeaders, body: bytes = b"") -> None:
        self.status_code, self.raw_headers, self.body, self.background = status_code, headers, body, None


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(payload, status, headers={"Cache-Control": API_CACHE_CONTROL, **(headers or {})})


async def _principal(request: Request) -> Principal:
    principal = await authenticate(request, services(request).verifier, required=True)
    assert principal is not None
    return principal


def image_json(request: Request, image: ImageRecord) -> dict[str, Any]:
    svc = services(request)
    base = f"{svc.settings.effective_public_url}/img/{image.id}"
    widths = [w for w in (svc.settings.unsigned_widths or DEFAULT_WIDTHS) if w <= image.width]
    return {
        "id": image.id,
        "format": image.format,
        "width": image.width,
        "height": image.height,
        "bytes": image.bytes,
        "frames": image.frames,
        "has_alpha": image.has_alpha,
        "sha256": image.sha256,
        "category": image.category,
        "visibility": image.visibility,
        "original_filename": image.original_filename,
        "created_at": image.created_at.isoformat(),
        "urls": {
            "self": f"{svc.settings.effective_public_url}/images/{image.id}",
            "original": f"{svc.settings.effective_public_url}/images/{image.id}/original",
            "render": base,
            **{name: f"{base}?p={name}" for name in svc.spec_limits.presets},
        },
        # Unsigned sizes only; an image narrower than all of them is offered at its own size (no w).
        "srcset": ", ".join(f"{base}?w={w} {w}w" for w in widths) or f"{base} {image.width}w",
        "placeholder": placeholder_json(image),
    }


def placeholder_json(image: ImageRecord) -> dict[str, Any] | None:
    """Derived once per blob after the upload (imgsvc.derive): None until then."""
    if image.thumbhash is None:
        return None
    return {
        "thumbhash": image.thumbhash,
        "dominant_color": image.dominant_color,
        "average_color": image.average_color,
        "aspect_ratio": round(image.width / image.height, 4),
    }


async def upload_image(request: Request) -> Response:
    try:
        return await _upload(request)
    except ImgsvcError as exc:
        metrics.uploads_total.labels(exc.slug).inc()
        raise


async def _upload(request: Request) -> Response:
    svc = services(request)
    principal = await _principal(request)
    authorize(principal, "images:write")
    key = parse_key(request.headers.get(IDEMPOTENCY_HEADER))  # a malformed key costs no body
    retry_key = RetryKey("upload", key) if key is not None else None
    if "images:admin" not in principal.scopes:
        svc.upload_limiter.hit(principal.subject)
    try:
        body = await read_body(
            request.headers.get("content-type", ""),
            request.headers.get("content-length"),
            request.stream(),
            svc.settings.max_upload_bytes,
            svc.settings.upload_idle_timeout,
            min_rate=svc.settings.body_min_rate,
            rate_window=svc.settings.body_rate_window,
        )
    except ClientDisconnect:
        raise BadRequest("the upload was aborted before the body was complete") from None
    options = upload_options({**dict(request.query_params), **body.fields})
    result = await svc.ingest.ingest(body, principal.subject, options, retry_key)
    metrics.uploads_total.labels("replayed" if result.replayed else "created").inc()
    payload = image_json(request, result.image)
    headers = {"Location": payload["urls"]["self"]}
    if result.replayed:
        headers["Idempotent-Replayed"] = "true"
    return _json(payload, 201, headers)


async def get_image(request: Request) -> Response:
    principal = await _principal(request)
    image = await _owned_image(request, principal, "images:read")
    return _json(image_json(request, image))


async def list_images(request: Request) -> Response:
    svc = services(request)
    principal = await _principal(request)
    authorize(principal, "images:read")
    params = _single_params(request, {"owner", "category", "limit", "cursor"})
    owner = params.get("owner", "me")
    if owner != "me" and owner != principal.subject:
        authorize(principal, "images:admin")
    limit_text = params.get("limit", "20")
    if not re.fullmatch(r"[1-9][0-9]{0,2}", limit_text) or int(limit_text) > MAX_LIST_LIMIT:
        raise InvalidParameter(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}", param="limit")
    for name in ("owner", "category"):
        if name in params and not is_printable_text(params[name]):
            raise InvalidParameter(f"{name} must be printable text of at most 64 characters", param=name)
    page = await svc.catalog.list(
        principal.subject if owner == "me" else owner,
        category=params.get("category"),
        limit=int(limit_text),
        cursor=params.get("cursor"),
    )
    return _json({"items": [image_json(request, i) for i in page.items], "next_cursor": page.next_cursor})


async def get_original(request: Request) -> Response:
    svc = services(request)
    principal = await _principal(request)
    image = await _owned_image(request, principal, "images:read")
    data = await svc.renderer.fetch_original(image)
    extension = {"jpeg": "jpg", "heif": "heic"}.get(image.format, image.format)
    filename = image.original_filename or f"{image.id}.{extension}"
    ascii_name = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename)
    return Response(
        data,
        media_type=MEDIA_TYPES.get(image.format, "application/octet-stream"),
        headers={
            "Content-Disposition": f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename)}",
            "Cache-Control": "private, no-store",
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        },
    )


async def get_views(request: Request) -> Response:
    """Views counted so far: all-time total, the last one, and one entry per UTC day of the window (today last)."""
    principal = await _principal(request)
    days = _single_params(request, {"days"}).get("days", "30")
    if not re.fullmatch(r"[1-9][0-9]{0,2}", days) or int(days) > MAX_VIEW_DAYS:
        raise InvalidParameter(f"days must be an integer from 1 to {MAX_VIEW_DAYS}", param="days")
    image = await _owned_image(request, principal, "images:read")
    report = await read_views(services(request).catalog.pool, image.id, int(days), datetime.now(UTC).date())
    return _json(report.json())


async def delete_image(request: Request) -> Response:
    svc = services(request)
    principal = await _principal(request)
    image = await _owned_image(request, principal, "images:write")
    deleted = await svc.catalog.soft_delete(image.id)
    if deleted is None:
        raise NotFound(f"no image {image.id!r}")
    svc.renderer.forget(deleted.notice)
    return Response(status_code=204, headers={"Cache-Control": NO_STORE})


async def render_image(request: Request) -> Response:
    svc = services(request)
    query = parse_query(parse_qsl(request.url.query, keep_blank_values=True), svc.spec_limits)
    principal = await authenticate(request, svc.verifier, required=False)
    client = client_key(request.client.host if request.client else "")  # from a trusted proxy, the forwarded one
    exempt = principal is not None and "images:admin" in principal.scopes
    result = await svc.renderer.render(
        request.path_params["id"],
        query,
        accept=request.headers.get("accept"),
        principal=principal,
        if_none_match=request.headers.get("if-none-match"),
        charge=None if exempt else partial(svc.render_limiter.hit, client),
        hints=hint_headers(request) if query.spec.auto else NO_HINTS,
    )
    now, tags = time.time(), svc.settings.cache_tags
    if result.not_modified:
        return _Prebuilt(304, variant_headers(result, cache_status=None, length=None, now=now, tags=tags))
    if result.rememberable and request.method == "GET":  # RequestContext answers it next time, as a hit
        key = request_key(request.scope["path"], request.scope["query_string"], request.headers.get("accept"))
        not_modified = replace(result, outcome="not-modified", data=b"")
        svc.hits.store(key, result.image.id, result.variant_key, result.stamp, result.etag,
                       variant_headers(result, cache_status="hit", length=None, now=now, tags=tags),
                       variant_headers(not_modified, cache_status=None, length=None, now=now, tags=tags))  # fmt: skip
    cache_status = "hit" if result.outcome == "hit" else "miss"
    headers = variant_headers(result, cache_status=cache_status, length=len(result.data), now=now, tags=tags)
    return _Prebuilt(200, headers, b"" if request.method == "HEAD" else result.data)


def hint_headers(request: Request) -> ClientHints:
    get = request.headers.get
    return client_hints(get("sec-ch-width"), get("sec-ch-dpr"), get("save-data"))


async def openapi_json(request: Request) -> Response:
    return JSONResponse(openapi.document(services(request).settings), headers={"Cache-Control": "public, max-age=300"})


async def metrics_text(request: Request) -> Response:
    body, content_type = metrics.exposition()
    return Response(body, headers={"Content-Type": content_type, "Cache-Control": NO_STORE})


async def livez(request: Request) -> Response:
    return JSONResponse({"status": "ok"}, headers={"Cache-Control": NO_STORE})


async def readyz(request: Request) -> Response:
    svc = services(request)
    checks: dict[str, str] = {}
    for name, check in (("database", svc.catalog.check), ("storage", svc.store.check)):
        try:
            await check()
            checks[name] = "ok"
        except Exception as exc:  # name what failed underneath, e.g. "failing: ConnectionRefusedError"
            checks[name] = f"failing: {type(exc.__cause__ or exc).__name__}"
    if svc.draining.is_set():
        checks["draining"] = "yes"
    ready = all(v == "ok" for v in checks.values())
    return Response(
        json.dumps({"status": "ready" if ready else "not ready", "checks": checks}),
        status_code=200 if ready else 503,
        media_type="application/json",
        headers={"Cache-Control": NO_STORE},
    )


async def _owned_image(request: Request, principal: Principal, scope: Scope) -> ImageRecord:
    """The live image of the path, if the principal holds `scope` and owns it (or is admin)."""
    authorize(principal, scope)
    image = await services(request).catalog.get(request.path_params["id"])
    if image is None:
        raise NotFound(f"no image {request.path_params['id']!r}")
    authorize(principal, scope, image)
    return image


def is_printable_text(text: str) -> bool:
    return len(text) <= 64 and text.isprintable()


def _single_params(request: Request, allowed: set[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if key not in allowed:
            raise InvalidParameter(f"unknown parameter {key!r}", param=key)
        if key in params:
            raise InvalidParameter(f"parameter {key!r} given twice", param=key)
        params[key] = value
    return params
