"""The console page (`/console`): upload, browse, build render URLs and delete, in a browser, over the API.

Static files shipped in `imgsvc/console/`, served with a strict CSP; mounted by `app.py` only when enabled.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from imgsvc.errors import NotFound

MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8"}  # fmt: skip
# Scripts and styles from files only; images from the same origin, or the data: and blob: URLs the page makes.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


def load_assets() -> dict[str, Asset]:
    """Every file of the console, read once: name -> body, type and a strong ETag of its bytes."""
    assets = {}
    for entry in (resources.files("imgsvc") / "console").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in MEDIA_TYPES:
            body = entry.read_bytes()
            assets[entry.name] = Asset(body, MEDIA_TYPES[suffix], f'"{hashlib.sha256(body).hexdigest()[:32]}"')
    return assets


def console_routes() -> list[Route]:
    """`/console` (the page) and `/console/<file>` (its script, styles)."""
    assets = load_assets()

    async def serve(request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        asset = assets.get(name)
        if asset is None:
            raise NotFound(f"no console file {name!r}")
        headers = {
            "ETag": asset.etag,
            "Cache-Control": "no-cache",
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "Referrer-Policy": "no-referrer",
            "Cross-Origin-Opener-Policy": "same-origin",
        }
        if request.headers.get("if-none-match") == asset.etag:
            return Response(status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.media_type, headers=headers)

    return [Route("/console", serve, methods=["GET"]), Route("/console/{name}", serve, methods=["GET"])]
