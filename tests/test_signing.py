"""Signed render URLs: HMAC over the canonical spec, rotation by kid, expiry, the unsigned allow-list."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from imgsvc.auth import Principal
from imgsvc.catalog import ImageRecord
from imgsvc.client import RenderUrls
from imgsvc.errors import Forbidden, InvalidParameter, Unauthorized
from imgsvc.render import authorize_view
from imgsvc.signing import UNSIGNED, Grant, Keyring, UrlPolicy, verify
from imgsvc.spec import parse_query
from tests.conftest import FLICKR, app_client, with_settings

K1 = ("k1", "k1-secret-0123456789abcdef0123456789")
K2 = ("k2", "k2-secret-0123456789abcdef0123456789")
IMAGE = "AAAAAAAAAAAAAAAAAAAAAA"


def parsed(url: str):  # type: ignore[no-untyped-def]
    return parse_query(parse_qsl(urlsplit(url).query, keep_blank_values=True))


def grant_for(url: str, keys=(K1,), image_id: str = IMAGE, now: float | None = None) -> Grant:  # type: ignore[no-untyped-def]
    return verify(Keyring.from_pairs(keys), image_id, parsed(url), now)


def test_a_client_url_verifies_and_carries_the_canonical_query() -> None:
    url = RenderUrls("https://img.example.com/", [K1]).url(IMAGE, p="medium", fmt="webp")
    assert url.startswith(f"https://img.example.com/img/{IMAGE}?fmt=webp&w=256&kid=k1&s=")
    assert grant_for(url) == Grant(signed=True, expires=None)


def test_the_signature_survives_reordering_and_equivalent_spellings() -> None:
    url = RenderUrls("https://x", [K1]).url(IMAGE, w=128, dpr=2, fmt="webp")
    query = dict(parse_qsl(urlsplit(url).query))
    reordered = f"https://x/img/{IMAGE}?s={query['s']}&kid=k1&w=256&fit=inside&fmt=webp"
    assert grant_for(reordered).signed


@pytest.mark.parametrize(
    ("tamper", "param"),
    [
        (lambda q: q.replace("w=256", "w=384"), "s"),
        (lambda q: q.replace("fmt=webp", "fmt=png"), "s"),
        (lambda q: q + "&v=2", "s"),
        (lambda q: q.replace("kid=k1", "kid=k9"), "kid"),
        (lambda q: q[:-3] + ("AAA" if not q.endswith("AAA") else "BBB"), "s"),
    ],
)
def test_any_change_to_a_signed_url_is_refused(tamper, param: str) -> None:  # type: ignore[no-untyped-def]
    url = RenderUrls("https://x", [K1]).url(IMAGE, w=256, fmt="webp")
    base, query = url.split("?")
    with pytest.raises(Forbidden) as caught:
        grant_for(f"{base}?{tamper(query)}")
    assert caught.value.param == param


def test_a_signature_is_bound_to_its_image() -> None:
    url = RenderUrls("https://x", [K1]).url(IMAGE, w=256)
    with pytest.raises(Forbidden):
        grant_for(url, image_id="BBBBBBBBBBBBBBBBBBBBBB")


def test_a_repeated_signature_is_a_400_not_a_bypass() -> None:
    url = RenderUrls("https://x", [K1]).url(IMAGE, w=256)
    signature = dict(parse_qsl(urlsplit(url).query))["s"]
    with pytest.raises(InvalidParameter) as caught:
        parsed(f"{url}&s={signature}")
    assert caught.value.param == "s"


def test_expiry_is_signed_and_enforced() -> None:
    url = RenderUrls("https://x", [K1]).url(IMAGE, w=256, expires_in=60)
    exp = int(dict(parse_qsl(urlsplit(url).query))["exp"])
    assert abs(exp - (time.time() + 60)) < 5
    assert grant_for(url) == Grant(signed=True, expires=exp)
    with pytest.raises(Forbidden) as caught:
        grant_for(url, now=exp + 1)
    assert caught.value.param == "exp"
    with pytest.raises(Forbidden):
        grant_for(url.replace(f"exp={exp}", f"exp={exp + 3600}"))


def test_key_rotation_verifies_old_urls_until_the_key_is_removed() -> None:
    old = RenderUrls("https://x", [K1]).url(IMAGE, w=256)
    rotated = RenderUrls("https://x", [K2, K1])
    new = rotated.url(IMAGE, w=256)
    assert "kid=k2" in new
    assert grant_for(old, keys=(K2, K1)).signed and grant_for(new, keys=(K2, K1)).signed
    with pytest.raises(Forbidden):
        grant_for(old, keys=(K2,))


def test_kid_or_exp_without_a_signature_is_refused() -> None:
    with pytest.raises(Forbidden):
        grant_for(f"https://x/img/{IMAGE}?w=256&kid=k1")
    with pytest.raises(Forbidden):
        grant_for(f"https://x/img/{IMAGE}?w=256&exp=2000000000")
    assert grant_for(f"https://x/img/{IMAGE}?w=256") == UNSIGNED


def test_policy_allow_list_and_required_signatures() -> None:
    policy = UrlPolicy(Keyring.from_pairs([K1]), frozenset({64, 256}))
    assert policy.grant(IMAGE, parsed("https://x/?w=256")) == UNSIGNED
    assert policy.grant(IMAGE, parsed("https://x/?w=128&dpr=2")) == UNSIGNED
    for query, param in (("w=300", "w"), ("w=256&h=100", "h"), ("w=100&dpr=2", "w")):
        with pytest.raises(InvalidParameter) as caught:
            policy.grant(IMAGE, parsed(f"https://x/?{query}"))
        assert caught.value.param == param
    signed = RenderUrls("https://x", [K1]).url(IMAGE, w=300)
    assert policy.grant(IMAGE, parsed(signed)).signed
    strict = UrlPolicy(Keyring.from_pairs([K1]), None, require_signed=True)
    with pytest.raises(Forbidden):
        strict.grant(IMAGE, parsed("https://x/?w=256"))


def _record(visibility: str) -> ImageRecord:
    return ImageRecord(IMAGE, "0" * 64, "alice", "", visibility, "jpeg", 10, 10, 1, 1, False, None,  # type: ignore[arg-type]
                       datetime.now(UTC))  # fmt: skip


@pytest.mark.parametrize(
    ("visibility", "principal", "grant", "outcome"),
    [
        ("public", None, UNSIGNED, None),
        ("private", None, UNSIGNED, Unauthorized),
        ("private", None, Grant(True, None), Unauthorized),
        ("private", None, Grant(True, 2_000_000_000), None),
        ("private", Principal("alice", frozenset({"images:read"})), UNSIGNED, None),
        ("private", Principal("bob", frozenset({"images:read"})), UNSIGNED, Forbidden),
        ("private", Principal("root", frozenset({"images:admin"})), UNSIGNED, None),
    ],
)
def test_who_may_view_a_render(visibility: str, principal, grant: Grant, outcome) -> None:  # type: ignore[no-untyped-def]
    if outcome is None:
        authorize_view(_record(visibility), principal, grant)
    else:
        with pytest.raises(outcome):
            authorize_view(_record(visibility), principal, grant)


async def test_signed_and_unsigned_renders_over_http(settings, tmp_path: Path) -> None:
    configured = with_settings(settings, signing_keys=(K2, K1), unsigned_widths=(64, 256))
    async with app_client(configured) as client:
        created = await client.post("/images", content=FLICKR.read_bytes(), headers={"Content-Type": "image/jpeg"})
        image_id = created.json()["id"]
        urls = RenderUrls("http://testserver", [K2])
        assert (await client.get(f"/img/{image_id}?w=256")).status_code == 200
        assert (await client.get(f"/img/{image_id}?p=thumbnail")).status_code == 200
        refused = await client.get(f"/img/{image_id}?w=300")
        assert (refused.status_code, refused.json()["param"]) == (400, "w")
        assert refused.headers["cache-control"] == "public, max-age=60"
        signed = await client.get(urls.url(image_id, w=300, fmt="webp"))
        assert signed.status_code == 200 and signed.headers["content-type"] == "image/webp"
        assert signed.headers["cache-control"] == "public, max-age=31536000, immutable"
        expiring = await client.get(urls.url(image_id, w=300, expires_in=120))
        max_age = int(expiring.headers["cache-control"].removeprefix("public, max-age="))
        assert 100 <= max_age <= 120
        forged = await client.get(urls.url(image_id, w=300).replace("w=300", "w=301"))
        assert (forged.status_code, forged.headers["cache-control"]) == (403, "no-store")
        assert forged.json()["type"] == "/problems/forbidden"
        unknown_kid = await client.get(RenderUrls("http://testserver", [("k9", K1[1])]).url(image_id, w=300))
        assert (unknown_kid.status_code, unknown_kid.json()["param"]) == (403, "kid")
        missing = await client.get(urls.url("ZZZZZZZZZZZZZZZZZZZZZZ", w=300))
        assert missing.status_code == 404
    async with app_client(with_settings(configured, require_signed=True)) as client:
        assert (await client.get(f"/img/{image_id}?w=256")).status_code == 403
        assert (await client.get(urls.url(image_id, w=256))).status_code == 200


def test_sign_command_prints_a_url_the_server_accepts() -> None:
    from tests.test_config import run_cli

    env = {"IMGSVC_SIGNING_KEYS": f"{K1[0]}:{K1[1]}", "IMGSVC_PUBLIC_URL": "https://img.example.com"}
    result = run_cli("sign", IMAGE, "w=256&fmt=webp", "--expires-in", "300", env=env)
    assert result.returncode == 0, result.stderr
    url = result.stdout.strip()
    assert url.startswith(f"https://img.example.com/img/{IMAGE}?fmt=webp&w=256&kid=k1&exp=")
    assert grant_for(url).signed
    bad = run_cli("sign", IMAGE, "w=0", env=env)
    assert bad.returncode == 2 and "w" in bad.stderr


def test_srcset_lists_each_width_once_in_order() -> None:
    srcset = RenderUrls("https://x", []).srcset(IMAGE, [512, 256, 256], fmt="webp")
    assert srcset == f"https://x/img/{IMAGE}?fmt=webp&w=256 256w, https://x/img/{IMAGE}?fmt=webp&w=512 512w"
    assert httpx.URL(srcset.split(" ")[0]).params["w"] == "256"
