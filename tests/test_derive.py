"""The pyramid of reduced sources: levels appear after an upload (off its path), renders start from them with
the same pixels, a missing or corrupt level falls back to the original, gc removes levels with the blob's last
image, and a derivation left by a crashed worker is completed after a restart; on the filesystem and on S3."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import asyncpg
import httpx
import pytest
import pyvips

from imgsvc import derivations, metrics, pipeline, pyramid
from imgsvc.client import RenderUrls
from imgsvc.config import Settings
from imgsvc.gc import collect_garbage
from imgsvc.spec import SpecLimits, parse_query
from imgsvc.storage import blob_key
from tests.conftest import FLICKR, GIF_ANIMATED, PHOTO, PNG_ALPHA, ServerProcess, app_client, with_s3, with_settings
from tests.similarity import ssim
from tests.test_config import run_cli

LATER = datetime.now(UTC) + timedelta(days=8)
KEYS = (("k1", "pyramid-test-secret"),)
URLS = RenderUrls("http://testserver", keys=KEYS)
PIXEL_SSIM = 0.995  # the render's pixels (a lossless output) from a level vs from the original


def deriving(request: pytest.FixtureRequest, settings: Settings, backend: str) -> Settings:
    settings = with_settings(settings, derive_workers=1, derive_scales=(2, 4, 8), signing_keys=KEYS)
    if backend == "s3":
        settings = with_s3(settings, request.getfixturevalue("seaweed"), f"derive-{uuid.uuid4().hex[:8]}")
    return settings


async def upload(client: httpx.AsyncClient, data: bytes) -> dict[str, object]:
    response = await client.post("/images", content=data, headers={"Content-Type": "image/*"})
    assert response.status_code == 201, response.text
    return dict(response.json())


async def wait_derived(pool: asyncpg.Pool, sha256: str, timeout: float = 120.0) -> list[int]:
    """Poll the queue until the blob is derived (bounded); its stored levels."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = await pool.fetchrow("SELECT state, levels FROM derivations WHERE sha256 = $1", sha256)
        if row is not None and row["state"] == "done":
            return list(row["levels"])
        assert row is None or row["state"] != "failed", "the derivation failed"
        await asyncio.sleep(0.1)
    raise AssertionError(f"blob {sha256[:12]} not derived within {timeout} s")


def sources() -> dict[str, float]:
    """Renders so far in this process by where they started (imgsvc_render_sources_total)."""
    samples = (s for m in metrics.render_sources.collect() for s in m.samples if s.name.endswith("_total"))
    return {s.labels["source"]: s.value for s in samples}


def started_from(before: dict[str, float]) -> str:
    """Where the one render since `before` started ("fallback+original": after an unusable level)."""
    after = sources()
    grown = sorted(name for name, value in after.items() if value > before.get(name, 0))
    assert sum(after.values()) - sum(before.values()) == len(grown), (before, after)
    return "+".join(grown)


async def reference(original: bytes, query: str, fmt: pipeline.OutputFormat) -> bytes:
    """The same render from the original, as a server without a pyramid makes it."""
    spec = parse_query([tuple(p.split("=")) for p in query.split("&")], SpecLimits()).spec  # type: ignore[misc]
    rendered = await anyio.to_thread.run_sync(pipeline.render, original, spec, fmt, pipeline.PipelineLimits())
    return rendered.data


async def render_level_as_png(store, sha256: str, query: str) -> bytes:  # type: ignore[no-untyped-def]
    """What the server renders from the level it picks, but encoded losslessly (a PNG URL never uses levels)."""
    spec = parse_query([tuple(p.split("=")) for p in query.split("&")], SpecLimits()).spec  # type: ignore[misc]
    levels = pyramid.levels_for(derivations.Source(sha256, "jpeg", 4000, 3000, 1, 1, False), (2, 4, 8))
    level = pyramid.choose(levels, 4000, 3000, spec, "webp", False, pipeline.PipelineLimits())
    assert level is not None
    data = await store.get(level.key(sha256), 10**8)
    rendered = await anyio.to_thread.run_sync(
        pyramid.render_level, data, level, spec, "png", pipeline.PipelineLimits(), None, (4000, 3000)
    )
    return rendered.data


@pytest.mark.parametrize("backend", ["fs", "s3"])
async def test_levels_appear_after_upload_and_renders_start_from_them(request, settings, backend) -> None:  # type: ignore[no-untyped-def]
    original = PHOTO.read_bytes()  # 4000x3000 JPEG
    async with app_client(deriving(request, settings, backend)) as client:
        services = client.services  # type: ignore[attr-defined]
        image = await upload(client, original)
        sha256 = str(image["sha256"])
        assert await wait_derived(services.catalog.pool, sha256) == [2, 4, 8]
        for scale, size in ((2, (2000, 1500)), (4, (1000, 750)), (8, (500, 375))):
            stored = await services.store.get(f"derived/{sha256[:2]}/{sha256[2:4]}/{sha256}/1-{scale}.jpg", 10**8)
            level = await anyio.to_thread.run_sync(lambda data=stored: pipeline.probe(data, pipeline.PipelineLimits()))
            assert (level.format, level.width, level.height) == ("jpeg", *size)
        cases = [("w=100", "jpeg", "level"), ("w=256", "webp", "level"), ("w=64&h=64&fit=cover", "jpeg", "level"),
                 ("w=300&blur=2", "webp", "level"), ("w=200&h=200&fit=cover&g=smart", "jpeg", "level"),
                 ("w=640", "webp", "level"), ("w=96&dpr=2", "avif", "level"),
                 ("w=256", "png", "original"), ("w=1200", "jpeg", "original")]  # fmt: skip
        for query, fmt, source in cases:
            before = sources()
            params = dict(p.split("=") for p in query.split("&"))
            response = await client.get(URLS.url(str(image["id"]), fmt=fmt, **params))
            assert response.status_code == 200, response.text
            assert started_from(before) == source, query
            if source == "level":  # the render's own pixels (lossless) from the level vs from the original
                level_pixels = await render_level_as_png(services.store, sha256, query)
                assert ssim(level_pixels, await reference(original, query, "png")) >= PIXEL_SSIM, query


async def test_lossy_outputs_from_a_level_match_the_original_based_ones(request, settings) -> None:  # type: ignore[no-untyped-def]
    """Each lossy output is as close to the ideal (the lossless render from the original) as the original-based
    one is, and within 2% of its bytes (the corpus-wide figures: benchmarks/results/pyramid.md)."""
    original = FLICKR.read_bytes()  # 2725x2225 JPEG
    async with app_client(deriving(request, settings, "fs")) as client:
        image = await upload(client, original)
        await wait_derived(client.services.catalog.pool, str(image["sha256"]))  # type: ignore[attr-defined]
        for width in (64, 128, 256, 384, 640):
            ideal = await reference(original, f"w={width}", "png")
            for fmt in ("webp", "jpeg"):
                before = sources()
                response = await client.get(f"/img/{image['id']}?w={width}&fmt={fmt}")
                assert started_from(before) == "level"
                expected = await reference(original, f"w={width}", fmt)  # type: ignore[arg-type]
                assert ssim(response.content, ideal) >= ssim(expected, ideal) - 0.003, (width, fmt)
                assert abs(len(response.content) / len(expected) - 1) <= 0.02, (width, fmt)


@pytest.mark.parametrize("path", [PNG_ALPHA, GIF_ANIMATED])
async def test_originals_without_faithful_levels_get_none_but_a_placeholder(request, settings, path: Path) -> None:  # type: ignore[no-untyped-def]
    async with app_client(deriving(request, settings, "fs")) as client:
        image = await upload(client, path.read_bytes())
        assert await wait_derived(client.services.catalog.pool, str(image["sha256"])) == []  # type: ignore[attr-defined]
        before = sources()
        assert (await client.get(f"/img/{image['id']}?w=64&fmt=webp")).status_code == 200
        assert started_from(before) == "original"
        assert (await client.get(f"/images/{image['id']}")).json()["placeholder"] is not None


@pytest.mark.parametrize("backend", ["fs", "s3"])
@pytest.mark.parametrize("damage", ["missing", "truncated", "another level", "not an image"])
async def test_a_missing_or_corrupt_level_falls_back_to_the_original(request, settings, backend, damage) -> None:  # type: ignore[no-untyped-def]
    original = PHOTO.read_bytes()
    async with app_client(deriving(request, settings, backend)) as client:
        services = client.services  # type: ignore[attr-defined]
        image = await upload(client, original)
        sha256 = str(image["sha256"])
        await wait_derived(services.catalog.pool, sha256)
        key = f"derived/{sha256[:2]}/{sha256[2:4]}/{sha256}/1-8.jpg"  # what w=128 starts from
        level = await services.store.get(key, 10**8)
        await services.store.delete(key)
        match damage:
            case "truncated":
                await services.store.put(key, level[: len(level) // 2])
            case "another level":
                await services.store.put(key, await services.store.get(key.replace("1-8", "1-4"), 10**8))
            case "not an image":
                await services.store.put(key, b"<svg xmlns='http://www.w3.org/2000/svg'/>")
        before = sources()
        response = await client.get(f"/img/{image['id']}?w=128&fmt=jpeg")
        assert response.status_code == 200
        assert started_from(before) == ("original" if damage == "missing" else "fallback+original")
        assert response.content == await reference(original, "w=128", "jpeg")  # the original's very bytes
        if damage != "missing":  # a damaged level is removed and the blob derived again
            await wait_derived(services.catalog.pool, sha256)
            assert await services.store.get(key, 10**8) == level
            before = sources()
            assert (await client.get(f"/img/{image['id']}?w=120&fmt=jpeg")).status_code == 200
            assert started_from(before) == "level"


@pytest.mark.parametrize("backend", ["fs", "s3"])
async def test_gc_removes_levels_with_the_blobs_last_image(request, settings, backend) -> None:  # type: ignore[no-untyped-def]
    async with app_client(deriving(request, settings, backend)) as client:
        services = client.services  # type: ignore[attr-defined]
        first, second = await upload(client, FLICKR.read_bytes()), await upload(client, FLICKR.read_bytes())
        sha256 = str(first["sha256"])
        await wait_derived(services.catalog.pool, sha256)

        async def keys() -> set[str]:
            return {key async for key, _ in services.store.list_blobs() if sha256 in key}

        derived = {f"derived/{sha256[:2]}/{sha256[2:4]}/{sha256}/1-{n}.jpg" for n in (2, 4, 8)}
        assert await keys() == {blob_key(sha256), *derived}
        assert (await client.delete(f"/images/{first['id']}")).status_code == 204
        report = await collect_garbage(services.catalog, services.store, timedelta(days=7), now=LATER)
        assert report.removed == [] and await keys() == {blob_key(sha256), *derived}  # the second image lives

        assert (await client.delete(f"/images/{second['id']}")).status_code == 204
        report = await collect_garbage(services.catalog, services.store, timedelta(days=7), now=LATER)
        assert sorted(report.removed) == sorted([blob_key(sha256), *derived]) and await keys() == set()
        assert await services.catalog.pool.fetchval("SELECT count(*) FROM derivations") == 0

        again = await upload(client, FLICKR.read_bytes())  # the same bytes after gc: stored and derived anew
        assert await wait_derived(services.catalog.pool, sha256) == [2, 4, 8]
        assert await keys() == {blob_key(sha256), *derived} and again["sha256"] == sha256


def test_a_derivation_left_by_a_crashed_worker_completes_after_a_restart(server_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A server that derives nothing takes the upload; a worker leases the job and dies (SIGKILL of a real
    server mid-derivation, or the job's lease alone); a restarted server completes both once the lease lapses."""
    env = {**server_env, "IMGSVC_DERIVE_TIMEOUT": "1"}  # lease: 2 x 1 + 10 s
    plain = ServerProcess(env, tmp_path / "plain.log").start()
    try:
        images = [httpx.post(f"{plain.url}/images", content=data, headers={"Content-Type": "image/*"}).json()
                  for data in (PHOTO.read_bytes(), FLICKR.read_bytes())]  # fmt: skip
    finally:
        plain.stop()
    dsn = server_env["IMGSVC_DATABASE_URL"]

    async def lease_one() -> str | None:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
        try:
            source = await derivations.lease(pool, 12.0)  # as a worker that then crashed
            return source.sha256 if source else None
        finally:
            await pool.close()

    leased = asyncio.run(lease_one())
    assert leased in {images[0]["sha256"], images[1]["sha256"]}
    deriving_env = {**env, "IMGSVC_DERIVE_WORKERS": "1"}
    crashed = ServerProcess(deriving_env, tmp_path / "crashed.log").start()
    assert crashed.proc is not None
    crashed.proc.kill()  # whatever it was doing: the other job is leased, or done, or not started
    crashed.proc.wait(10)
    crashed.proc = None
    restarted = ServerProcess(deriving_env, tmp_path / "restarted.log").start()
    try:

        async def wait_all() -> None:
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
            try:
                for image in images:
                    assert await wait_derived(pool, str(image["sha256"]), timeout=90) == [4, 8]  # the default
            finally:
                await pool.close()

        asyncio.run(wait_all())
        for image in images:
            body = httpx.get(f"{restarted.url}/images/{image['id']}").json()
            assert body["placeholder"] is not None
    finally:
        restarted.stop()


def test_backfill_derives_images_uploaded_before(server_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = ServerProcess(server_env, tmp_path / "server.log").start()  # IMGSVC_DERIVE_WORKERS=0
    try:
        image = httpx.post(f"{server.url}/images", content=FLICKR.read_bytes(),
                           headers={"Content-Type": "image/*"}).json()  # fmt: skip
        dsn = server_env["IMGSVC_DATABASE_URL"]
        asyncio.run(_forget_queue(dsn))  # as an image uploaded before the pyramid existed
        assert httpx.get(f"{server.url}/images/{image['id']}").json()["placeholder"] is None
        result = run_cli("derive", "--backfill", env=server_env)
        assert result.returncode == 0, result.stderr
        assert "queued 1 blobs" in result.stderr and "derived 1 blobs; now 1 done" in result.stdout
        again = run_cli("derive", "--backfill", env=server_env)
        assert "queued 0 blobs" in again.stderr and "derived 0 blobs" in again.stdout
        placeholder = httpx.get(f"{server.url}/images/{image['id']}").json()["placeholder"]
        assert placeholder is not None and placeholder["aspect_ratio"] == round(2725 / 2225, 4)
    finally:
        server.stop()


async def _forget_queue(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DELETE FROM derivations")
    finally:
        await conn.close()


def test_levels_exist_only_for_static_jpegs() -> None:
    def source(fmt: str, width: int = 4000, height: int = 3000, frames: int = 1) -> derivations.Source:
        return derivations.Source(hashlib.sha256(b"x").hexdigest(), fmt, width, height, 1, frames, False)

    assert [lv.scale for lv in pyramid.levels_for(source("jpeg"), (2, 4, 8))] == [2, 4, 8]
    assert [(lv.width, lv.height) for lv in pyramid.levels_for(source("jpeg", 2725, 2225), (4, 8))] == [
        (681, 556), (340, 278)]  # fmt: skip
    assert [lv.scale for lv in pyramid.levels_for(source("jpeg", 500, 400), (2, 4, 8))] == [2, 4]  # >= 64 px
    for fmt in ("png", "webp", "gif", "avif", "heif", "tiff"):
        assert pyramid.levels_for(source(fmt), (2, 4, 8)) == ()
    assert pyramid.levels_for(source("jpeg", frames=2), (2, 4, 8)) == ()


async def test_a_blob_whose_images_all_went_is_not_derived(settings) -> None:  # type: ignore[no-untyped-def]
    async with app_client(settings) as client:  # derives nothing (IMGSVC_DERIVE_WORKERS=0)
        pool = client.services.catalog.pool  # type: ignore[attr-defined]
        image = await upload(client, FLICKR.read_bytes())
        assert await derivations.counts(pool) == {"pending": 1}
        assert (await client.delete(f"/images/{image['id']}")).status_code == 204
        assert await derivations.lease(pool, 10.0) is None
        assert await derivations.counts(pool) == {}


def variant_of(path: Path, kind: str) -> bytes:
    """The original stored sideways or upside down with an EXIF orientation, or tagged with a Display P3 profile."""
    image = pyvips.Image.new_from_file(str(path), access="random")
    if kind == "p3":
        return bytes(image.icc_transform("p3", input_profile="srgb").jpegsave_buffer(Q=90, keep="icc"))
    turn, orientation = {"orientation 6": (image.rot270, 6), "orientation 3": (image.rot180, 3),
                         "orientation 8": (image.rot90, 8)}[kind]  # fmt: skip
    stored = turn().copy()
    stored.set_type(pyvips.GValue.gint_type, "orientation", orientation)
    return bytes(stored.jpegsave_buffer(Q=90, keep="exif"))


@pytest.mark.parametrize("kind", ["orientation 6", "orientation 3", "orientation 8", "p3"])
async def test_levels_of_rotated_and_colour_managed_originals(request, settings, kind: str) -> None:  # type: ignore[no-untyped-def]
    original = variant_of(FLICKR, kind)  # 2725x2225 once oriented
    async with app_client(deriving(request, settings, "fs")) as client:
        services = client.services  # type: ignore[attr-defined]
        image = await upload(client, original)
        assert (image["width"], image["height"]) == (2725, 2225)
        await wait_derived(services.catalog.pool, str(image["sha256"]))
        for query in ("w=128", "w=300&h=200&fit=cover"):
            before = sources()
            response = await client.get(
                URLS.url(str(image["id"]), fmt="jpeg", **dict(p.split("=") for p in query.split("&")))
            )
            assert response.status_code == 200 and started_from(before) == "level"
            spec = parse_query([tuple(p.split("=")) for p in query.split("&")], SpecLimits()).spec  # type: ignore[misc]
            levels = pyramid.levels_for(derivations.Source("", "jpeg", 2725, 2225, 1, 1, False), (2, 4, 8))
            level = pyramid.choose(levels, 2725, 2225, spec, "jpeg", False, pipeline.PipelineLimits())
            assert level is not None
            data = await services.store.get(level.key(str(image["sha256"])), 10**8)
            pixels = pyramid.render_level(data, level, spec, "png", pipeline.PipelineLimits(), None, (2725, 2225))
            assert ssim(pixels.data, await reference(original, query, "png")) >= PIXEL_SSIM, query
