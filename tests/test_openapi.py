"""`/openapi.json` matches the real routes, the spec's enums and ranges, and every problem type; a schema-driven
fuzz run against a real server gets only documented, non-5xx answers."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import get_args

import asyncpg
import httpx
import hypothesis
import pytest
import pyvips
import requests
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Route

from imgsvc import errors
from imgsvc.spec import Fit, Gravity, RequestedFormat
from tests.conftest import ServerProcess


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
    width, auto = params["w"]["anyOf"]
    assert (width["minimum"], width["maximum"]) == (1, 8192) and auto == {"const": "auto"}  # client hints
    assert params["dpr"]["anyOf"][1] == {"const": "auto"}
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


# A schema-driven fuzz run of the document against a real server: every answer must be a non-5xx status that the
# document lists for its operation. Deterministic (derandomized Hypothesis, no example database) and bounded.
FUZZ_EXAMPLES = 100  # per operation, id source and mode
WITH_PARAMETERS = [
    ("GET", "/img/{id}"),
    ("HEAD", "/img/{id}"),
    ("POST", "/images"),
    ("GET", "/images"),
    ("GET", "/images/{id}"),
    ("DELETE", "/images/{id}"),
    ("GET", "/images/{id}/original"),
    ("GET", "/images/{id}/views"),
]
WITHOUT_PARAMETERS = [("GET", "/livez"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/openapi.json")]
WITH_STORED_IMAGE = [
    ("GET", "/img/{id}"),
    ("HEAD", "/img/{id}"),
    ("GET", "/images/{id}"),
    ("GET", "/images/{id}/original"),
    ("GET", "/images/{id}/views"),
]
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE  # valid inputs; inputs breaking the schema
FUZZ_RUNS = [
    *((m, p, "generated-id", mode) for m, p in WITH_PARAMETERS for mode in (POSITIVE, NEGATIVE)),
    *((m, p, "stored-id", POSITIVE) for m, p in WITH_STORED_IMAGE),
    *((m, p, "stored-id", NEGATIVE) for m, p in WITH_STORED_IMAGE if p == "/img/{id}"),  # the others: only the id
    *((m, p, "no-parameters", POSITIVE) for m, p in WITHOUT_PARAMETERS),  # nothing to break: one request each
]


@dataclass(frozen=True, slots=True)
class FuzzTarget:
    server: ServerProcess
    schema: schemathesis.BaseSchema
    image_id: str


@pytest.fixture(scope="module")
def fuzz_target(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    """One server (auth=none: every caller may upload) with one stored image, for every fuzzed operation."""
    workdir = tmp_path_factory.mktemp("fuzz")
    name = f"fuzz_{uuid.uuid4().hex[:12]}"
    asyncio.run(_create_database(postgres, name))
    env = {
        "IMGSVC_DATABASE_URL": postgres.replace("/imgsvc?", f"/{name}?"),
        "IMGSVC_STORAGE_URL": f"file://{workdir / 'blobs'}",
        "IMGSVC_DATA_DIR": str(workdir),
        "IMGSVC_WORKERS": "2",
        "IMGSVC_MAX_OUTPUT_DIM": "1024",  # the largest default preset; the document follows it
        "IMGSVC_RENDER_TIMEOUT": "60",  # a busy machine must not turn a slow blur into a 503
    }
    server = ServerProcess(env, workdir / "server.log").start()
    try:
        jpeg = pyvips.Image.xyz(96, 64).extract_band(0).cast("uchar").jpegsave_buffer()
        created = httpx.post(f"{server.url}/images", content=jpeg, headers={"Content-Type": "image/jpeg"}, timeout=30)
        assert created.status_code == 201, created.text
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        yield FuzzTarget(server, schema, created.json()["id"])
    finally:
        server.stop()


async def _create_database(dsn: str, name: str) -> None:
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()


async def test_every_described_operation_is_fuzzed(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    described = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert described == {*WITH_PARAMETERS, *WITHOUT_PARAMETERS}


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("method", "path", "ids", "mode"), FUZZ_RUNS, ids=lambda v: v.value if isinstance(v, GenerationMode) else v
)
def test_fuzzed_requests_get_documented_non_5xx_answers(
    fuzz_target: FuzzTarget, method: str, path: str, ids: str, mode: GenerationMode
) -> None:
    operation = fuzz_target.schema[path][method]
    fixed = {"id": fuzz_target.image_id} if ids == "stored-id" else None
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=fixed)
    answered: Counter[int] = Counter()

    with requests.Session() as session:

        @hypothesis.settings(
            max_examples=FUZZ_EXAMPLES,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        @hypothesis.given(case=strategy)
        def fuzz(case: schemathesis.Case) -> None:
            response = case.call(base_url=fuzz_target.server.url, session=session, timeout=30)
            answered[response.status_code] += 1
            case.validate_response(
                response,
                checks=[
                    not_a_server_error,
                    status_code_conformance,
                    content_type_conformance,
                    response_schema_conformance,
                ],
            )

        fuzz()
    print(f"{method} {path} {ids} {mode.value}: {sum(answered.values())} requests, {dict(sorted(answered.items()))}")
    assert answered, "no request was sent"
    if ids == "stored-id" and mode is POSITIVE:
        assert answered[200] > 0, "the fuzz run never reached a successful answer for the stored image"
