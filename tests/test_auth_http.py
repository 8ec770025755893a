"""Delegated auth end to end: imgsvc verifying the reference main app's tokens (a real process),
the 401/403 matrix, private images, the introspection cache, failing closed, the upload rate limit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import jwt
import pytest

from imgsvc.client import RenderUrls
from imgsvc.config import Settings
from tests.conftest import AUDIENCE, CLIENT_ID, CLIENT_SECRET, FLICKR, MainApp, ServerProcess, app_client, with_settings

SIGNING = ("k1", "k1-secret-0123456789abcdef0123456789")
WRITE = "images:read images:write"


def auth_settings(settings: Settings, main: MainApp, mode: str, **changes: object) -> Settings:
    common = {"signing_keys": (SIGNING,), "auth_audience": AUDIENCE, **changes}
    if mode == "introspect":
        return with_settings(settings, auth="introspect", auth_introspect_url=f"{main.url}/introspect",
                             auth_client_id=CLIENT_ID, auth_client_secret=CLIENT_SECRET, **common)  # fmt: skip
    return with_settings(settings, auth="jwks", auth_jwks_url=f"{main.url}/.well-known/jwks.json",
                         auth_issuer=main.issuer, **common)  # fmt: skip


@pytest.fixture(params=["introspect", "jwks"])
async def client(request: pytest.FixtureRequest, settings: Settings, main: MainApp) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(auth_settings(settings, main, request.param)) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def upload(client: httpx.AsyncClient, token: str, **params: str) -> httpx.Response:
    headers = {"Content-Type": "image/jpeg", **bearer(token)}
    return await client.post("/images", content=FLICKR.read_bytes(), headers=headers, params=params)


def hostile_tokens(main: MainApp) -> dict[str, str]:
    claims = {"sub": "alice", "scope": WRITE, "iss": main.issuer, "aud": AUDIENCE, "exp": int(time.time()) + 300}
    return {
        "garbage": "not-a-token",
        "alg-none": jwt.encode(claims, None, algorithm="none"),
        "hs256-random-secret": jwt.encode(claims, "x" * 32, algorithm="HS256"),
        "expired": main.token("alice", WRITE, ttl=-120),
        "wrong-audience": main.token("alice", WRITE, aud="someone-else"),
        "tampered": main.token("alice", "images:read")[:-6] + "AAAAAA",
    }


@pytest.mark.parametrize(
    "kind", ["missing", "garbage", "alg-none", "hs256-random-secret", "expired", "wrong-audience", "tampered"]
)
async def test_invalid_or_missing_tokens_are_401_with_www_authenticate(
    client: httpx.AsyncClient, main: MainApp, kind: str
) -> None:
    headers = {} if kind == "missing" else bearer(hostile_tokens(main)[kind])
    for method, path in (("POST", "/images"), ("GET", "/images"), ("GET", "/images/AAAAAAAAAAAAAAAAAAAAAA")):
        response = await client.request(method, path, headers=headers)
        assert response.status_code == 401, (kind, path, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.headers["cache-control"] == "no-store"
        assert response.json()["type"] == "/problems/unauthorized"
        assert "eyJ" not in response.text  # the token is never echoed


async def test_a_token_in_the_query_string_is_ignored(client: httpx.AsyncClient, main: MainApp) -> None:
    token = main.token("alice", WRITE)
    response = await client.post(f"/images?access_token={token}", content=FLICKR.read_bytes(),
                                 headers={"Content-Type": "image/jpeg"})  # fmt: skip
    assert response.status_code == 401


async def test_scopes_and_ownership(client: httpx.AsyncClient, main: MainApp) -> None:
    alice, bob = main.token("alice", WRITE), main.token("bob", WRITE)
    reader, admin = main.token("alice", "images:read"), main.token("root", "images:admin")
    created = await upload(client, alice)
    assert created.status_code == 201
    image_id = created.json()["id"]
    no_write = await upload(client, reader)
    assert no_write.status_code == 403 and "insufficient_scope" in no_write.headers["www-authenticate"]
    assert (await client.delete(f"/images/{image_id}", headers=bearer(reader))).status_code == 403
    for method, path in (("GET", f"/images/{image_id}"), ("GET", f"/images/{image_id}/original"),
                         ("DELETE", f"/images/{image_id}")):  # fmt: skip
        assert (await client.request(method, path, headers=bearer(bob))).status_code == 403, path
    assert (await client.get("/images", params={"owner": "alice"}, headers=bearer(bob))).status_code == 403
    assert (await client.get("/images", headers=bearer(bob))).json()["items"] == []
    listed = await client.get("/images", params={"owner": "alice"}, headers=bearer(admin))
    assert [item["id"] for item in listed.json()["items"]] == [image_id]
    assert (await client.get(f"/images/{image_id}", headers=bearer(reader))).status_code == 200
    assert (await client.delete(f"/images/{image_id}", headers=bearer(admin))).status_code == 204


async def test_private_images_render_for_the_owner_or_an_expiring_signature(
    client: httpx.AsyncClient, main: MainApp
) -> None:
    alice, bob = main.token("alice", WRITE), main.token("bob", WRITE)
    image_id = (await upload(client, alice, visibility="private")).json()["id"]
    assert (await client.get(f"/img/{image_id}?w=64")).status_code == 401
    assert (await client.get(f"/img/{image_id}?w=64", headers=bearer(bob))).status_code == 403
    owner = await client.get(f"/img/{image_id}?w=64", headers=bearer(alice))
    assert owner.status_code == 200
    assert owner.headers["cache-control"] == "private, no-cache"
    assert "access-control-allow-origin" not in owner.headers
    urls = RenderUrls("http://testserver", [SIGNING])
    assert (await client.get(urls.url(image_id, w=64))).status_code == 401  # signed, but no exp
    signed = await client.get(urls.url(image_id, w=64, expires_in=600))
    assert signed.status_code == 200
    assert signed.headers["cache-control"].startswith("private, max-age=")
    assert 590 <= int(signed.headers["cache-control"].rsplit("=", 1)[1]) <= 600
    assert "access-control-allow-origin" not in signed.headers


async def test_introspection_answers_are_cached_and_shared(settings: Settings, main: MainApp) -> None:
    async with app_client(auth_settings(settings, main, "introspect")) as client:
        token = main.token("carol", WRITE)
        before = main.stats()["introspection_calls"]
        for _ in range(100):
            assert (await client.get("/images", headers=bearer(token))).status_code == 200
        fresh = main.token("dave", WRITE)
        responses = await asyncio.gather(*(client.get("/images", headers=bearer(fresh)) for _ in range(50)))
        assert {r.status_code for r in responses} == {200}
        assert main.stats()["introspection_calls"] - before == 2


async def test_main_app_down_fails_closed_and_recovers(settings: Settings, main: MainApp) -> None:
    async with app_client(auth_settings(settings, main, "introspect")) as client:
        token = main.token("erin", WRITE)
        main.fail("down")
        try:
            refused = await client.get("/images", headers=bearer(token))
            assert refused.status_code == 503
            assert refused.headers["cache-control"] == "no-store" and refused.headers["retry-after"]
        finally:
            main.fail("ok")
        assert (await client.get("/images", headers=bearer(token))).status_code == 200


async def test_upload_rate_limit_is_per_subject(settings: Settings, main: MainApp) -> None:
    async with app_client(auth_settings(settings, main, "jwks", upload_rate=5)) as client:
        alice, bob = main.token("alice", WRITE), main.token("bob", WRITE)
        statuses = [(await upload(client, alice)).status_code for _ in range(5)]
        assert statuses == [201] * 5
        limited = await upload(client, alice)
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1 and limited.headers["cache-control"] == "no-store"
        assert (await upload(client, bob)).status_code == 201


def test_end_to_end_with_two_real_processes(main: MainApp, server_env: dict[str, str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {**server_env, "IMGSVC_AUTH": "jwks", "IMGSVC_AUTH_JWKS_URL": f"{main.url}/.well-known/jwks.json",
           "IMGSVC_AUTH_ISSUER": main.issuer, "IMGSVC_AUTH_AUDIENCE": AUDIENCE}  # fmt: skip
    server = ServerProcess(env, tmp_path / "server.log").start()
    try:
        token = main.token("alice", WRITE)
        created = httpx.post(f"{server.url}/images", content=FLICKR.read_bytes(),
                             headers={"Content-Type": "image/jpeg", **bearer(token)})  # fmt: skip
        assert created.status_code == 201, created.text
        anonymous = httpx.post(f"{server.url}/images", content=b"x", headers={"Content-Type": "image/jpeg"})
        assert anonymous.status_code == 401
        rendered = httpx.get(f"{server.url}/img/{created.json()['id']}", params={"w": "256", "fmt": "webp"})
        assert rendered.status_code == 200 and rendered.headers["content-type"] == "image/webp"
    finally:
        server.stop()
    assert "eyJ" not in (tmp_path / "server.log").read_text()  # tokens never reach the log
