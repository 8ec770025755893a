"""A bare Starlette endpoint returning fixed bytes (the file named by FIXED_BODY): the ceiling for LRU hits."""

from __future__ import annotations

import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

BODY = Path(os.environ["FIXED_BODY"]).read_bytes()


async def fixed(request: Request) -> Response:
    return Response(BODY, media_type="image/webp")


app = Starlette(routes=[Route("/", fixed)])
