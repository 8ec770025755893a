"""Signed render URLs: HMAC over the canonical spec, rotation by kid, expiry, the unsigned allow-list."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
import pyvips

from imgsvc.app import url_policy
from imgsvc.auth import Principal
from imgsvc.catalog import ImageRecord
from imgsvc.client import RenderUrls
from imgsvc.config import DEFAULT_WIDTHS, ConfigError, Settings
from imgsvc.errors import Forbidden, InvalidParameter, RateLimited, Unauthorized
from imgsvc.ratelimit import RateLimiter, client_key
from imgsvc.render import authorize_view
from imgsvc.signing import DEFAULT_UNSIGNED, UNSIGNED, Grant, Keyring, UnsignedSpace, UrlPolicy, verify
from imgsvc.spec import SpecLimits, parse_query
from tests.conftest import FLICKR, MainApp, ServerProcess, app_client, renders_started, with_settings
from tests.test_auth_http import auth_settings, bearer, upload
from tests.test_config import run_cli

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
    policy = UrlPolicy(Keyring.from_pairs([K1]), UnsignedSpace(sizes=frozenset({64, 256})))
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


# --- the unsigned space ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "", "w=256", "p=thumbnail", "p=large&fmt=avif", "w=128&dpr=2", "h=1080&fmt=auto", "w=64&h=64&fit=cover&g=north",
        "w=640&h=640&fit=contain&g=sw&fmt=png", "w=256&q=75&fmt=webp", "w=256&q=80&fmt=jpeg",  # q=80: jpeg's default
        "w=256&bg=FFF", "w=256&g=smart",  # white is the default; g only matters for cover and contain
        "w=3840&fmt=gif&v=7", "w=256&fit=fill&h=16",
    ],
)  # fmt: skip
def test_the_default_unsigned_space_allows_the_listed_variants(query: str) -> None:
    assert UrlPolicy(Keyring.from_pairs([K1])).grant(IMAGE, parsed(f"https://x/?{query}")) == UNSIGNED


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("w=256&blur=3", "blur"), ("blur=0.3", "blur"), ("w=256&q=50", "q"), ("q=80", "q"),  # q=80 without fmt stays
        ("w=256&fmt=avif&q=80", "q"), ("w=640&h=640&fit=contain&bg=000", "bg"), ("w=256&bg=fffffe", "bg"),
        ("w=64&h=64&fit=cover&g=smart", "g"), ("w=64&h=64&fit=cover&g=entropy", "g"), ("w=300", "w"),
        ("w=256&h=300", "h"), ("w=100&dpr=1.5", "w"), ("p=medium&blur=2", "blur"), ("p=thumbnail&q=1", "q"),
    ],
)  # fmt: skip
def test_everything_else_unsigned_is_a_400_naming_the_parameter(query: str, param: str) -> None:
    policy = UrlPolicy(Keyring.from_pairs([K1]))
    with pytest.raises(InvalidParameter) as caught:
        policy.grant(IMAGE, parsed(f"https://x/?{query}"))
    assert caught.value.param == param and "signed URL" in caught.value.detail
    signed = RenderUrls("https://x", [K1]).url(IMAGE, **dict(parse_qsl(query)))
    assert policy.grant(IMAGE, parsed(signed)).signed


def test_a_preset_is_unsigned_however_it_is_spelled() -> None:
    presets = {"lqip": (("w", "32"), ("blur", "5"), ("fmt", "webp"), ("q", "30")), "hero": (("w", "900"),)}
    space = DEFAULT_UNSIGNED.with_presets(presets, SpecLimits(presets=presets))
    policy = UrlPolicy(unsigned=space)
    limits = SpecLimits(presets=presets)
    for query in ("p=lqip", "blur=5&fmt=webp&q=30&w=32", "w=32&blur=5.00&q=30&fmt=webp", "p=hero", "w=450&dpr=2"):
        assert policy.grant(IMAGE, parse_query(parse_qsl(query), limits)) == UNSIGNED
    for query, param in (("p=lqip&blur=6", "blur"), ("w=901", "w"), ("p=lqip&q=31", "q")):
        with pytest.raises(InvalidParameter) as caught:
            policy.grant(IMAGE, parse_query(parse_qsl(query), limits))
        assert caught.value.param == param


@pytest.mark.parametrize(
    ("env", "allowed", "refused"),
    [
        ({}, ["w=256&q=60"], ["w=256&q=61", "w=256&blur=1", "w=256&bg=000", "w=99"]),
        ({"IMGSVC_UNSIGNED_QUALITIES": "40, 90"}, ["w=256&q=40"], ["w=256&q=60"]),
        ({"IMGSVC_UNSIGNED_QUALITIES": "*"}, ["w=256&q=1"], ["w=256&blur=1"]),
        ({"IMGSVC_UNSIGNED_FORMATS": "webp,auto"}, ["fmt=webp", "fmt=auto"], ["fmt=avif", "fmt=png"]),
        ({"IMGSVC_UNSIGNED_GRAVITIES": "*"}, ["w=64&h=64&fit=cover&g=smart"], ["w=64&blur=1"]),
        ({"IMGSVC_UNSIGNED_GRAVITIES": "center"}, ["w=64&h=64&fit=cover"], ["w=64&h=64&fit=cover&g=north"]),
        ({"IMGSVC_UNSIGNED_EFFECTS": "true"}, ["w=256&blur=1", "w=256&bg=123456"], ["w=256&q=61"]),
        ({"IMGSVC_UNSIGNED_WIDTHS": "*"}, ["w=99", "w=256&q=85"], ["w=99&q=86"]),
        ({"IMGSVC_PRESETS": "soft:w=100&blur=2&bg=000"}, ["p=soft", "w=100"], ["w=100&blur=3", "w=101"]),
    ],
)
def test_the_unsigned_space_follows_the_settings(env: dict[str, str], allowed: list[str], refused: list[str]) -> None:
    settings = Settings.from_env(env)
    policy, limits = url_policy(settings), SpecLimits(presets=settings.presets)
    for query in allowed:
        assert policy.grant(IMAGE, parse_query(parse_qsl(query), limits)) == UNSIGNED, query
    for query in refused:
        with pytest.raises(InvalidParameter):
            policy.grant(IMAGE, parse_query(parse_qsl(query), limits))


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("IMGSVC_UNSIGNED_QUALITIES", "0,50", "between 1 and 100"),
        ("IMGSVC_UNSIGNED_QUALITIES", ",", "at least one"),
        ("IMGSVC_UNSIGNED_FORMATS", "jpg", "'jpg' is not one of"),
        ("IMGSVC_UNSIGNED_GRAVITIES", "middle", "'middle' is not one of"),
        ("IMGSVC_UNSIGNED_EFFECTS", "maybe", "true or false"),
        ("IMGSVC_RENDER_RATE", "-1", "between 0"),
        ("IMGSVC_RENDER_BURST", "0", "between 1"),
    ],
)
def test_unsigned_and_render_rate_settings_are_validated(variable: str, value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({variable: value})
    assert caught.value.problems[0].startswith(variable) and problem in caught.value.problems[0]


def test_the_client_keeps_unsigned_urls_inside_the_space() -> None:
    urls = RenderUrls("https://x")
    assert urls.url(IMAGE, w=128, dpr=2, fmt="webp", q=75) == f"https://x/img/{IMAGE}?fmt=webp&q=75&w=256"
    for params in ({"w": 256, "blur": 2}, {"w": 256, "q": 50}, {"w": 300}):
        with pytest.raises(InvalidParameter):
            urls.url(IMAGE, **params)
    with pytest.raises(InvalidParameter):
        urls.srcset(IMAGE, [256, 300])
    assert "blur=2" in RenderUrls("https://x", unsigned=None).url(IMAGE, w=256, blur=2)
    assert "s=" in RenderUrls("https://x", [K1]).url(IMAGE, w=300, blur=2)  # signed: anything goes
    custom = UnsignedSpace.allowing([300], None, None, None).with_presets({}, SpecLimits())
    assert RenderUrls("https://x", unsigned=custom).url(IMAGE, w=300, q=50).endswith("?q=50&w=300")


def test_the_client_follows_the_servers_presets_unsigned() -> None:
    settings = Settings.from_env({"IMGSVC_PRESETS": "hero:w=1600;medium:w=300"})
    urls, policy = RenderUrls.from_settings(settings, "https://x"), url_policy(settings)
    for preset, width in (("hero", 1600), ("medium", 300)):  # neither 1600 nor 300 is an unsigned width
        url = urls.url(IMAGE, p=preset)
        assert url == f"https://x/img/{IMAGE}?w={width}"
        assert policy.grant(IMAGE, parsed(url)) == UNSIGNED
    with pytest.raises(InvalidParameter) as caught:
        urls.url(IMAGE, p="thumbnail")  # a default preset these settings no longer define
    assert caught.value.param == "p" and "available: hero, medium" in caught.value.detail


# --- over HTTP: presets signed by `imgsvc sign`, the blur flood, render misses per client address ------------------


def test_imgsvc_sign_signs_the_servers_presets(server_env: dict[str, str], tmp_path: Path) -> None:
    """A custom preset (hero) and a redefined one (medium), signed by the CLI and the client with the server's env."""
    env = {**server_env, "IMGSVC_PRESETS": "hero:w=1600;medium:w=300&fmt=webp",
           "IMGSVC_SIGNING_KEYS": f"{K1[0]}:{K1[1]}", "IMGSVC_REQUIRE_SIGNED": "true"}  # fmt: skip
    server = ServerProcess(env, tmp_path / "server.log").start()
    try:
        jpeg = {"Content-Type": "image/jpeg"}
        image_id = httpx.post(f"{server.url}/images", content=FLICKR.read_bytes(), headers=jpeg).json()["id"]
        urls = RenderUrls.from_settings(Settings.from_env(env), server.url)
        for preset, width, media_type in (("hero", 1600, "image/jpeg"), ("medium", 300, "image/webp")):
            signed = run_cli(
                "sign", "--base-url", server.url, "--", image_id, f"p={preset}", env=env
            )  # ids may start with -
            assert signed.returncode == 0, signed.stderr
            assert signed.stdout.strip() == urls.url(image_id, p=preset)
            answer = httpx.get(signed.stdout.strip(), timeout=60)
            assert (answer.status_code, answer.headers["content-type"]) == (200, media_type), answer.text
            assert pyvips.Image.new_from_buffer(answer.content, "").width == width
            unsigned = httpx.get(f"{server.url}/img/{image_id}?p={preset}", timeout=60)
            assert (unsigned.status_code, unsigned.json()["param"]) == (403, "s")  # the signature was checked
    finally:
        server.stop()


async def test_forty_distinct_blurs_unsigned_are_refused_before_any_render(settings: Settings) -> None:
    configured = with_settings(settings, unsigned_widths=DEFAULT_WIDTHS, signing_keys=(K1,))
    async with app_client(configured) as client:
        created = await client.post("/images", content=FLICKR.read_bytes(), headers={"Content-Type": "image/jpeg"})
        image_id = created.json()["id"]
        before = renders_started()
        flood = [client.get(f"/img/{image_id}?w=640&blur={1 + i / 4:g}") for i in range(40)]
        for refused in await asyncio.gather(*flood):
            assert (refused.status_code, refused.json()["param"]) == (400, "blur")
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.headers["cache-control"] == "public, max-age=60"  # nginx and the CDN absorb repeats
        assert renders_started() == before
        signed = await client.get(RenderUrls("http://testserver", [K1]).url(image_id, w=640, blur=2.5))
        assert (signed.status_code, signed.headers["content-type"]) == (200, "image/jpeg")


ALLOWED_VARIANTS = [f"w={w}&fmt={fmt}" for fmt in ("jpeg", "webp", "png", "avif", "gif") for w in DEFAULT_WIDTHS[:8]]


def test_render_misses_are_limited_per_client_address(server_env: dict[str, str], tmp_path: Path) -> None:
    burst = 10  # refilled at 1 a minute, so that the count does not depend on how fast this machine renders
    env = {**server_env, "IMGSVC_RENDER_RATE": "1", "IMGSVC_RENDER_BURST": str(burst),
           "IMGSVC_SIGNING_KEYS": f"{K1[0]}:{K1[1]}"}  # fmt: skip
    server = ServerProcess(env, tmp_path / "server.log").start()
    try:
        jpeg = {"Content-Type": "image/jpeg"}
        image_id = httpx.post(f"{server.url}/images", content=FLICKR.read_bytes(), headers=jpeg).json()["id"]
        base = f"{server.url}/img/{image_id}"
        flooder = {"X-Forwarded-For": "203.0.113.7"}  # the peer, 127.0.0.1, is a trusted proxy by default
        began = time.monotonic()
        with httpx.Client(timeout=60) as http:
            answers = [http.get(f"{base}?{query}", headers=flooder) for query in ALLOWED_VARIANTS]
            elapsed = time.monotonic() - began
            statuses = [answer.status_code for answer in answers]
            assert statuses[:burst] == [200] * burst, statuses
            assert set(statuses[burst:]) <= {200, 429} and 429 in statuses[burst:], statuses
            assert statuses.count(200) <= burst + 1 + elapsed // 60  # at most the refill of the elapsed time
            limited = answers[statuses.index(429)]
            assert limited.headers["content-type"] == "application/problem+json"
            assert limited.json()["type"] == "/problems/rate-limited"
            assert limited.headers["cache-control"] == "no-store" and 1 <= int(limited.headers["retry-after"]) <= 60

            new = f"{base}?w=640&fmt=webp"
            assert http.get(new, headers=flooder).status_code == 429
            assert http.get(f"{base}?{ALLOWED_VARIANTS[0]}", headers=flooder).status_code == 200  # an LRU hit
            etag = answers[1].headers["etag"]
            revalidated = http.get(f"{base}?{ALLOWED_VARIANTS[1]}", headers={**flooder, "If-None-Match": etag})
            assert revalidated.status_code == 304
            signed = RenderUrls(server.url, [K1]).url(image_id, w=300, fmt="webp")
            assert http.get(signed, headers=flooder).status_code == 429  # a signature says what, not who
            assert http.get(new, headers={"X-Forwarded-For": "203.0.113.8"}).status_code == 200  # another client
            assert http.get(f"{base}?w=750&fmt=webp").status_code == 200  # the proxy's own address
        # A peer that is not a trusted proxy is itself the client, whatever it forwards.
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=60) as other:
            assert other.get(f"{base}?w=828&fmt=webp", headers=flooder).status_code == 200
    finally:
        server.stop()


async def test_admin_tokens_are_not_render_limited(settings: Settings, main: MainApp) -> None:
    configured = auth_settings(settings, main, "jwks", unsigned_widths=DEFAULT_WIDTHS, render_rate=1, render_burst=2)
    async with app_client(configured) as client:
        writer, admin = main.token("alice", "images:read images:write"), main.token("root", "images:admin")
        created = await upload(client, writer)
        base = f"/img/{created.json()['id']}"
        statuses = [(await client.get(f"{base}?w={w}")).status_code for w in (16, 32, 48)]
        assert statuses == [200, 200, 429]
        assert (await client.get(f"{base}?w=64", headers=bearer(writer))).status_code == 429
        for w in (64, 96, 128, 256):
            assert (await client.get(f"{base}?w={w}", headers=bearer(admin))).status_code == 200


@pytest.mark.parametrize("size", [(2725, 2225), (10, 8)])
async def test_the_image_json_urls_render_unsigned(settings: Settings, size: tuple[int, int]) -> None:
    image = FLICKR.read_bytes() if size[0] > 10 else pyvips.Image.black(*size).jpegsave_buffer()
    async with app_client(with_settings(settings, unsigned_widths=DEFAULT_WIDTHS)) as client:
        created = (await client.post("/images", content=image, headers={"Content-Type": "image/jpeg"})).json()
        presets = [url for name, url in created["urls"].items() if name not in ("self", "original")]
        candidates = [candidate.rsplit(" ", 1) for candidate in created["srcset"].split(", ")]
        assert len(presets) == 7 and candidates  # the six presets and the bare URL
        for url in [*presets, *(url for url, _ in candidates)]:
            answer = await client.get(url)
            assert answer.status_code == 200, (url, answer.text)
        for url, descriptor in candidates:  # each candidate is as wide as it says
            decoded = pyvips.Image.new_from_buffer((await client.get(url)).content, "")
            assert f"{decoded.width}w" == descriptor


@pytest.mark.parametrize(
    ("first", "second", "shared"),
    [
        ("203.0.113.7", "203.0.113.8", False),
        ("2001:db8:1:2::7", "2001:db8:1:2:ffff::8", True),  # one /64: usually one host or one home
        ("2001:db8:1:2::7", "2001:db8:1:3::7", False),
        ("::ffff:203.0.113.7", "203.0.113.7", True),
    ],
)
def test_render_buckets_are_per_ipv4_address_and_per_ipv6_64(first: str, second: str, shared: bool) -> None:
    limiter = RateLimiter(1, 2, what="render misses")
    limiter.hit(client_key(first))
    limiter.hit(client_key(first))
    if shared:
        with pytest.raises(RateLimited):
            limiter.hit(client_key(second))
    else:
        limiter.hit(client_key(second))
