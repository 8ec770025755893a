"""Every upload is its own image and only the blob is shared: deleting one image of a photo leaves the others
whole (renders, caches, metadata, original); `Idempotency-Key` makes a retried upload return the first answer."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path

import asyncpg
import httpx
import pytest

from imgsvc.config import Settings
from imgsvc.gc import collect_garbage
from imgsvc.storage import blob_key
from tests.conftest import FLICKR, PNG_ALPHA, MainApp, app_client
from tests.test_auth_http import auth_settings, bearer

GRACE = timedelta(days=7)


@pytest.fixture
async def client(settings: Settings, main: MainApp) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(auth_settings(settings, main, "jwks")) as c:
        yield c


@pytest.fixture
def alice(main: MainApp) -> str:
    return main.token("alice")


async def post(
    client: httpx.AsyncClient, token: str, path: Path = FLICKR, key: str | None = None, **params: str
) -> httpx.Response:
    headers = {"Content-Type": "image/jpeg", **bearer(token)} | ({"Idempotency-Key": key} if key else {})
    return await client.post("/images", content=path.read_bytes(), headers=headers, params=params)


def blob_files(root: Path) -> list[Path]:
    return [p for p in (root / "blobs").rglob("*") if p.is_file()]


async def live_images(client: httpx.AsyncClient) -> int:
    return int(await client.services.catalog.pool.fetchval(  # type: ignore[attr-defined]
        "SELECT count(*) FROM images WHERE deleted_at IS NULL"
    ))  # fmt: skip


async def test_the_same_photo_for_two_gigs_is_two_images_on_one_blob(
    client: httpx.AsyncClient, alice: str, tmp_path: Path
) -> None:
    gig1 = await post(client, alice, category="gig-1")
    gig2 = await post(client, alice, category="gig-2", visibility="private")
    assert (gig1.status_code, gig2.status_code) == (201, 201), gig2.text
    public, private = gig1.json(), gig2.json()
    assert public["id"] != private["id"] and public["sha256"] == private["sha256"]
    assert (public["category"], public["visibility"]) == ("gig-1", "public")
    assert (private["category"], private["visibility"]) == ("gig-2", "private")
    assert [p.name for p in blob_files(tmp_path)] == [public["sha256"]]

    anonymous_public = await client.get(f"/img/{public['id']}?w=128")
    assert anonymous_public.status_code == 200 and anonymous_public.headers["access-control-allow-origin"] == "*"
    # Sharing the blob (and its cached renders) shares no rights: the private image stays private.
    assert (await client.get(f"/img/{private['id']}?w=128")).status_code == 401
    own = await client.get(f"/img/{private['id']}?w=128", headers=bearer(alice))
    assert own.status_code == 200 and own.headers["cache-control"].startswith("private")
    assert own.content == anonymous_public.content
    for image in (public, private):
        assert (await client.get(f"/images/{image['id']}", headers=bearer(alice))).json() == image


async def test_deleting_one_image_of_a_photo_leaves_the_other_whole(
    client: httpx.AsyncClient, alice: str, tmp_path: Path
) -> None:
    renderer = client.services.renderer  # type: ignore[attr-defined]
    kept, gone = [(await post(client, alice, category=c)).json()["id"] for c in ("avatar", "post")]
    assert (await client.get(f"/img/{kept}?w=128")).headers["x-cache"] == "miss"
    assert (await client.get(f"/img/{gone}?w=128")).headers["x-cache"] == "hit"  # cached by content: shared
    assert (await client.get(f"/images/{gone}/original", headers=bearer(alice))).content == FLICKR.read_bytes()

    assert (await client.delete(f"/images/{gone}", headers=bearer(alice))).status_code == 204
    assert (await client.get(f"/img/{gone}?w=128")).status_code == 404
    assert (await client.get(f"/images/{gone}", headers=bearer(alice))).status_code == 404
    assert (await client.get(f"/images/{gone}/original", headers=bearer(alice))).status_code == 404

    hit = await client.get(f"/img/{kept}?w=128")
    assert (hit.status_code, hit.headers["x-cache"]) == (200, "hit")  # the survivor's cache entries stayed
    miss = await client.get(f"/img/{kept}?w=200&fmt=png")
    assert (miss.status_code, miss.headers["x-cache"]) == (200, "miss")
    assert (await client.get(f"/images/{kept}", headers=bearer(alice))).json()["category"] == "avatar"
    assert (await client.get(f"/images/{kept}/original", headers=bearer(alice))).content == FLICKR.read_bytes()
    assert len(blob_files(tmp_path)) == 1

    # The last image of the blob goes: so does everything cached from its bytes.
    assert (await client.delete(f"/images/{kept}", headers=bearer(alice))).status_code == 204
    assert (await client.get(f"/img/{kept}?w=128")).status_code == 404
    assert (len(renderer.variants), len(renderer.originals), len(renderer.decoded)) == (0, 0, 0)


async def test_a_shared_blob_is_collected_only_after_its_last_image_and_the_grace_period(
    client: httpx.AsyncClient, alice: str, tmp_path: Path
) -> None:
    services = client.services  # type: ignore[attr-defined]
    first, second = [(await post(client, alice, category=c)).json()["id"] for c in ("a", "b")]
    key = blob_key(hashlib.sha256(FLICKR.read_bytes()).hexdigest())
    assert (await client.delete(f"/images/{first}", headers=bearer(alice))).status_code == 204
    later = datetime.now(UTC) + GRACE + timedelta(days=1)
    report = await collect_garbage(services.catalog, services.store, GRACE, now=later)
    assert report.removed == [] and await services.store.exists(key)  # `second` still uses it
    assert (await client.get(f"/img/{second}?w=64")).status_code == 200

    assert (await client.delete(f"/images/{second}", headers=bearer(alice))).status_code == 204
    within_grace = await collect_garbage(services.catalog, services.store, GRACE, now=datetime.now(UTC) + GRACE / 2)
    assert within_grace.removed == [] and await services.store.exists(key)
    after_grace = await collect_garbage(services.catalog, services.store, GRACE, now=later)
    assert after_grace.removed == [key] and not await services.store.exists(key)
    assert blob_files(tmp_path) == []


async def test_a_retry_with_the_same_key_gets_the_first_answer(
    client: httpx.AsyncClient, alice: str, main: MainApp
) -> None:
    first = await post(client, alice, key="gig-7-cover", category="gig-7")
    again = await post(client, alice, key='"gig-7-cover"', category="gig-7")  # the header's quoted form
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert await live_images(client) == 1

    other_bytes = await post(client, alice, path=PNG_ALPHA, key="gig-7-cover", category="gig-7")
    other_options = await post(client, alice, key="gig-7-cover", category="gig-8")
    for refused in (other_bytes, other_options):
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["type"] == "/problems/idempotency-key-reused"
        assert refused.json()["param"] == "Idempotency-Key"

    bobs = await post(client, main.token("bob"), key="gig-7-cover", category="gig-7")  # keys are per owner
    assert bobs.status_code == 201 and bobs.json()["id"] != first.json()["id"]
    assert "idempotent-replayed" not in bobs.headers
    assert await live_images(client) == 2


async def test_concurrent_requests_with_one_key_on_two_replicas_create_one_image(
    settings: Settings, main: MainApp, tmp_path: Path
) -> None:
    token = main.token("alice")
    jwks = auth_settings(settings, main, "jwks")
    async with app_client(jwks) as a, app_client(jwks) as b:
        answers = await asyncio.gather(*(post(c, token, key="retry-storm") for c in [a, b] * 5))
        assert [r.status_code for r in answers] == [201] * 10
        assert len({r.json()["id"] for r in answers}) == 1
        assert sum(r.headers.get("idempotent-replayed") == "true" for r in answers) == 9
        assert await live_images(a) == 1
    assert len(blob_files(tmp_path)) == 1


async def test_a_failed_upload_leaves_its_key_free_for_the_retry(client: httpx.AsyncClient, alice: str) -> None:
    damaged = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8  # sniffs as JPEG, does not decode
    failed = await client.post(
        "/images", content=damaged, headers={"Content-Type": "image/jpeg", "Idempotency-Key": "k1", **bearer(alice)}
    )
    assert failed.status_code == 422 and failed.json()["type"] == "/problems/undecodable-image"
    retried = await post(client, alice, key="k1")
    assert retried.status_code == 201 and "idempotent-replayed" not in retried.headers


@pytest.mark.parametrize("key", ["", '""', "has space", "x" * 256, "semi;colon", 'quote"inside'])
async def test_a_malformed_key_is_400_before_anything_is_stored(
    client: httpx.AsyncClient, alice: str, key: str, tmp_path: Path
) -> None:
    response = await client.post(
        "/images", content=FLICKR.read_bytes(),
        headers={"Content-Type": "image/jpeg", "Idempotency-Key": key, **bearer(alice)},
    )  # fmt: skip
    assert response.status_code == 400 and response.json()["param"] == "Idempotency-Key"
    assert await live_images(client) == 0 and blob_files(tmp_path) == []


async def test_keys_last_24_hours_then_the_collector_removes_them(client: httpx.AsyncClient, alice: str) -> None:
    services = client.services  # type: ignore[attr-defined]
    pool = services.catalog.pool
    first = (await post(client, alice, key="daily")).json()["id"]
    lifetime = await pool.fetchval("SELECT expires_at - claimed_at FROM idempotency_keys WHERE key = 'daily'")
    assert lifetime == timedelta(hours=24)
    await pool.execute("UPDATE idempotency_keys SET expires_at = clock_timestamp() - interval '1 s'")  # a day later
    after = await post(client, alice, key="daily")
    assert after.status_code == 201 and after.json()["id"] != first  # an expired key starts afresh

    await pool.execute("UPDATE idempotency_keys SET expires_at = clock_timestamp() - interval '1 s'")
    dry = await collect_garbage(services.catalog, services.store, GRACE, dry_run=True)
    assert dry.expired_keys == 0 and await pool.fetchval("SELECT count(*) FROM idempotency_keys") == 1
    report = await collect_garbage(services.catalog, services.store, GRACE)
    assert report.expired_keys == 1 and await pool.fetchval("SELECT count(*) FROM idempotency_keys") == 0


async def test_the_migration_keeps_existing_images_and_lifts_the_one_image_per_bytes_rule(
    settings: Settings, database_url: str, tmp_path: Path
) -> None:
    """A catalog written by the version that kept one image per (owner, bytes) is migrated in place."""
    data = FLICKR.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version in ("0001_images", "0002_blobs"):
            await conn.execute(resources.files("imgsvc.migrations").joinpath(f"{version}.sql").read_text())
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
        await conn.execute(
            "INSERT INTO images (id, sha256, owner, category, visibility, format, width, height, bytes, frames, "
            "has_alpha) VALUES ('OldImageOldImageOldIma', $1, 'anonymous', 'gig', 'public', 'jpeg', 2725, 2225, $2, "
            "1, false)",
            sha256, len(data),
        )  # fmt: skip
    finally:
        await conn.close()
    blob = tmp_path / "blobs" / blob_key(sha256)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)

    async with app_client(settings) as client:  # migrates on start
        old = await client.get("/img/OldImageOldImageOldIma?w=64")
        assert old.status_code == 200, old.text
        again = await client.post(
            "/images", content=data, headers={"Content-Type": "image/jpeg"}, params={"category": "gig"}
        )
        assert again.status_code == 201 and again.json()["id"] != "OldImageOldImageOldIma"
        new = await client.get(f"/img/{again.json()['id']}?w=64")
        assert new.headers["etag"] == old.headers["etag"]  # ETags come from the bytes and the spec, not the record
        assert (await client.get("/images/OldImageOldImageOldIma")).json()["category"] == "gig"
    assert blob_files(tmp_path) == [blob]


async def test_identical_bytes_are_written_once_and_a_lost_blob_is_written_again(
    client: httpx.AsyncClient, alice: str, tmp_path: Path
) -> None:
    first = (await post(client, alice)).json()["id"]
    (blob,) = blob_files(tmp_path)
    written = (blob.stat().st_ino, blob.stat().st_mtime_ns)
    await post(client, alice)
    assert (blob.stat().st_ino, blob.stat().st_mtime_ns) == written  # not rewritten
    blob.unlink()  # lost by an operator's mistake: the next upload of these bytes restores it
    assert (await post(client, alice)).status_code == 201
    assert blob.read_bytes() == FLICKR.read_bytes()
    assert (await client.get(f"/img/{first}?w=48")).status_code == 200
