"""Remembered hits: a repeated anonymous request for a public variant is answered before routing, with the
same status, headers and bytes as the full path, and never for what the full path would refuse."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from imgsvc.client import RenderUrls
from imgsvc.errors import OriginalUnavailable
from imgsvc.hits import HitIndex
from imgsvc.render import Renderer
from imgsvc.spec import parse_query
from tests.conftest import FLICKR, PHOTO, app_client, with_settings

K1 = ("k1", "0123456789abcdef0123456789abcdef")


async def _upload(client: httpx.AsyncClient, path: Path = FLICKR, **params: str) -> str:
    response = await client.post(
        "/images", params=params, content=path.read_bytes(), headers={"Content-Type": "image/jpeg"}
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _renderer(client: httpx.AsyncClient) -> Renderer:
    return client.services.renderer  # type: ignore[attr-defined,no-any-return]


def _hits(client: httpx.AsyncClient) -> HitIndex:
    return client.services.hits  # type: ignore[attr-defined,no-any-return]


def _without_request_id(response: httpx.Response) -> list[tuple[str, str]]:
    return sorted((k, v) for k, v in response.headers.multi_items() if k != "x-request-id")


def _break_full_path(renderer: Renderer, monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, only a remembered answer can be a 200."""

    async def broken(*args: object, **kwargs: object) -> None:
        raise OriginalUnavailable("the full path was taken")

    monkeypatch.setattr(renderer, "render", broken)


async def test_a_repeat_is_answered_as_the_full_path_would(client: httpx.AsyncClient, monkeypatch) -> None:
    image_id = await _upload(client)
    url = f"/img/{image_id}?w=96&fmt=webp"
    first = await client.get(url)
    full_hit = await client.get(url, headers={"Range": "bytes=0-9"})  # a range: the full path (which ignores it)
    assert (first.headers["x-cache"], full_hit.headers["x-cache"]) == ("miss", "hit")
    _break_full_path(_renderer(client), monkeypatch)
    remembered = await client.get(url, headers={"X-Request-ID": "abc-123"})
    assert remembered.status_code == 200
    assert remembered.content == first.content
    assert _without_request_id(remembered) == _without_request_id(full_hit)
    assert remembered.headers["x-request-id"] == "abc-123"
    assert remembered.headers["x-content-type-options"] == "nosniff"
    head = await client.head(url)
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-length"] == str(len(first.content))


async def test_accept_negotiated_variants_are_remembered_per_accept(client: httpx.AsyncClient, monkeypatch) -> None:
    image_id = await _upload(client)
    url = f"/img/{image_id}?w=64&fmt=auto"
    webp, jpeg = {"Accept": "image/webp,*/*"}, {"Accept": "image/png,*/*"}
    for headers in (webp, jpeg):
        assert (await client.get(url, headers=headers)).status_code == 200
    _break_full_path(_renderer(client), monkeypatch)
    assert (await client.get(url, headers=webp)).headers["content-type"] == "image/webp"
    assert (await client.get(url, headers=jpeg)).headers["content-type"] == "image/jpeg"
    assert (await client.get(url, headers={"Accept": "image/avif"})).status_code == 500  # never seen: full path


async def test_a_delete_is_not_outlived(client: httpx.AsyncClient) -> None:
    image_id = await _upload(client)
    url = f"/img/{image_id}?w=64&fmt=webp"
    assert (await client.get(url)).status_code == 200
    assert len(_hits(client)) == 1
    assert (await client.delete(f"/images/{image_id}")).status_code == 204
    assert len(_hits(client)) == 0
    assert (await client.get(url)).status_code == 404


async def test_credentials_and_ranges_take_the_full_path(client: httpx.AsyncClient, monkeypatch) -> None:
    image_id = await _upload(client)
    url = f"/img/{image_id}?w=64&fmt=webp"
    assert (await client.get(url)).status_code == 200
    _break_full_path(_renderer(client), monkeypatch)
    for headers in ({"Authorization": "Bearer x"}, {"Range": "bytes=0-9"}):
        assert (await client.get(url, headers=headers)).status_code == 500, headers
    assert (await client.get(url)).status_code == 200


async def test_a_revalidation_is_answered_304_as_the_full_path_would(client: httpx.AsyncClient, monkeypatch) -> None:
    """How nginx revalidates its entries every second: If-None-Match with the ETag it holds."""
    image_id = await _upload(client)
    url = f"/img/{image_id}?w=64&fmt=webp"
    etag = (await client.get(url, headers={"Range": "bytes=0-9"})).headers["etag"]  # full path, not remembered
    full = await client.get(url, headers={"If-None-Match": etag, "Range": "bytes=0-9"})  # the full path's 304
    assert (await client.get(url)).status_code == 200  # remembered now
    _break_full_path(_renderer(client), monkeypatch)
    _renderer(client).variants.clear()  # a 304 needs no bytes, on either path
    for validator in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        remembered = await client.get(url, headers={"If-None-Match": validator})
        assert (remembered.status_code, remembered.content) == (304, b""), validator
        assert _without_request_id(remembered) == _without_request_id(full)
    other = await client.get(url, headers={"If-None-Match": '"other"'})  # not current: needs the bytes
    assert other.status_code == 500  # ... which were evicted, so the (broken) full path answers
    monkeypatch.undo()
    assert (await client.delete(f"/images/{image_id}")).status_code == 204
    assert (await client.get(url, headers={"If-None-Match": etag})).status_code == 404  # never outlives a delete


async def test_private_and_expiring_renders_are_never_remembered(settings) -> None:
    async with app_client(with_settings(settings, signing_keys=(K1,))) as client:
        private = await _upload(client, PHOTO, visibility="private")
        public = await _upload(client)
        urls = RenderUrls("http://testserver", [K1])
        assert (await client.get(urls.url(private, w=64, expires_in=600))).status_code == 200
        assert (await client.get(urls.url(public, w=64, expires_in=600))).status_code == 200
        assert (await client.get(f"/img/{private}?w=64")).status_code == 200  # IMGSVC_AUTH=none: anyone's
        assert len(_hits(client)) == 0
        assert (await client.get(urls.url(public, w=64))).status_code == 200  # signed, no exp: cacheable forever
        assert len(_hits(client)) == 1


async def test_only_while_deletes_arrive_and_for_the_record_ttl(client: httpx.AsyncClient, monkeypatch) -> None:
    renderer = _renderer(client)
    image_id = await _upload(client)
    url = f"/img/{image_id}?w=64&fmt=webp"
    assert (await client.get(url)).status_code == 200
    _break_full_path(renderer, monkeypatch)
    renderer.records.trusted = False  # the delete listener is down
    assert (await client.get(url)).status_code == 500
    renderer.trust_records(True)  # back: whatever was remembered may have missed a delete
    assert len(_hits(client)) == 0


async def test_a_remembered_request_expires_after_the_record_ttl(client: httpx.AsyncClient, monkeypatch) -> None:
    renderer = _renderer(client)
    renderer.records.ttl = 0.0
    image_id = await _upload(client)
    url = f"/img/{image_id}?w=64&fmt=webp"
    assert (await client.get(url)).status_code == 200
    _break_full_path(renderer, monkeypatch)
    assert (await client.get(url)).status_code == 500


async def test_an_evicted_variant_is_rendered_again(settings) -> None:
    async with app_client(with_settings(settings, cache_bytes=2_000)) as client:
        image_id = await _upload(client)
        small, other = f"/img/{image_id}?w=64&fmt=webp", f"/img/{image_id}?w=72&fmt=webp"
        first = await client.get(small)
        second = await client.get(other)  # pushes the first out of a 2 kB LRU
        assert len(first.content) + len(second.content) > 2_000 > len(second.content)
        again = await client.get(small)
        assert (again.status_code, again.headers["x-cache"], again.content) == (200, "miss", first.content)


async def test_accept_is_remembered_by_its_token_and_the_first_header_counts(client: httpx.AsyncClient,
                                                                            monkeypatch) -> None:  # fmt: skip
    image_id = await _upload(client)
    url = f"/img/{image_id}?w=64&fmt=auto"
    renderer = _renderer(client)
    for accept in ("image/avif,image/webp,*/*", "image/avif;q=0.9, */*;q=0.8", "IMAGE/AVIF"):
        assert (await client.get(url, headers={"Accept": accept})).headers["content-type"] == "image/avif"
    assert len(_hits(client)) == 1  # one entry per token, however the browser spells it
    _break_full_path(renderer, monkeypatch)
    assert (await client.get(url, headers={"Accept": "image/avif"})).headers["content-type"] == "image/avif"
    two = [("Accept", "image/png"), ("Accept", "image/avif")]  # the full path reads the first
    assert (await client.get(url, headers=two)).status_code == 500  # legacy was never remembered


async def test_what_a_lookup_before_a_listener_outage_or_long_ago_rendered_is_not_remembered(
    client: httpx.AsyncClient,
) -> None:
    renderer = _renderer(client)
    image_id = await _upload(client)
    query = parse_query([("w", "64"), ("fmt", "webp")])
    hits = _hits(client)
    result = await renderer.render(image_id, query, accept=None, principal=None, if_none_match=None)
    headers = [(b"content-type", b"image/webp")]
    renderer.trust_records(False)
    renderer.trust_records(True)  # the listener reconnected after the lookup: a delete may have been missed
    hits.store(("/img/x", b"", "legacy"), image_id, result.variant_key, result.stamp, result.etag, headers, headers)
    assert len(hits) == 0
    again = await renderer.render(image_id, query, accept=None, principal=None, if_none_match=None)
    stale = replace(again.stamp, looked_up=again.stamp.looked_up - renderer.records.ttl)
    hits.store(("/img/x", b"", "legacy"), image_id, again.variant_key, stale, again.etag, headers, headers)
    assert len(hits) == 0  # looked up longer ago than a record is trusted
    hits.store(("/img/x", b"", "legacy"), image_id, again.variant_key, again.stamp, again.etag, headers, headers)
    assert len(hits) == 1
