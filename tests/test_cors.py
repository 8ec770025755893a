"""CORS of the /images API: preflights of listed origins answered, the origin echoed on every answer (errors
too), others refused, render routes unchanged; and in Chromium, a page on another origin uploads through nginx."""

from __future__ import annotations

import http.server
import threading
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from imgsvc.app import create_app
from imgsvc.config import ConfigError, Settings
from tests.browser import Browser, running_browser
from tests.conftest import (
    AUDIENCE,
    CLIENT_ID,
    CLIENT_SECRET,
    FLICKR,
    MainApp,
    ServerProcess,
    app_client,
    free_port,
    with_settings,
)

ORIGIN = "http://app.example"
browser_fixture = pytest.fixture(running_browser, name="browser")
PREFLIGHT_HEADERS = "authorization, content-type, idempotency-key"


@pytest.fixture
async def cors_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(with_settings(settings, cors_origins=(ORIGIN,))) as c:
        yield c


def preflight(origin: str, method: str) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": PREFLIGHT_HEADERS}  # fmt: skip


def listed(values: str) -> set[str]:
    return {v.strip().lower() for v in values.split(",")}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("https://app.example.com", ("https://app.example.com",)),
        ("HTTPS://App.Example.com:443, http://localhost:3000", ("https://app.example.com", "http://localhost:3000")),
        ("http://127.0.0.1:80,http://127.0.0.1", ("http://127.0.0.1",)),
        ("http://[::1]:8080", ("http://[::1]:8080",)),
    ],
)
def test_origins_are_read_as_browsers_send_them(raw: str, expected: tuple[str, ...]) -> None:
    assert Settings.from_env({"IMGSVC_CORS_ORIGINS": raw}).cors_origins == expected


@pytest.mark.parametrize(
    "raw", ["*", "null", "app.example.com", "https://app.example.com/", "https://app.example.com/upload",
            "ftp://app.example.com", "https://app.example.com:99999", "https://user@app.example.com"],
)  # fmt: skip
def test_origins_that_are_no_exact_origin_are_refused(raw: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"IMGSVC_CORS_ORIGINS": raw})
    assert raised.value.problems[0].startswith("IMGSVC_CORS_ORIGINS:")


@pytest.mark.parametrize(
    ("path", "method"),
    [("/images", "POST"), ("/images", "GET"), ("/images/abc", "DELETE"), ("/images/abc/original", "GET")],
)
async def test_a_listed_origin_gets_its_preflight_answered(
    cors_client: httpx.AsyncClient, path: str, method: str
) -> None:
    response = await cors_client.options(path, headers=preflight(ORIGIN, method))
    assert response.status_code == 204 and response.content == b""
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert method.lower() in listed(response.headers["access-control-allow-methods"])
    assert listed(PREFLIGHT_HEADERS) <= listed(response.headers["access-control-allow-headers"])
    assert int(response.headers["access-control-max-age"]) > 0
    assert "origin" in listed(response.headers["vary"])
    assert "access-control-allow-credentials" not in response.headers


@pytest.mark.parametrize(
    "origin", ["http://evil.example", "http://app.example:8080", "https://app.example", "http://app.example.evil",
               "null"],
)  # fmt: skip
async def test_an_origin_not_listed_is_refused_with_a_problem(cors_client: httpx.AsyncClient, origin: str) -> None:
    response = await cors_client.options("/images", headers=preflight(origin, "POST"))
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    assert "IMGSVC_CORS_ORIGINS" in response.json()["detail"]
    assert "access-control-allow-origin" not in response.headers
    assert "origin" in listed(response.headers["vary"])
    after = await cors_client.get("/images", headers={"Origin": origin})
    assert after.status_code == 200 and "access-control-allow-origin" not in after.headers
    assert "origin" in listed(after.headers["vary"])


async def test_answers_carry_the_origin_errors_included(cors_client: httpx.AsyncClient) -> None:
    headers = {"Origin": ORIGIN}
    created = await cors_client.post("/images", content=FLICKR.read_bytes(),
                                     headers={**headers, "Content-Type": "image/jpeg"})  # fmt: skip
    refused = await cors_client.post("/images", content=b"<svg/>", headers={**headers, "Content-Type": "image/svg+xml"})
    missing = await cors_client.get("/images/nope", headers=headers)
    listing = await cors_client.get("/images?owner=me&limit=x", headers=headers)
    deleted = await cors_client.delete(f"/images/{created.json()['id']}", headers=headers)
    statuses = [r.status_code for r in (created, refused, missing, listing, deleted)]
    assert statuses == [201, 415, 404, 400, 204]
    for response in (created, refused, missing, listing, deleted):
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert "origin" in listed(response.headers["vary"])
        assert "access-control-allow-credentials" not in response.headers
    assert refused.headers["content-type"] == "application/problem+json"
    exposed = listed(created.headers["access-control-expose-headers"])
    assert {"location", "idempotent-replayed", "retry-after"} <= exposed


async def test_even_a_500_carries_the_origin(settings: Settings) -> None:
    """A bug's 500 is sent from outside every middleware (Starlette's error middleware): it gets the headers too."""
    app = create_app(with_settings(settings, cors_origins=(ORIGIN,)))

    async def broken(request: Request) -> Response:
        raise RuntimeError("a bug")

    app.router.routes.append(Route("/images/{id}/broken", broken))
    async with app.router.lifespan_context(app) as state:

        async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
            scope["state"] = dict(state)
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            response = await client.get("/images/x/broken", headers={"Origin": ORIGIN})
    assert response.status_code == 500 and response.json()["type"] == "/problems/internal-error"
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "origin" in listed(response.headers["vary"])


async def test_render_routes_answer_as_without_cors(cors_client: httpx.AsyncClient, settings: Settings) -> None:
    created = await cors_client.post("/images", content=FLICKR.read_bytes(), headers={"Content-Type": "image/jpeg"})
    paths = [f"/img/{created.json()['id']}?w=64", "/img/nope?w=64", f"/img/{created.json()['id']}?w=abc"]
    ignored = {"x-request-id", "x-cache", "date"}

    async def answers(client: httpx.AsyncClient, origin: dict[str, str]) -> list[tuple[int, dict[str, str]]]:
        found = []
        for path in paths:
            response = await client.get(path, headers=origin)
            found.append((response.status_code, {k: v for k, v in response.headers.items() if k not in ignored}))
        preflight_response = await client.options(paths[0], headers=preflight(ORIGIN, "GET"))
        found.append((preflight_response.status_code, {"allow": preflight_response.headers.get("allow", "")}))
        return found

    with_cors = await answers(cors_client, {"Origin": ORIGIN})
    async with app_client(settings) as plain:
        without = await answers(plain, {})
    assert [status for status, _ in with_cors] == [200, 404, 400, 405]
    assert with_cors == without
    assert with_cors[0][1]["access-control-allow-origin"] == "*"  # public images, as before


async def test_without_origins_nothing_changes(client: httpx.AsyncClient) -> None:
    response = await client.options("/images", headers=preflight(ORIGIN, "POST"))
    assert response.status_code == 405 and "access-control-allow-origin" not in response.headers
    listing = await client.get("/images", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in listing.headers and "vary" not in listing.headers


UPLOAD_JS = """
window.upload = async (api, token, text) => {
  const file = document.getElementById("file").files[0];
  const body = text === undefined ? file : new Blob([text], {type: "text/plain"});
  try {
    const response = await fetch(`${api}/images?category=avatar`, {
      method: "POST", body,
      headers: {Authorization: `Bearer ${token}`, "Content-Type": body.type, "Idempotency-Key": "page-" + Date.now()},
    });
    const json = await response.json();
    if (response.status !== 201) return {status: response.status, problem: json};
    const img = document.getElementById("result");
    const candidate = json.srcset.split(", ").find((c) => c.endsWith(" 256w")).split(" ")[0];
    await new Promise((resolve, reject) => { img.onload = resolve; img.onerror = reject; img.src = candidate; });
    return {status: 201, id: json.id, width: img.naturalWidth, location: response.headers.get("Location")};
  } catch (error) {
    return {error: String(error)};
  }
};
"""
PAGE = """<!doctype html><html><head><meta charset="utf-8"><link rel="icon" href="data:,">
<script src="upload.js"></script></head>
<body><input id="file" type="file"><img id="result" alt="uploaded"></body></html>"""


@pytest.fixture
def page_origin(tmp_path: Path) -> Iterator[int]:
    """A static web app (the page and its script) on its own loopback port: the port."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(PAGE)
    (site / "upload.js").write_text(UPLOAD_JS)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined, assignment]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_a_page_on_a_listed_origin_uploads_through_nginx_and_shows_the_render(
    server_env: dict[str, str], main: MainApp, nginx_bin: str, page_origin: int, browser: Browser, tmp_path: Path
) -> None:
    from tests.nginx_process import NginxProcess

    imgsvc = ServerProcess({}, tmp_path / "server.log")
    nginx = NginxProcess(nginx_bin, tmp_path / "nginx", f"127.0.0.1:{imgsvc.port}")
    imgsvc.env.update(server_env | {
        "IMGSVC_AUTH": "introspect", "IMGSVC_AUTH_INTROSPECT_URL": f"{main.url}/introspect",
        "IMGSVC_AUTH_CLIENT_ID": CLIENT_ID, "IMGSVC_AUTH_CLIENT_SECRET": CLIENT_SECRET,
        "IMGSVC_AUTH_AUDIENCE": AUDIENCE,
        "IMGSVC_CORS_ORIGINS": f"http://127.0.0.1:{page_origin}", "IMGSVC_PUBLIC_URL": nginx.url,
    })  # fmt: skip
    token = main.token("alice")
    imgsvc.start()
    try:
        nginx.start()
        # The page is on 127.0.0.1:<page port>, the API on 127.0.0.1:<nginx port>: another origin.
        browser.open(f"http://127.0.0.1:{page_origin}/index.html", width=800, height=600)
        browser.set_files("#file", [FLICKR])
        uploaded = browser.evaluate(f"upload({nginx.url!r}, {token!r})")
        assert uploaded["status"] == 201, uploaded
        assert uploaded["width"] == 256  # the 256w candidate of the answer's srcset, rendered and decoded
        assert uploaded["location"].endswith(f"/images/{uploaded['id']}")  # an exposed header
        problem = browser.evaluate(f"upload({nginx.url!r}, {token!r}, 'not an image')")
        assert problem["status"] == 415 and problem["problem"]["type"] == "/problems/unsupported-format"
        assert all("415" in error for error in browser.console_errors()), browser.console_errors()

        # Same page, same port, other host name: another origin, not listed. The preflight fails, so the
        # upload is never sent.
        browser.events.clear()
        browser.open(f"http://localhost:{page_origin}/index.html", width=800, height=600)
        browser.set_files("#file", [FLICKR])
        refused = browser.evaluate(f"upload({nginx.url!r}, {token!r})")
        assert refused == {"error": "TypeError: Failed to fetch"}
        assert any("CORS" in error for error in browser.console_errors()), browser.console_errors()
        mine = httpx.get(f"{nginx.url}/images?owner=me", headers={"Authorization": f"Bearer {token}"}).json()
        assert [image["id"] for image in mine["items"]] == [uploaded["id"]]
    finally:
        nginx.stop()
        imgsvc.stop()
