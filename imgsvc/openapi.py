"""`/openapi.json`: the HTTP API described from the same constants the code uses (enums, ranges, problems)."""

from __future__ import annotations

from typing import Any, get_args

from imgsvc import errors
from imgsvc.config import Settings
from imgsvc.spec import Fit, Gravity, OutputFormat, RequestedFormat

PROBLEM = {"$ref": "#/components/schemas/Problem"}
_COLOUR = {"type": "string", "pattern": "^#[0-9a-f]{6}$"}
PLACEHOLDER = {
    "type": ["object", "null"],
    "description": "derived once after the upload, off the request path: null until then",
    "required": ["thumbhash", "dominant_color", "average_color", "aspect_ratio"],
    "properties": {
        "thumbhash": {"type": "string", "format": "byte", "description": "ThumbHash, base64"},
        "dominant_color": _COLOUR,
        "average_color": _COLOUR,
        "aspect_ratio": {"type": "number", "description": "width / height (after EXIF orientation)"},
    },
}


def _problems() -> dict[str, list[str]]:
    """status -> problem types, for every ImgsvcError subclass."""
    found: dict[str, list[str]] = {}
    pending = list(errors.ImgsvcError.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls is not errors.RoutingError:
            found.setdefault(str(cls.status), []).append(errors.PROBLEM_BASE + cls.slug)
    return {status: sorted(types) for status, types in sorted(found.items())}


def _responses(*statuses: int, ok: dict[str, Any] | None = None) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    if ok:
        responses.update(ok)
    for status in statuses:
        responses[str(status)] = {
            "description": "problem", "content": {"application/problem+json": {"schema": PROBLEM}}
        }  # fmt: skip
    return responses


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def document(settings: Settings) -> dict[str, Any]:
    dim = {"type": "integer", "minimum": 1, "maximum": settings.max_output_dim}
    dpr = {"type": "number", "minimum": 1, "maximum": 4}
    id_schema = {"type": "string", "pattern": "^[A-Za-z0-9_-]{22}$"}
    image_id = {"name": "id", "in": "path", "required": True, "schema": id_schema}
    render_params = [
        _query("w", {"anyOf": [dim, {"const": "auto"}]}, "width in CSS pixels (times dpr); auto: Sec-CH-Width"),
        _query("h", dim, "height in CSS pixels (times dpr)"),
        _query("dpr", {"anyOf": [dpr, {"const": "auto"}]}, "device pixel ratio; auto: Sec-CH-DPR"),
        _query("fit", {"type": "string", "enum": list(get_args(Fit)), "default": "inside"}, "sharp's fit"),
        _query("g", {"type": "string", "enum": list(get_args(Gravity)), "default": "center"}, "gravity"),
        _query("fmt", {"type": "string", "enum": list(get_args(RequestedFormat))}, "output format"),
        _query("q", {"type": "integer", "minimum": 1, "maximum": 100}, "quality"),
        _query("bg", {"type": "string", "pattern": "^([0-9a-fA-F]{3}|[0-9a-fA-F]{6})$"}, "background colour"),
        _query("blur", {"type": "number", "minimum": 0.3, "maximum": 100}, "gaussian blur sigma"),
        _query("p", {"type": "string"}, "a preset name"),
        _query("v", {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,32}$"}, "cache-busting token"),
        _query("s", {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}, "URL signature"),
        _query("kid", {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,32}$"}, "signing key id"),
        _query("exp", {"type": "integer", "minimum": 1}, "signature expiry, unix seconds"),
    ]
    image_schema = {"$ref": "#/components/schemas/Image"}
    image_json = {"description": "the image", "content": {"application/json": {"schema": image_schema}}}
    variant = {"description": "the variant", "content": {f"image/{f}": {} for f in get_args(OutputFormat)}}
    visibility = {"type": "string", "enum": ["public", "private"]}
    bearer = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "imgsvc", "version": "1",
                 "description": "Originals stored once, any variant rendered on demand."},
        "paths": {
            "/img/{id}": {
                "get": {"summary": "a rendered variant", "parameters": [image_id, *render_params],
                        "responses": _responses(400, 401, 403, 404, 429, 500, 503, ok={
                            "200": variant, "304": {"description": "not modified (If-None-Match)"}})},
                "head": {"summary": "the GET headers, no body", "parameters": [image_id, *render_params],
                         "responses": _responses(400, 401, 403, 404, 429, 500, 503, ok={
                             "200": {"description": "headers"}, "304": {"description": "not modified"}})},
            },
            "/images": {
                "post": {"summary": "upload", "security": bearer,
                         "description": "Every upload creates a new image (identical bytes share one stored "
                                        "blob). A retry that repeats an earlier request's Idempotency-Key (same "
                                        "owner, bytes and options, within 24 h) gets that request's answer, with "
                                        "Idempotent-Replayed: true; the same key with another body is a 422.",
                         "parameters": [_query("category", {"type": "string", "maxLength": 64}, "free text"),
                                        _query("visibility", visibility, ""),
                                        {"name": "Idempotency-Key", "in": "header", "required": False,
                                         "description": "makes retries safe: 1-255 of A-Z a-z 0-9 . _ : ~ + / = -, "
                                                        "optionally quoted",
                                         "schema": {"type": "string", "maxLength": 257}}],
                         "requestBody": {"required": True, "content": {
                             "image/*": {"schema": {"type": "string", "format": "binary"}},
                             "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                                 "file": {"type": "string", "format": "binary"}, "category": {"type": "string"},
                                 "visibility": visibility}}}}},
                         "responses": _responses(400, 401, 403, 408, 409, 413, 415, 422, 429, 503, 507,
                                                 ok={"201": image_json})},
                "get": {"summary": "the caller's images, newest first", "security": bearer,
                        "parameters": [_query("owner", {"type": "string"}, "me (default) or, for admins, a subject"),
                                       _query("category", {"type": "string"}, ""),
                                       _query("limit", {"type": "integer", "minimum": 1, "maximum": 100}, "default 20"),
                                       _query("cursor", {"type": "string"}, "next_cursor of the previous page")],
                        "responses": _responses(400, 401, 403, 503, ok={"200": {"description": "a page of images"}})},
            },
            "/images/{id}": {
                "get": {"summary": "image metadata", "security": bearer, "parameters": [image_id],
                        "responses": _responses(401, 403, 404, 503, ok={"200": image_json})},
                "delete": {"summary": "delete (owner or admin)", "security": bearer, "parameters": [image_id],
                           "responses": _responses(401, 403, 404, 503, ok={"204": {"description": "deleted"}})},
            },
            "/images/{id}/original": {
                "get": {"summary": "the original bytes, as an attachment", "security": bearer, "parameters": [image_id],
                        "responses": _responses(401, 403, 404, 500, 503,
                                                ok={"200": {"description": "the original"}})},
            },
            "/images/{id}/views": {
                "get": {"summary": "view counts (owner or admin)", "security": bearer,
                        "description": "Views are GET /img/ answers of 200 or 304, by imgsvc or by a cache in front "
                                       "(fed by `imgsvc views ingest`), flushed every few seconds. `total` counts "
                                       "every view ever; `days` has one entry per UTC day, oldest first, today last.",
                        "parameters": [image_id, _query("days", {"type": "integer", "minimum": 1, "maximum": 365},
                                                        "the window, in UTC days (default 30)")],
                        "responses": _responses(400, 401, 403, 404, 503, ok={"200": {
                            "description": "the counts", "content": {"application/json": {"schema": {
                                "$ref": "#/components/schemas/Views"}}}}})},
            },
            "/livez": {"get": {"summary": "liveness", "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "readiness", "responses": {"200": {"description": "ready"},
                                                                      "503": {"description": "not ready"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}},
            "/openapi.json": {"get": {"summary": "this document", "responses": {"200": {"description": "OpenAPI"}}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": {
                "Problem": {"type": "object", "required": ["type", "title", "status", "detail"], "properties": {
                    "type": {"type": "string", "enum": sorted({t for ts in _problems().values() for t in ts})},
                    "title": {"type": "string"}, "status": {"type": "integer"}, "detail": {"type": "string"},
                    "param": {"type": "string"}}},
                "Views": {"type": "object", "required": ["total", "last_viewed_at", "days"], "properties": {
                    "total": {"type": "integer", "minimum": 0},
                    "last_viewed_at": {"type": ["string", "null"], "format": "date-time"},
                    "days": {"type": "array", "items": {"type": "object", "required": ["date", "views"], "properties": {
                        "date": {"type": "string", "format": "date"}, "views": {"type": "integer", "minimum": 0}}}}}},
                "Image": {"type": "object", "properties": {
                    name: {"type": kind} for name, kind in (
                        ("id", "string"), ("format", "string"), ("width", "integer"), ("height", "integer"),
                        ("bytes", "integer"), ("frames", "integer"), ("has_alpha", "boolean"), ("sha256", "string"),
                        ("category", "string"), ("visibility", "string"), ("created_at", "string"),
                        ("urls", "object"), ("srcset", "string"))} | {"placeholder": PLACEHOLDER}},
            },
            "x-problem-types-by-status": _problems(),
        },
    }  # fmt: skip
