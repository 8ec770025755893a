"""Garbage collection: unreferenced blobs go after the grace period, live and recent ones stay,
and an upload racing the collector never loses its blob."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from imgsvc.gc import collect_garbage
from imgsvc.storage import blob_key
from tests.conftest import FLICKR, GIF_ANIMATED, PNG_ALPHA, app_client, with_s3, with_settings
from tests.test_config import run_cli

GRACE = timedelta(days=7)
LATER = datetime.now(UTC) + timedelta(days=8)


def key_of(data: bytes) -> str:
    return blob_key(hashlib.sha256(data).hexdigest())


async def upload(client: httpx.AsyncClient, data: bytes) -> str:
    response = await client.post("/images", content=data, headers={"Content-Type": "image/*"})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


@pytest.mark.parametrize("backend", ["fs", "postgres", "s3"])
async def test_only_blobs_unreferenced_for_longer_than_the_grace_period_go(request, settings, backend) -> None:  # type: ignore[no-untyped-def]
    if backend == "postgres":
        settings = with_settings(settings, storage_url="postgres:")
    elif backend == "s3":
        settings = with_s3(settings, request.getfixturevalue("seaweed"), f"gc-{uuid.uuid4().hex[:8]}")
    async with app_client(settings) as client:
        services = client.services  # type: ignore[attr-defined]
        catalog, store = services.catalog, services.store
        deleted_id = await upload(client, FLICKR.read_bytes())
        live_id = await upload(client, PNG_ALPHA.read_bytes())
        assert (await client.delete(f"/images/{deleted_id}")).status_code == 204
        orphan = GIF_ANIMATED.read_bytes()
        await store.put(key_of(orphan), orphan)  # as a crashed upload would leave it: a blob, no record

        now = await collect_garbage(catalog, store, GRACE)
        assert (now.examined, now.removed) == (3, [])  # everything is too recent

        dry = await collect_garbage(catalog, store, GRACE, dry_run=True, now=LATER)
        assert sorted(dry.removed) == sorted([key_of(FLICKR.read_bytes()), key_of(orphan)])
        assert await store.exists(key_of(FLICKR.read_bytes()))

        done = await collect_garbage(catalog, store, GRACE, now=LATER)
        assert sorted(done.removed) == sorted(dry.removed) and done.kept == 1
        assert not await store.exists(key_of(FLICKR.read_bytes())) and not await store.exists(key_of(orphan))
        assert (await client.get(f"/img/{live_id}?w=64")).status_code == 200


async def test_a_shared_blob_stays_while_any_owner_still_has_the_image(settings) -> None:  # type: ignore[no-untyped-def]
    async with app_client(settings) as client:
        services = client.services  # type: ignore[attr-defined]
        data = FLICKR.read_bytes()
        first = await upload(client, data)
        # A second image of the same bytes (another owner in real life): the same blob.
        record = await services.catalog.get(first)
        await services.catalog.pool.execute(
            "INSERT INTO images SELECT 'BBBBBBBBBBBBBBBBBBBBBB', sha256, 'bob', category, visibility, format, width, "
            "height, bytes, frames, has_alpha, original_filename, created_at, NULL FROM images WHERE id = $1",
            record.id,
        )
        assert (await client.delete(f"/images/{first}")).status_code == 204
        report = await collect_garbage(services.catalog, services.store, GRACE, now=LATER)
        assert report.removed == [] and await services.store.exists(key_of(data))


async def test_the_collector_waits_for_an_upload_holding_the_blob(settings) -> None:  # type: ignore[no-untyped-def]
    async with app_client(settings) as client:
        services = client.services  # type: ignore[attr-defined]
        data = FLICKR.read_bytes()
        old = await upload(client, data)
        assert (await client.delete(f"/images/{old}")).status_code == 204
        sha = hashlib.sha256(data).hexdigest()
        # An upload of the same bytes is between "blob stored" and "record committed", holding the lock.
        async with services.catalog.blob_lock(sha):
            collector = asyncio.create_task(collect_garbage(services.catalog, services.store, GRACE, now=LATER))
            await asyncio.sleep(0.3)
            assert not collector.done()  # it waits for the upload rather than deleting under it
            await services.catalog.pool.execute(  # the upload's record, committed before the lock is released
                "INSERT INTO images SELECT 'CCCCCCCCCCCCCCCCCCCCCC', sha256, owner, category, visibility, format, "
                "width, height, bytes, frames, has_alpha, original_filename, now(), NULL FROM images WHERE id = $1",
                old,
            )
        report = await collector
        assert report.removed == []
        assert (await client.get("/img/CCCCCCCCCCCCCCCCCCCCCC?w=64")).status_code == 200


async def test_uploads_racing_the_collector_never_lose_their_blob(settings) -> None:  # type: ignore[no-untyped-def]
    async with app_client(settings) as client:
        services = client.services  # type: ignore[attr-defined]
        data = FLICKR.read_bytes()
        for _ in range(5):
            image_id = await upload(client, data)
            assert (await client.delete(f"/images/{image_id}")).status_code == 204
            image_id, _report = await asyncio.gather(
                upload(client, data), collect_garbage(services.catalog, services.store, GRACE, now=LATER)
            )
            services.renderer.originals.clear()  # the render must read the store
            assert await services.store.exists(key_of(data))
            assert (await client.get(f"/img/{image_id}?w=32&v={_}")).status_code == 200
            assert (await client.delete(f"/images/{image_id}")).status_code == 204


def test_gc_command_dry_run(database_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {"IMGSVC_DATABASE_URL": database_url, "IMGSVC_STORAGE_URL": f"file://{tmp_path}/blobs"}
    (tmp_path / "blobs" / "sha256" / "aa" / "bb").mkdir(parents=True)
    orphan = tmp_path / "blobs" / "sha256" / "aa" / "bb" / ("ab" * 32)
    orphan.write_bytes(b"x")
    kept = run_cli("gc", "--dry-run", env=env)
    assert kept.returncode == 0, kept.stderr
    assert "examined 1 blobs: 0 to remove, 1 kept (grace 7 days)" in kept.stdout
    gone = run_cli("gc", "--grace-days", "0", env=env)
    assert f"removed sha256/aa/bb/{'ab' * 32}" in gone.stdout and not orphan.exists()


async def test_the_service_can_collect_periodically(settings) -> None:  # type: ignore[no-untyped-def]
    async with app_client(with_settings(settings, gc_interval=0.2, gc_grace_days=0.0)) as client:
        store = client.services.store  # type: ignore[attr-defined]
        orphan = GIF_ANIMATED.read_bytes()
        await store.put(key_of(orphan), orphan)
        for _ in range(50):
            if not await store.exists(key_of(orphan)):
                break
            await asyncio.sleep(0.1)
        assert not await store.exists(key_of(orphan))
