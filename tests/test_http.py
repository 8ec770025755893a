"""CDN-grade HTTP of /img: ETag before rendering, 304, HEAD, Vary, caching and security headers,
the variant LRU, single-flight and the bounded render queue."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import pyvips

from tests.conftest import (
    FLICKR,
    GIF_ANIMATED,
    PHOTO,
    PNG_ALPHA,
    WEBP_ANIMATED,
    app_client,
    renders_started,
    with_settings,
)

CHROME_ACCEPT = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
FIREFOX_ACCEPT = "image/avif,image/webp,image/png,image/svg+xml,image/*;q=0.8,*/*;q=0.5"
OLD_SAFARI_ACCEPT = "image/webp,image/png,image/svg+xml,image/*;q=0.8,video/*;q=0.8,*/*;q=0.5"
CURL_ACCEPT = "*/*"


async def upload(client: httpx.AsyncClient, path: Path) -> str:
    response = await client.post("/images", content=path.read_bytes(), headers={"Content-Type": "image/*"})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def decoded(response: httpx.Response) -> pyvips.Image:
    animated = response.headers["content-type"] in {"image/gif", "image/webp"}
    return pyvips.Image.new_from_buffer(response.content, "", **({"n": -1} if animated else {}))


_renders_before_the_test = 0


@pytest.fixture(autouse=True)
def _count_renders_from_here() -> None:
    global _renders_before_the_test
    _renders_before_the_test = renders_started()


def renders(client: httpx.AsyncClient) -> int:
    """Renders started since the test began (the client's app is the only one rendering in it)."""
    return renders_started() - _renders_before_the_test


def assert_image_headers(response: httpx.Response, media_type: str) -> None:
    headers = response.headers
    assert headers["content-type"] == media_type
    assert headers["cache-control"] == "public, max-age=31536000, immutable"
    assert headers["etag"].startswith('"') and headers["etag"].endswith('"') and not headers["etag"].startswith("W/")
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["content-security-policy"] == "script-src 'none'; frame-src 'none'; sandbox;"
    assert headers["access-control-allow-origin"] == "*"
    assert headers["cross-origin-resource-policy"] == "cross-origin"
    assert headers["timing-allow-origin"] == "*"
    assert headers["content-disposition"].startswith('inline; filename="')
    assert headers["x-cache"] in {"hit", "miss"}


@pytest.mark.parametrize(
    ("query", "media_type", "loader"),
    [
        ("w=256&fmt=webp", "image/webp", "webpload_buffer"),
        ("w=256&fmt=avif", "image/avif", "heifload_buffer"),
        ("w=256&fmt=png", "image/png", "pngload_buffer"),
        ("w=256&fmt=jpeg&q=60", "image/jpeg", "jpegload_buffer"),
        ("w=256&fmt=gif", "image/gif", "gifload_buffer"),
        ("w=256", "image/jpeg", "jpegload_buffer"),
    ],
)
async def test_explicit_formats_have_exact_headers_and_no_vary(
    client: httpx.AsyncClient, query: str, media_type: str, loader: str
) -> None:
    image_id = await upload(client, FLICKR)
    response = await client.get(f"/img/{image_id}?{query}", headers={"Accept": CHROME_ACCEPT})
    assert response.status_code == 200
    assert_image_headers(response, media_type)
    assert "vary" not in response.headers
    assert decoded(response).get("vips-loader") == loader
    assert decoded(response).width == 256
    extension = {"image/jpeg": "jpg"}.get(media_type, media_type.removeprefix("image/"))
    assert response.headers["content-disposition"] == f'inline; filename="{image_id}.{extension}"'


@pytest.mark.parametrize(
    ("path", "accept", "media_type"),
    [
        (FLICKR, CHROME_ACCEPT, "image/avif"),
        (FLICKR, FIREFOX_ACCEPT, "image/avif"),
        (FLICKR, OLD_SAFARI_ACCEPT, "image/webp"),
        (FLICKR, CURL_ACCEPT, "image/jpeg"),
        (FLICKR, "image/avif;q=0, image/webp", "image/webp"),
        (PNG_ALPHA, CURL_ACCEPT, "image/png"),
        (PNG_ALPHA, OLD_SAFARI_ACCEPT, "image/webp"),
        (GIF_ANIMATED, CHROME_ACCEPT, "image/webp"),
        (GIF_ANIMATED, CURL_ACCEPT, "image/gif"),
    ],
)
async def test_fmt_auto_negotiates_from_accept_and_varies(
    client: httpx.AsyncClient, path: Path, accept: str, media_type: str
) -> None:
    image_id = await upload(client, path)
    response = await client.get(f"/img/{image_id}?w=128&fmt=auto", headers={"Accept": accept})
    assert response.status_code == 200
    assert response.headers["content-type"] == media_type
    assert response.headers["vary"] == "Accept"
    not_modified = await client.get(
        f"/img/{image_id}?w=128&fmt=auto", headers={"Accept": accept, "If-None-Match": response.headers["etag"]}
    )
    assert not_modified.status_code == 304
    assert not_modified.headers["vary"] == "Accept"


async def test_browsers_whose_accept_normalises_alike_share_one_variant(client: httpx.AsyncClient) -> None:
    image_id = await upload(client, FLICKR)
    chrome = await client.get(f"/img/{image_id}?w=200&fmt=auto", headers={"Accept": CHROME_ACCEPT})
    firefox = await client.get(f"/img/{image_id}?w=200&fmt=auto", headers={"Accept": FIREFOX_ACCEPT})
    assert (chrome.headers["x-cache"], firefox.headers["x-cache"]) == ("miss", "hit")
    assert chrome.headers["etag"] == firefox.headers["etag"] and chrome.content == firefox.content


async def test_equivalent_queries_share_one_cache_entry_and_etag(client: httpx.AsyncClient) -> None:
    image_id = await upload(client, FLICKR)
    spellings = ["w=256", "p=medium", "w=256&fit=inside&g=center", "dpr=2&w=128", "w=256&v=2", "bg=FFF&w=256"]
    responses = [await client.get(f"/img/{image_id}?{query}") for query in spellings]
    assert [r.headers["x-cache"] for r in responses] == ["miss"] + ["hit"] * (len(spellings) - 1)
    assert len({r.headers["etag"] for r in responses}) == 1
    assert renders(client) == 1


async def test_if_none_match_answers_304_without_storage_or_libvips(client: httpx.AsyncClient, tmp_path: Path) -> None:
    image_id = await upload(client, PHOTO)
    first = await client.get(f"/img/{image_id}?w=640&fmt=webp")
    etag = first.headers["etag"]
    for blob in (tmp_path / "blobs").rglob("*"):
        if blob.is_file():
            blob.unlink()  # the original is gone: only a 304 that never reads it can still succeed
    services = client.services  # type: ignore[attr-defined]
    for cache in (services.renderer.variants, services.renderer.originals, services.renderer.decoded):
        cache.clear()
    for if_none_match in (etag, f'"nope", {etag}', f"W/{etag}", "*"):
        response = await client.get(f"/img/{image_id}?w=640&fmt=webp", headers={"If-None-Match": if_none_match})
        assert response.status_code == 304, if_none_match
        assert response.content == b""
        assert response.headers["etag"] == etag
        assert response.headers["cache-control"] == first.headers["cache-control"]
        assert "content-type" not in response.headers
    assert renders(client) == 1
    stale = await client.get(f"/img/{image_id}?w=640&fmt=webp", headers={"If-None-Match": '"other"'})
    assert stale.status_code == 500  # a real read now, and the blob is missing: a server fault, not cacheable
    assert (stale.json()["type"], stale.headers["cache-control"]) == ("/problems/original-unavailable", "no-store")


async def test_etag_differs_per_variant_and_is_stable(client: httpx.AsyncClient) -> None:
    image_id = await upload(client, FLICKR)
    etags = {q: (await client.get(f"/img/{image_id}?{q}")).headers["etag"] for q in ("w=64", "w=96", "w=64&fmt=png")}
    assert len(set(etags.values())) == 3
    assert (await client.get(f"/img/{image_id}?w=64")).headers["etag"] == etags["w=64"]


async def test_head_has_the_get_headers_and_no_body(client: httpx.AsyncClient) -> None:
    image_id = await upload(client, FLICKR)
    get = await client.get(f"/img/{image_id}?w=300&fmt=webp")
    head = await client.head(f"/img/{image_id}?w=300&fmt=webp")
    assert head.status_code == 200 and head.content == b""
    for name in ("content-type", "content-length", "etag", "cache-control", "access-control-allow-origin"):
        assert head.headers[name] == get.headers[name], name
    head_304 = await client.head(f"/img/{image_id}?w=300&fmt=webp", headers={"If-None-Match": get.headers["etag"]})
    assert head_304.status_code == 304


@pytest.mark.parametrize(
    ("query", "param"),
    [("w=abc", "w"), ("w=1&w=2", "w"), ("foo=1", "foo"), ("fmt=jpg", "fmt"), ("w=99999", "w"), ("q=0", "q")],
)
async def test_bad_render_queries_are_cacheable_400_problems(client: httpx.AsyncClient, query: str, param: str) -> None:
    image_id = await upload(client, FLICKR)
    response = await client.get(f"/img/{image_id}?{query}")
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["param"] == param
    assert response.headers["cache-control"] == "public, max-age=60"
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_render_404_is_cacheable_and_api_errors_are_not(client: httpx.AsyncClient) -> None:
    missing = await client.get("/img/AAAAAAAAAAAAAAAAAAAAAA?w=64")
    assert (missing.status_code, missing.headers["cache-control"]) == (404, "public, max-age=60")
    api_missing = await client.get("/images/AAAAAAAAAAAAAAAAAAAAAA")
    assert (api_missing.status_code, api_missing.headers["cache-control"]) == (404, "no-store")
    too_big = await client.post("/images", content=b"x", headers={"Content-Type": "image/png", "Content-Length": "1"})
    assert too_big.headers["cache-control"] == "no-store"


async def test_animation_survives_when_the_output_can_animate(client: httpx.AsyncClient) -> None:
    for path in (GIF_ANIMATED, WEBP_ANIMATED):
        image_id = await upload(client, path)
        for fmt, frames in (("webp", 10), ("gif", 10), ("png", 1), ("jpeg", 1)):
            response = await client.get(f"/img/{image_id}?w=185&fmt={fmt}")
            assert response.status_code == 200
            out = decoded(response)
            pages = out.get("n-pages") if out.get_typeof("n-pages") else 1
            assert (pages, out.width) == (frames, 185), (path.name, fmt)


async def test_output_has_no_metadata(client: httpx.AsyncClient) -> None:
    exif_jpeg = pyvips.Image.new_from_file(str(FLICKR)).copy()
    exif_jpeg.set_type(pyvips.GValue.gstr_type, "exif-ifd2-UserComment", "secret location")
    data = exif_jpeg.jpegsave_buffer(keep="all")
    response = await client.post("/images", content=data, headers={"Content-Type": "image/jpeg"})
    image_id = response.json()["id"]
    for fmt in ("jpeg", "webp", "png", "avif"):
        out = await client.get(f"/img/{image_id}?w=64&fmt={fmt}")
        fields = decoded(out).get_fields()
        assert not {"exif-data", "xmp-data", "iptc-data"} & set(fields), fmt
        assert b"Exif" not in out.content and b"secret location" not in out.content


async def test_variant_lru_is_bounded_in_bytes_and_delete_evicts(settings) -> None:
    async with app_client(with_settings(settings, cache_bytes=20_000)) as client:
        renderer = client.services.renderer  # type: ignore[attr-defined]
        image_id = await upload(client, FLICKR)
        for width in (64, 96, 128, 256, 384):
            assert (await client.get(f"/img/{image_id}?w={width}&fmt=webp")).status_code == 200
            assert renderer.variants.current_bytes <= 20_000
        assert 0 < len(renderer.variants) < 5
        assert (await client.get(f"/img/{image_id}?w=384&fmt=webp")).headers["x-cache"] == "hit"
        assert (await client.get(f"/img/{image_id}?w=64&fmt=webp")).headers["x-cache"] == "miss"
        assert len(renderer.decoded) == 3  # the JPEG decoded at 1/8 (64-128 px), 1/4 (256) and 1/2 (384)
        assert (await client.delete(f"/images/{image_id}")).status_code == 204
        assert len(renderer.variants) == 0 and len(renderer.originals) == 0 and len(renderer.decoded) == 0
        assert (await client.get(f"/img/{image_id}?w=384&fmt=webp")).status_code == 404


async def test_cache_bytes_zero_disables_the_lru(settings) -> None:
    async with app_client(with_settings(settings, cache_bytes=0)) as client:
        image_id = await upload(client, FLICKR)
        statuses = [(await client.get(f"/img/{image_id}?w=64")).headers["x-cache"] for _ in range(3)]
        assert statuses == ["miss"] * 3
        assert renders(client) == 3


async def test_fifty_identical_concurrent_misses_render_once(client: httpx.AsyncClient) -> None:
    image_id = await upload(client, PHOTO)
    responses = await asyncio.gather(*(client.get(f"/img/{image_id}?w=512&fmt=webp") for _ in range(50)))
    assert {r.status_code for r in responses} == {200}
    assert len({r.content for r in responses}) == 1
    assert renders(client) == 1


async def test_a_cancelled_waiter_does_not_cancel_the_shared_render(client: httpx.AsyncClient) -> None:
    image_id = await upload(client, PHOTO)
    impatient = asyncio.create_task(client.get(f"/img/{image_id}?w=700"))
    await asyncio.sleep(0.005)
    patient = asyncio.create_task(client.get(f"/img/{image_id}?w=700"))
    await asyncio.sleep(0.005)
    impatient.cancel()
    response = await patient
    assert response.status_code == 200 and decoded(response).width == 700
    assert renders(client) == 1


async def test_a_burst_of_sizes_reads_the_original_once(client: httpx.AsyncClient) -> None:
    image_id = await upload(client, PHOTO)
    services = client.services  # type: ignore[attr-defined]
    services.renderer.originals.clear()
    reads = 0
    real_get = services.store.get

    async def counting_get(key: str, max_bytes: int) -> bytes:
        nonlocal reads
        reads += key.startswith("sha256/")  # the original (small sizes look for a pyramid level first)
        return await real_get(key, max_bytes)

    services.store.get = counting_get
    responses = await asyncio.gather(*(client.get(f"/img/{image_id}?w={w}") for w in (64, 128, 256, 384, 640)))
    assert {r.status_code for r in responses} == {200}
    assert reads == 1


async def test_a_full_render_queue_answers_503_with_retry_after(settings) -> None:
    async with app_client(with_settings(settings, workers=1, render_queue=1)) as client:
        image_id = await upload(client, PHOTO)
        responses = await asyncio.gather(*(client.get(f"/img/{image_id}?w={w}&fmt=avif") for w in (300, 301, 302, 303)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses[:2] == [200, 200] and set(statuses[2:]) == {503}
        refused = next(r for r in responses if r.status_code == 503)
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["cache-control"] == "no-store"
        assert refused.json()["type"] == "/problems/overloaded"
        assert (await client.get(f"/img/{image_id}?w=300&fmt=avif")).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/livez", 200),
        ("GET", "/readyz", 200),
        ("GET", "/images", 200),
        ("GET", "/images/{id}", 200),
        ("GET", "/images/{id}/original", 200),
        ("GET", "/img/{id}?w=64", 200),
        ("HEAD", "/img/{id}?w=64", 200),
        ("GET", "/img/{id}?w=0", 400),
        ("GET", "/img/AAAAAAAAAAAAAAAAAAAAAA", 404),
        ("GET", "/images/AAAAAAAAAAAAAAAAAAAAAA", 404),
        ("GET", "/nowhere", 404),
        ("PUT", "/img/{id}", 405),
        ("POST", "/images", 415),
        ("DELETE", "/images/{id}", 204),
    ],
)
async def test_every_route_and_status_carries_nosniff_request_id_and_cache_control(
    client: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    image_id = await upload(client, GIF_ANIMATED)
    response = await client.request(method, path.replace("{id}", image_id))
    assert response.status_code == status
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-request-id"]
    assert response.headers["cache-control"]
    if status >= 400:
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == status
