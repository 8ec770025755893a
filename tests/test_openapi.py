"""`/openapi.json` matches the real routes, the spec's enums and ranges, and every problem type."""

from __future__ import annotations

from typing import get_args

import httpx
from starlette.routing import Route

from imgsvc import errors
from imgsvc.spec import Fit, Gravity, RequestedFormat


async def test_every_route_and_method_is_described_and_nothing_else(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    app = client.app  # type: ignore[attr-defined]
    real = {(r.path, m.lower()) for r in app.routes if isinstance(r, Route) for m in (r.methods or ())}
    real = {(path, m) for path, m in real if m != "head" or path == "/img/{id}"}  # Starlette adds HEAD to GETs
    described = {(path, method) for path, item in document["paths"].items() for method in item}
    assert described == real


async def test_render_parameters_carry_the_spec_enums_and_ranges(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    params = {p["name"]: p["schema"] for p in document["paths"]["/img/{id}"]["get"]["parameters"]}
    assert params["fit"]["enum"] == list(get_args(Fit))
    assert params["g"]["enum"] == list(get_args(Gravity))
    assert params["fmt"]["enum"] == list(get_args(RequestedFormat))
    assert (params["w"]["minimum"], params["w"]["maximum"]) == (1, 8192)
    assert (params["q"]["minimum"], params["q"]["maximum"]) == (1, 100)
    # every query key the parser knows is documented
    assert set(params) == {"id", "w", "h", "dpr", "fit", "g", "fmt", "q", "bg", "blur", "p", "v", "s", "kid", "exp"}


async def test_problem_types_are_the_ones_the_code_raises(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    types = set(document["components"]["schemas"]["Problem"]["properties"]["type"]["enum"])
    assert "/problems/invalid-parameter" in types and "/problems/payload-too-large" in types
    response = await client.get("/img/AAAAAAAAAAAAAAAAAAAAAA?w=0")
    assert response.json()["type"] in types
    by_status = document["components"]["x-problem-types-by-status"]
    assert errors.Overloaded.status == 503 and "/problems/overloaded" in by_status["503"]
