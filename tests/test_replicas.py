"""Many replicas over one catalog and one store: a delete on one is a 404 on every other within a second,
even for variants in their LRU and even after their listener connection was cut."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid
from pathlib import Path

import asyncpg
import httpx

from imgsvc.config import Settings
from imgsvc.invalidation import APPLICATION_NAME
from tests.conftest import FLICKR, PNG_ALPHA, SeaweedS3, ServerProcess, app_client, s3_env


async def wait_for_status(client: httpx.AsyncClient, url: str, status: int, within: float = 1.0) -> float:
    began = time.monotonic()
    while time.monotonic() - began < within:
        if (await client.get(url)).status_code == status:
            return time.monotonic() - began
        await asyncio.sleep(0.01)
    raise AssertionError(f"{url} did not answer {status} within {within} s")


async def test_delete_on_one_replica_is_404_on_the_other_within_a_second(settings: Settings) -> None:
    async with app_client(settings) as a, app_client(settings) as b:
        created = await a.post("/images", content=FLICKR.read_bytes(), headers={"Content-Type": "image/jpeg"})
        image_id = created.json()["id"]
        url = f"/img/{image_id}?w=128&fmt=webp"
        assert (await b.get(url)).status_code == 200
        assert (await b.get(url)).headers["x-cache"] == "hit"  # B holds the record and the variant
        assert (await a.delete(f"/images/{image_id}")).status_code == 204
        elapsed = await wait_for_status(b, url, 404)
        assert elapsed < 1.0
        renderer = b.services.renderer  # type: ignore[attr-defined]
        assert len(renderer.variants) == 0 and len(renderer.decoded) == 0


async def test_a_replica_whose_listener_was_cut_serves_nothing_stale_and_recovers(
    settings: Settings, database_url: str
) -> None:
    async with app_client(settings) as a, app_client(settings) as b:
        ids = []
        for path in (FLICKR, PNG_ALPHA):
            created = await a.post("/images", content=path.read_bytes(), headers={"Content-Type": "image/*"})
            ids.append(created.json()["id"])
        for image_id in ids:
            assert (await b.get(f"/img/{image_id}?w=64")).status_code == 200
        admin = await asyncpg.connect(database_url)
        try:
            # Cut the replicas' listening connections from the server side, as a network fault or failover would.
            cut = await listener_pids(admin)
            assert len(cut) == 2
            await admin.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", list(cut))
            # The delete happens while B cannot hear it; B must still answer 404.
            assert (await a.delete(f"/images/{ids[0]}")).status_code == 204
            await wait_for_status(b, f"/img/{ids[0]}?w=64", 404, within=2.0)
            assert (await b.get(f"/img/{ids[1]}?w=64")).status_code == 200
            # The replicas reconnect by themselves and hear deletes again.
            began = time.monotonic()
            while len((await listener_pids(admin)) - cut) < 2 and time.monotonic() - began < 10:
                await asyncio.sleep(0.05)
            assert len((await listener_pids(admin)) - cut) == 2
            assert (await b.get(f"/img/{ids[1]}?w=64")).status_code == 200
            assert (await a.delete(f"/images/{ids[1]}")).status_code == 204
            assert await wait_for_status(b, f"/img/{ids[1]}?w=64", 404) < 1.0
        finally:
            await admin.close()


async def listener_pids(admin: asyncpg.Connection) -> set[int]:
    """Backends of the replicas' delete listeners in this database, as Postgres sees them."""
    rows = await admin.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
        APPLICATION_NAME,
    )
    return {row["pid"] for row in rows}


def test_two_real_replicas_over_postgres_and_seaweedfs(seaweed: SeaweedS3, database_url: str, tmp_path: Path) -> None:
    """The same bytes uploaded through A and B at once: two images, one blob. Deleting one on A is a 404 on B
    within a second, while the other keeps rendering on B (variant LRU hit and a new size)."""
    env = {"IMGSVC_DATABASE_URL": database_url, **s3_env(seaweed, f"replicas-{uuid.uuid4().hex[:8]}")}
    a = ServerProcess(env, tmp_path / "a.log").start()
    b = ServerProcess(env, tmp_path / "b.log").start()
    try:
        with httpx.Client(timeout=30) as http:
            data = FLICKR.read_bytes()

            def post(url: str) -> httpx.Response:
                return http.post(f"{url}/images", content=data, headers={"Content-Type": "image/jpeg"})

            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                both = list(pool.map(post, (a.url, b.url)))  # the same bytes through both replicas at once
            assert [r.status_code for r in both] == [201, 201]
            gone, kept = both[0].json()["id"], both[1].json()["id"]
            assert gone != kept
            deleted_variant, kept_variant = (f"{b.url}/img/{i}?w=256&fmt=webp" for i in (gone, kept))
            for url in (deleted_variant, kept_variant):
                assert http.get(url).status_code == 200 and http.get(url).headers["x-cache"] == "hit"
            assert http.delete(f"{a.url}/images/{gone}").status_code == 204
            deleted = time.monotonic()
            while http.get(deleted_variant).status_code != 404:
                assert time.monotonic() - deleted < 1.0, "B still serves the deleted image after 1 s"
                time.sleep(0.01)
            survivor = http.get(kept_variant)
            assert (survivor.status_code, survivor.headers["x-cache"]) == (200, "hit")  # its LRU entry stayed
            assert http.get(f"{b.url}/img/{kept}?w=384&fmt=png").status_code == 200  # and a miss renders
        assert len([k for k in seaweed_keys(seaweed, env["IMGSVC_STORAGE_URL"]) if "/sha256/" in k]) == 1  # one blob
    finally:
        a.stop()
        b.stop()


def seaweed_keys(seaweed: SeaweedS3, url: str) -> list[str]:
    prefix = url.split("/", 3)[3]
    client = seaweed.client()
    listing = client.list_objects_v2(Bucket=seaweed.bucket, Prefix=prefix)
    return [item["Key"] for item in listing.get("Contents", [])]
