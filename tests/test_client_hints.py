"""Client hints, opt-in per URL: `w=auto` / `dpr=auto` take Sec-CH-Width / Sec-CH-DPR, `Save-Data: on` lowers
their quality; URLs without `auto` answer exactly as without hints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import pyvips

from imgsvc.signing import Keyring, signed_query
from imgsvc.spec import parse_query
from tests.conftest import PHOTO, ServerProcess, app_client, with_settings
from tests.nginx_process import NginxProcess

StartNginx = Callable[..., NginxProcess]

PER_REQUEST = {"x-request-id", "x-cache", "date"}
HINTS = {"Sec-CH-Width": "300", "Sec-CH-DPR": "2", "Save-Data": "on"}
KEY = ("k1", "k1-secret-0123456789abcdef0123456789")


async def upload(client: httpx.AsyncClient, data: bytes) -> str:
    response = await client.post("/images", content=data, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def size(response: httpx.Response) -> tuple[int, int]:
    assert response.status_code == 200, response.text
    image = pyvips.Image.new_from_buffer(response.content, "")
    return image.width, image.height


def stable(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k not in PER_REQUEST}


@pytest.mark.parametrize("query", ["w=256", "w=128&dpr=2", "p=medium", "fmt=auto&w=640", "w=64&h=64&fit=cover"])
async def test_urls_without_auto_ignore_the_hints(client: httpx.AsyncClient, query: str) -> None:
    image_id = await upload(client, PHOTO.read_bytes())
    accept = {"Accept": "image/avif,image/webp,*/*"}
    plain = await client.get(f"/img/{image_id}?{query}", headers=accept)
    hinted = await client.get(f"/img/{image_id}?{query}", headers=accept | HINTS)
    assert plain.status_code == hinted.status_code == 200
    assert hinted.content == plain.content and stable(hinted) == stable(plain)
    assert "accept-ch" not in plain.headers
    assert plain.headers.get("vary") == ("Accept" if "fmt=auto" in query else None)


@pytest.mark.parametrize(
    ("hint", "width"),
    [("300", 384), ("256", 256), ("1", 16), ("5000", 3840), (None, 1080), ("garbage", 1080), ("-5", 1080)],
)
async def test_w_auto_snaps_the_width_hint_up_to_the_allowed_widths(
    client: httpx.AsyncClient, hint: str | None, width: int
) -> None:
    image_id = await upload(client, PHOTO.read_bytes())
    headers = {"Sec-CH-Width": hint} if hint is not None else {}
    auto = await client.get(f"/img/{image_id}?w=auto&fmt=webp", headers=headers)
    assert size(auto)[0] == width
    explicit = await client.get(f"/img/{image_id}?w={width}&fmt=webp")
    assert auto.content == explicit.content and auto.headers["etag"] == explicit.headers["etag"]  # one entry
    assert auto.headers["vary"] == "Sec-CH-Width, Save-Data"
    assert auto.headers["accept-ch"] == "Sec-CH-Width, Sec-CH-DPR, Save-Data"
    assert auto.headers["cache-control"] == explicit.headers["cache-control"]


async def test_w_auto_is_clamped_to_the_original(client: httpx.AsyncClient) -> None:
    small = pyvips.Image.black(500, 300).write_to_buffer(".jpg")
    image_id = await upload(client, small)
    assert size(await client.get(f"/img/{image_id}?w=auto", headers={"Sec-CH-Width": "700"})) == (500, 300)
    assert size(await client.get(f"/img/{image_id}?w=auto", headers={"Sec-CH-Width": "300"})) == (384, 230)


@pytest.mark.parametrize(("hint", "width"), [("2", 200), ("1.2", 150), (None, 100), ("2.625", 300), ("9", 400)])
async def test_dpr_auto_multiplies_by_the_snapped_dpr_hint(
    client: httpx.AsyncClient, hint: str | None, width: int
) -> None:
    image_id = await upload(client, PHOTO.read_bytes())
    headers = {"Sec-CH-DPR": hint} if hint is not None else {}
    auto = await client.get(f"/img/{image_id}?w=100&dpr=auto&fmt=webp", headers=headers)
    assert size(auto)[0] == width
    assert auto.headers["vary"] == "Sec-CH-DPR, Save-Data"


async def test_save_data_lowers_the_quality_of_auto_urls_only(client: httpx.AsyncClient) -> None:
    image_id = await upload(client, PHOTO.read_bytes())
    width = {"Sec-CH-Width": "640"}
    full = await client.get(f"/img/{image_id}?w=auto&fmt=webp", headers=width)
    saving = await client.get(f"/img/{image_id}?w=auto&fmt=webp", headers=width | {"Save-Data": "on"})
    q60 = await client.get(f"/img/{image_id}?w=640&fmt=webp&q=60")  # webp's 80, one step (20) lower
    assert saving.content == q60.content and len(saving.content) < len(full.content)
    assert saving.headers["etag"] == q60.headers["etag"] != full.headers["etag"]
    plain = await client.get(f"/img/{image_id}?w=640&fmt=webp")
    plain_saving = await client.get(f"/img/{image_id}?w=640&fmt=webp", headers={"Save-Data": "on"})
    assert plain_saving.content == plain.content == full.content


async def test_auto_urls_vary_on_accept_and_hints_together(client: httpx.AsyncClient) -> None:
    image_id = await upload(client, PHOTO.read_bytes())
    answer = await client.get(
        f"/img/{image_id}?w=auto&fmt=auto", headers={"Accept": "image/webp", "Sec-CH-Width": "90"}
    )
    assert answer.headers["content-type"] == "image/webp" and size(answer)[0] == 96
    assert answer.headers["vary"] == "Accept, Sec-CH-Width, Save-Data"


async def test_a_remembered_answer_never_serves_another_hint(client: httpx.AsyncClient) -> None:
    image_id = await upload(client, PHOTO.read_bytes())
    widths = []
    for hint in ("300", "300", "700", "700", "300"):
        answer = await client.get(f"/img/{image_id}?w=auto", headers={"Sec-CH-Width": hint})
        widths.append(size(answer)[0])
    assert widths == [384, 384, 750, 750, 384]


@pytest.mark.parametrize(("query", "param"), [("w=auto&dpr=2", "dpr"), ("w=auto&dpr=auto", "dpr"), ("dpr=auto", "dpr")])
async def test_malformed_auto_queries_are_400(client: httpx.AsyncClient, query: str, param: str) -> None:
    image_id = await upload(client, PHOTO.read_bytes())
    answer = await client.get(f"/img/{image_id}?{query}")
    assert answer.status_code == 400 and answer.json()["param"] == param


async def test_w_auto_is_signed_and_the_hint_is_not(settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    async with app_client(with_settings(settings, signing_keys=(KEY,), require_signed=True)) as client:
        image_id = await upload(client, PHOTO.read_bytes())
        spec = parse_query([("w", "auto"), ("fmt", "webp")]).spec
        query = signed_query(Keyring.from_pairs([KEY]), image_id, spec)
        assert "w=auto" in query
        for hint, width in (("200", 256), ("1000", 1080)):
            answer = await client.get(f"/img/{image_id}?{query}", headers={"Sec-CH-Width": hint})
            assert size(answer)[0] == width
        explicit = signed_query(Keyring.from_pairs([KEY]), image_id, parse_query([("w", "256")]).spec)
        forged = query.replace("w=auto", "w=256")
        assert (await client.get(f"/img/{image_id}?{forged}")).status_code == 403
        assert (await client.get(f"/img/{image_id}?{explicit}")).status_code == 200


# ---- through nginx: the cache key has the normalised hint tokens, imgsvc sees only those ----------------


def test_nginx_keys_auto_urls_on_the_snapped_hints(server: ServerProcess, start_nginx: StartNginx) -> None:
    nginx = start_nginx(server.url.removeprefix("http://"), CACHE_VALID="10m")
    with httpx.Client(base_url=nginx.url, timeout=30) as http:
        created = http.post("/images", content=PHOTO.read_bytes(), headers={"Content-Type": "image/jpeg"})
        image_id = created.json()["id"]
        uri = f"/img/{image_id}?w=auto&fmt=webp"
        seen = []
        for hints in ({"Sec-CH-Width": "300"}, {"Sec-CH-Width": "310"}, {"Sec-CH-Width": "700"},
                      {"Sec-CH-Width": "640"}, {"Sec-CH-Width": "700", "Save-Data": "on"}, {}):  # fmt: skip
            answer = http.get(uri, headers=hints)
            seen.append((size(answer)[0], answer.headers["x-cache-status"], len(answer.content)))
        assert [(w, status) for w, status, _ in seen] == [
            (384, "MISS"), (384, "HIT"), (750, "MISS"), (640, "MISS"), (750, "MISS"), (1080, "MISS")
        ]  # fmt: skip
        assert seen[4][2] < seen[2][2]  # Save-Data: lower quality
        # URLs without auto: one entry whatever the hints, as before.
        plain = [http.get(f"/img/{image_id}?w=256", headers={"Sec-CH-Width": w}) for w in ("300", "700")]
        assert [a.headers["x-cache-status"] for a in plain] == ["MISS", "HIT"]
        # A spelling nginx does not read as auto reaches imgsvc without hints: its fallback, whatever was sent.
        spelled = [http.get(f"/img/{image_id}?w=%61uto", headers={"Sec-CH-Width": w}) for w in ("300", "700")]
        assert [size(a)[0] for a in spelled] == [1080, 1080]
        assert [a.headers["x-cache-status"] for a in spelled] == ["MISS", "HIT"]


def test_nginx_keys_dpr_auto_on_the_snapped_dpr(server: ServerProcess, start_nginx: StartNginx) -> None:
    nginx = start_nginx(server.url.removeprefix("http://"), CACHE_VALID="10m")
    with httpx.Client(base_url=nginx.url, timeout=30) as http:
        created = http.post("/images", content=PHOTO.read_bytes(), headers={"Content-Type": "image/jpeg"})
        uri = f"/img/{created.json()['id']}?w=64&dpr=auto"  # unsigned: w as given, times one of 5 DPRs
        seen = [http.get(uri, headers={"Sec-CH-DPR": dpr}) for dpr in ("2", "1.75", "2.625", "1")]
        assert [(size(a)[0], a.headers["x-cache-status"]) for a in seen] == [
            (128, "MISS"), (128, "HIT"), (192, "MISS"), (64, "MISS")
        ]  # fmt: skip
