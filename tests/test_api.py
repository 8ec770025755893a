"""The HTTP API in-process (httpx ASGI transport) against a real Postgres and filesystem store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import pyvips

from tests.conftest import FLICKR, GIF_ANIMATED, IMAGES, PHOTO, PNG_ALPHA, WEBP_ANIMATED, app_client, with_settings

EXPECTED = {
    "photo-4000x3000.jpg": ("jpeg", 4000, 3000, 1, False),
    "2569067123_aca715a2ee_o.jpg": ("jpeg", 2725, 2225, 1, False),
    "alpha-premultiply-2048x1536-paper.png": ("png", 2048, 1536, 1, True),
    "animated-loop-3.gif": ("gif", 370, 285, 10, False),
    "animated-loop-3.webp": ("webp", 370, 285, 10, True),
}


def decode(data: bytes) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(data, "")


async def upload(client: httpx.AsyncClient, path: Path, **params: str) -> httpx.Response:
    headers = {"Content-Type": "image/jpeg"}  # deliberately the same for every format: the bytes decide
    return await client.post("/images", content=path.read_bytes(), headers=headers, params=params)


def assert_problem(response: httpx.Response, status: int, slug: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == f"/problems/{slug}"
    assert body["status"] == status
    assert body["detail"]
    assert "Traceback" not in response.text
    if param is not None:
        assert body["param"] == param
    return body


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_upload_every_corpus_image_raw(client: httpx.AsyncClient, name: str) -> None:
    fmt, width, height, frames, alpha = EXPECTED[name]
    response = await upload(client, IMAGES / name, category="gig")
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["format"], body["width"], body["height"], body["frames"], body["has_alpha"]) == (
        fmt, width, height, frames, alpha
    )  # fmt: skip
    assert body["bytes"] == (IMAGES / name).stat().st_size
    assert len(body["id"]) == 22
    assert body["category"] == "gig" and body["visibility"] == "public"
    assert body["urls"]["render"] == f"http://testserver/img/{body['id']}"
    assert response.headers["location"] == body["urls"]["self"]
    assert "?w=256 256w" in body["srcset"]
    assert (await client.get(f"/images/{body['id']}")).json() == body


async def test_upload_multipart_with_fields(client: httpx.AsyncClient) -> None:
    files = {"file": ("../../etc/My\u202e Photo.png", PNG_ALPHA.read_bytes(), "image/png")}
    response = await client.post("/images", files=files, data={"category": "logo", "visibility": "private"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["format"], body["category"], body["visibility"]) == ("png", "logo", "private")
    assert body["original_filename"] == "My Photo.png"


async def test_every_upload_is_its_own_image_and_identical_bytes_share_one_blob(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    responses = await asyncio.gather(*(upload(client, FLICKR, category=f"gig-{i}") for i in range(8)))
    assert [r.status_code for r in responses] == [201] * 8
    assert len({r.json()["id"] for r in responses}) == 8
    assert sorted(r.json()["category"] for r in responses) == [f"gig-{i}" for i in range(8)]
    listing = (await client.get("/images")).json()
    assert len(listing["items"]) == 8
    blobs = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
    assert [p.name for p in blobs] == [responses[0].json()["sha256"]]


async def test_upload_over_the_byte_cap_is_413_by_content_length_and_while_streaming(settings) -> None:
    async with app_client(with_settings(settings, max_upload_bytes=100_000)) as client:
        declared = await client.post("/images", content=FLICKR.read_bytes(), headers={"Content-Type": "image/jpeg"})
        assert_problem(declared, 413, "payload-too-large")

        async def chunks():
            data = FLICKR.read_bytes()
            for i in range(0, len(data), 16_384):
                yield data[i : i + 16_384]

        streamed = await client.post("/images", content=chunks(), headers={"Content-Type": "image/jpeg"})
        assert_problem(streamed, 413, "payload-too-large")
        multipart = await client.post("/images", files={"file": ("a.jpg", FLICKR.read_bytes(), "image/jpeg")})
        assert_problem(multipart, 413, "payload-too-large")
        assert (await client.get("/images")).json()["items"] == []


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>", "image/svg+xml"),
        (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "image/jpeg"),
        (b"<html><body>hello</body></html>", "image/png"),
        (b"GIF", "image/gif"),
    ],
)
async def test_not_an_allowed_format_is_415(client: httpx.AsyncClient, content: bytes, content_type: str) -> None:
    response = await client.post("/images", content=content, headers={"Content-Type": content_type})
    assert_problem(response, 415, "unsupported-format")


async def test_non_image_content_type_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post("/images", content=FLICKR.read_bytes(), headers={"Content-Type": "text/plain"})
    assert_problem(response, 415, "unsupported-format")


async def test_truncated_image_is_422(client: httpx.AsyncClient) -> None:
    data = FLICKR.read_bytes()[:200_000]
    response = await client.post("/images", content=data, headers={"Content-Type": "image/jpeg"})
    assert_problem(response, 422, "undecodable-image")


async def test_image_over_the_pixel_limit_is_422(settings) -> None:
    async with app_client(with_settings(settings, max_pixels=10_000_000)) as client:
        response = await upload(client, PHOTO)
        assert_problem(response, 422, "image-too-large")
        assert (await upload(client, FLICKR)).status_code == 201


async def test_bad_upload_fields_are_400(client: httpx.AsyncClient) -> None:
    bad_visibility = await upload(client, FLICKR, visibility="secret")
    assert_problem(bad_visibility, 400, "invalid-parameter", "visibility")
    unknown = await upload(client, FLICKR, colour="red")
    assert_problem(unknown, 400, "invalid-parameter", "colour")
    no_file = await client.post("/images", files={"other": ("a.jpg", b"xx", "image/jpeg")})
    assert_problem(no_file, 400, "invalid-parameter", "file")


async def test_list_is_newest_first_with_keyset_pagination_and_category_filter(client: httpx.AsyncClient) -> None:
    ids = []
    for name, category in [(FLICKR, "a"), (PHOTO, "b"), (PNG_ALPHA, "a"), (GIF_ANIMATED, "a"), (WEBP_ANIMATED, "b")]:
        ids.append((await upload(client, name, category=category)).json()["id"])
    seen, cursor = [], None
    while True:
        params = {"owner": "me", "limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/images", params=params)).json()
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    only_a = (await client.get("/images", params={"category": "a"})).json()["items"]
    assert [item["id"] for item in only_a] == [ids[3], ids[2], ids[0]]
    assert_problem(await client.get("/images", params={"limit": "0"}), 400, "invalid-parameter", "limit")
    assert_problem(await client.get("/images", params={"cursor": "garbage!"}), 400, "invalid-parameter", "cursor")
    assert_problem(await client.get("/images", params={"sort": "x"}), 400, "invalid-parameter", "sort")


async def test_original_is_the_exact_bytes_as_an_attachment(client: httpx.AsyncClient) -> None:
    image = (await upload(client, PHOTO)).json()
    response = await client.get(f"/images/{image['id']}/original")
    assert response.status_code == 200
    assert response.content == PHOTO.read_bytes()
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["content-disposition"].startswith("attachment;")
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_render_256_wide_jpeg(client: httpx.AsyncClient) -> None:
    image = (await upload(client, PHOTO)).json()
    response = await client.get(f"/img/{image['id']}", params={"w": "256"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    out = decode(response.content)
    assert (out.width, out.height) == (256, 192)
    assert out.get("vips-loader") == "jpegload_buffer"
    head = await client.head(f"/img/{image['id']}", params={"w": "256"})
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(response.content))


async def test_delete_makes_the_image_404_everywhere(client: httpx.AsyncClient) -> None:
    image = (await upload(client, FLICKR)).json()
    assert (await client.get(f"/img/{image['id']}", params={"w": "256"})).status_code == 200
    assert (await client.delete(f"/images/{image['id']}")).status_code == 204
    for path in (f"/images/{image['id']}", f"/images/{image['id']}/original", f"/img/{image['id']}?w=256"):
        assert_problem(await client.get(path), 404, "not-found")
    assert_problem(await client.delete(f"/images/{image['id']}"), 404, "not-found")
    assert (await client.get("/images")).json()["items"] == []
    again = await upload(client, FLICKR)
    assert again.status_code == 201 and again.json()["id"] != image["id"]


@pytest.mark.parametrize("path", ["/images/../../etc/passwd", "/images/%2e%2e%2fsecret", "/img/nope", "/images/x" * 3])
async def test_unknown_and_hostile_ids_are_404_problems(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


async def test_health_endpoints(client: httpx.AsyncClient) -> None:
    assert (await client.get("/livez")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "storage": "ok"}


async def test_request_id_is_echoed_or_generated(client: httpx.AsyncClient) -> None:
    assert (await client.get("/livez", headers={"X-Request-ID": "abc-123"})).headers["x-request-id"] == "abc-123"
    assert len((await client.get("/livez")).headers["x-request-id"]) == 32


async def test_wrong_method_is_405_problem(client: httpx.AsyncClient) -> None:
    response = await client.put("/images")
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/problem+json"


async def test_the_postgres_blob_store_serves_uploads_and_renders(settings) -> None:
    async with app_client(with_settings(settings, storage_url="postgres:")) as client:
        created = await upload(client, PNG_ALPHA)
        assert created.status_code == 201
        image_id = created.json()["id"]
        original = await client.get(f"/images/{image_id}/original")
        assert original.content == PNG_ALPHA.read_bytes()
        rendered = await client.get(f"/img/{image_id}", params={"w": "64", "fmt": "webp"})
        assert decode(rendered.content).width == 64
        assert (await client.get("/readyz")).json()["checks"]["storage"] == "ok"
