"""Delegated token verification against the reference main app, run as a real process on loopback:
introspection (cache, single-flight, fail closed) and local JWKS verification (pinning, rotation, outages)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm, RSAAlgorithm

from imgsvc.errors import Unauthorized, Unavailable
from imgsvc.verifiers import IntrospectionConfig, IntrospectionVerifier, JwksConfig, JwksVerifier
from mainapp.app import SLOW_SECONDS
from tests.conftest import AUDIENCE, CLIENT_ID, CLIENT_SECRET, MainApp


class Clock:
    """A monotonic clock the JWKS tests can move forward."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def healthy_afterwards(main: MainApp) -> Iterator[None]:
    yield
    main.fail("ok")


def introspection_config(main: MainApp, **changes: Any) -> IntrospectionConfig:
    fields = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "audience": AUDIENCE} | changes
    return IntrospectionConfig(url=f"{main.url}/introspect", **fields)


def jwks_config(main: MainApp, **changes: Any) -> JwksConfig:
    return JwksConfig(
        **({"url": f"{main.url}/.well-known/jwks.json", "issuer": main.issuer, "audience": AUDIENCE} | changes)
    )


@pytest.fixture
async def introspector(main: MainApp) -> AsyncIterator[IntrospectionVerifier]:
    verifier = IntrospectionVerifier(introspection_config(main))
    yield verifier
    await verifier.close()


@pytest.fixture
async def jwks_verifier(main: MainApp) -> AsyncIterator[JwksVerifier]:
    verifier = JwksVerifier(jwks_config(main))
    yield verifier
    await verifier.close()


@pytest.fixture(params=["introspect", "jwks"])
async def verifier(
    request: pytest.FixtureRequest, main: MainApp
) -> AsyncIterator[IntrospectionVerifier | JwksVerifier]:
    built = (
        IntrospectionVerifier(introspection_config(main))
        if request.param == "introspect"
        else JwksVerifier(jwks_config(main))
    )
    yield built
    await built.close()


# -------------------------------------------------------------------------------- hostile tokens, built here


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_for(main: MainApp, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": main.issuer, "aud": AUDIENCE, "sub": "mallory", "scope": "images:admin", "iat": now}
    return base | {"exp": now + 300, "jti": secrets.token_hex(8)} | changes


def current_kid(main: MainApp) -> str:
    return str(jwt.get_unverified_header(main.token())["kid"])


def hs256(main: MainApp, secret: bytes) -> str:
    return hs256_with(secret, current_kid(main), claims_for(main))


def hs256_with(secret: bytes, kid: str, claims: dict[str, Any]) -> str:
    """HS256 built by hand: PyJWT itself refuses to use PEM or JWK text as an HMAC secret."""
    header = b64(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": kid}).encode())
    payload = b64(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


def public_key_forms(main: MainApp) -> dict[str, bytes]:
    jwk = next(k for k in main.jwks()["keys"] if k["kid"] == current_kid(main))
    public = OKPAlgorithm.from_jwk(jwk)
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"pem": pem, "raw": raw, "jwk-json": json.dumps(jwk).encode(), "x": jwk["x"].encode()}


def hostile(main: MainApp, kind: str) -> str:
    kid = current_kid(main)
    stranger = Ed25519PrivateKey.generate()
    match kind:
        case "garbage":
            return "not-a-token"
        case "garbage-jwt":
            return "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
        case "alg-none":
            return jwt.encode(claims_for(main), None, algorithm="none", headers={"kid": kid, "typ": "at+jwt"})
        case "hs256-public-pem" | "hs256-public-raw" | "hs256-public-jwk-json" | "hs256-public-x":
            return hs256(main, public_key_forms(main)[kind.removeprefix("hs256-public-")])
        case "hs256-random-secret":
            return hs256(main, secrets.token_bytes(32))
        case "wrong-signature":
            return jwt.encode(claims_for(main), stranger, algorithm="EdDSA", headers={"kid": kid, "typ": "at+jwt"})
        case "embedded-jwk":
            jwk = OKPAlgorithm.to_jwk(stranger.public_key(), as_dict=True)
            headers = {"kid": kid, "typ": "at+jwt", "jwk": jwk, "jku": "http://127.0.0.1:1/evil.json"}
            return jwt.encode(claims_for(main), stranger, algorithm="EdDSA", headers=headers)
    raise AssertionError(kind)


HOSTILE = {  # kind -> why local verification refuses it (introspection: the main app says inactive)
    "garbage": "malformed",
    "garbage-jwt": "not an access token",
    "alg-none": "algorithm is not allowed",
    "hs256-public-pem": "algorithm is not allowed",
    "hs256-public-raw": "algorithm is not allowed",
    "hs256-public-jwk-json": "algorithm is not allowed",
    "hs256-public-x": "algorithm is not allowed",
    "hs256-random-secret": "algorithm is not allowed",
    "wrong-signature": "signature is invalid",
    "embedded-jwk": "names its own key",
}


def assert_invalid(caught: pytest.ExceptionInfo[Unauthorized], token: str, *words: str) -> None:
    error = caught.value
    assert error.status == 401
    assert error.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert token not in error.detail and len(error.detail) < 80
    for word in words:
        assert word in error.detail


# -------------------------------------------------------------------------------- both verifiers


async def test_valid_token_gives_the_principal(verifier: IntrospectionVerifier | JwksVerifier, main: MainApp) -> None:
    token = main.token("alice", "images:read images:write openid profile")
    principal = await verifier.verify(token)
    assert principal.subject == "alice"
    assert principal.scopes == frozenset({"images:read", "images:write"})
    admin = await verifier.verify(main.token("root", "images:admin"))
    assert admin.subject == "root" and admin.scopes == frozenset({"images:admin"})
    assert (await verifier.verify(main.token("bob", ""))).scopes == frozenset()


@pytest.mark.parametrize("kind", HOSTILE)
async def test_hostile_tokens_are_refused(
    verifier: IntrospectionVerifier | JwksVerifier, main: MainApp, kind: str
) -> None:
    token = hostile(main, kind)
    with pytest.raises(Unauthorized) as caught:
        await verifier.verify(token)
    assert_invalid(caught, token, HOSTILE[kind] if isinstance(verifier, JwksVerifier) else "not active")


@pytest.mark.parametrize(
    ("mint", "jwks_reason", "introspect_reason"),
    [
        ({"ttl": -120}, "expired", "not active"),
        ({"nbf": 600}, "not yet valid", "not active"),  # seconds after the test starts, not after collection
        ({"aud": "someone-else"}, "audience", "audience"),
        ({"sub": None}, "sub", "subject"),
    ],
    ids=["expired", "not-yet-valid", "wrong-audience", "missing-sub"],
)
async def test_invalid_claims_are_refused(
    verifier: IntrospectionVerifier | JwksVerifier,
    main: MainApp,
    mint: dict[str, Any],
    jwks_reason: str,
    introspect_reason: str,
) -> None:
    if "nbf" in mint:
        mint = {**mint, "nbf": int(time.time()) + mint["nbf"]}
    token = main.token(**mint)
    with pytest.raises(Unauthorized) as caught:
        await verifier.verify(token)
    assert_invalid(caught, token, jwks_reason if isinstance(verifier, JwksVerifier) else introspect_reason)


async def test_jwks_leeway_is_bounded(main: MainApp) -> None:
    verifier = JwksVerifier(jwks_config(main, leeway=30))
    try:
        assert (await verifier.verify(main.token(ttl=-5))).subject == "alice"
        with pytest.raises(Unauthorized):
            await verifier.verify(main.token(ttl=-31))
    finally:
        await verifier.close()


async def test_wrong_issuer_is_refused(main: MainApp) -> None:
    verifier = JwksVerifier(jwks_config(main, issuer="https://issuer.example"))
    try:
        token = main.token()
        with pytest.raises(Unauthorized) as caught:
            await verifier.verify(token)
        assert_invalid(caught, token, "issuer")
    finally:
        await verifier.close()


async def test_a_foreign_issuers_token_is_inactive(introspector: IntrospectionVerifier, main: MainApp) -> None:
    stranger = Ed25519PrivateKey.generate()
    claims = claims_for(main, iss="https://issuer.example")
    token = jwt.encode(claims, stranger, algorithm="EdDSA", headers={"kid": "other", "typ": "at+jwt"})
    with pytest.raises(Unauthorized) as caught:
        await introspector.verify(token)
    assert_invalid(caught, token, "not active")


# -------------------------------------------------------------------------------- introspection


async def test_revoked_token_is_refused(introspector: IntrospectionVerifier, main: MainApp) -> None:
    token = main.token()
    main.revoke(token)
    with pytest.raises(Unauthorized) as caught:
        await introspector.verify(token)
    assert_invalid(caught, token, "not active")


async def test_sequential_checks_make_one_call(introspector: IntrospectionVerifier, main: MainApp) -> None:
    token = main.token()
    before = main.stats()["introspection_calls"]
    for _ in range(100):
        assert (await introspector.verify(token)).subject == "alice"
    assert introspector.calls == 1
    assert main.stats()["introspection_calls"] - before == 1


async def test_concurrent_checks_share_one_call(introspector: IntrospectionVerifier, main: MainApp) -> None:
    token = main.token("carol")
    before = main.stats()["introspection_calls"]
    principals = await asyncio.gather(*(introspector.verify(token) for _ in range(50)))
    assert {p.subject for p in principals} == {"carol"}
    assert introspector.calls == 1
    assert main.stats()["introspection_calls"] - before == 1


async def test_positive_cache_never_outlives_exp(introspector: IntrospectionVerifier, main: MainApp) -> None:
    assert introspector.config.ttl == 60
    token = main.token(ttl=2)
    await introspector.verify(token)
    await asyncio.sleep(3.1)
    with pytest.raises(Unauthorized):
        await introspector.verify(token)
    assert introspector.calls == 2


async def test_negative_cache_is_short_and_bounded(main: MainApp) -> None:
    verifier = IntrospectionVerifier(introspection_config(main, negative_ttl=1.0, max_entries=8))
    try:
        token = hostile(main, "wrong-signature")
        for _ in range(5):
            with pytest.raises(Unauthorized):
                await verifier.verify(token)
        assert verifier.calls == 1
        await asyncio.sleep(1.2)
        with pytest.raises(Unauthorized):
            await verifier.verify(token)
        assert verifier.calls == 2
        for _ in range(30):
            with pytest.raises(Unauthorized):
                await verifier.verify(hostile(main, "wrong-signature"))
        assert len(verifier._inactive) <= 8
    finally:
        await verifier.close()


async def test_issuer_down_fails_closed_uncached_and_recovers(
    introspector: IntrospectionVerifier, main: MainApp
) -> None:
    token = main.token()
    main.fail("down")
    for _ in range(3):
        with pytest.raises(Unavailable):
            await introspector.verify(token)
    assert introspector.calls == 3
    main.fail("ok")
    assert (await introspector.verify(token)).subject == "alice"
    assert introspector.calls == 4


async def test_slow_issuer_fails_closed_within_the_timeout(main: MainApp) -> None:
    verifier = IntrospectionVerifier(introspection_config(main, timeout=1.0))
    try:
        token = main.token()
        main.fail("slow")
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await verifier.verify(token)
        waited = time.monotonic() - started
        print(f"slow issuer: failed closed after {waited:.3f} s (timeout 1 s; it answers after {SLOW_SECONDS} s)")
        assert 0.99 <= waited < SLOW_SECONDS  # gave up at its timeout, not when the issuer answered
        main.fail("ok")
        assert (await verifier.verify(token)).subject == "alice"
    finally:
        await verifier.close()


async def test_wrong_client_credentials_fail_closed(main: MainApp) -> None:
    verifier = IntrospectionVerifier(introspection_config(main, client_secret="wrong"))
    try:
        with pytest.raises(Unavailable):
            await verifier.verify(main.token())
    finally:
        await verifier.close()


# -------------------------------------------------------------------------------- JWKS


async def test_concurrent_cold_start_fetches_keys_once(jwks_verifier: JwksVerifier, main: MainApp) -> None:
    tokens = [main.token(f"user{i}") for i in range(10)]
    principals = await asyncio.gather(*(jwks_verifier.verify(t) for t in tokens * 5))
    assert len(principals) == 50
    assert jwks_verifier.fetches == 1


async def test_key_rotation(main: MainApp) -> None:
    clock = Clock()
    verifier = JwksVerifier(jwks_config(main), clock=clock)
    try:
        old_token = main.token("old")
        old_kid = jwt.get_unverified_header(old_token)["kid"]
        assert (await verifier.verify(old_token)).subject == "old"
        assert verifier.fetches == 1
        new_kid = main.rotate()
        new_token = main.token("new")
        assert jwt.get_unverified_header(new_token)["kid"] == new_kid
        assert (await verifier.verify(new_token)).subject == "new"
        assert verifier.fetches == 2  # one refetch for the unfamiliar kid
        assert (await verifier.verify(old_token)).subject == "old"  # still published
        assert verifier.fetches == 2
        main.retire(old_kid)
        clock.advance(301)  # past the JWKS max-age: the next check refetches and forgets the retired key
        with pytest.raises(Unauthorized) as caught:
            await verifier.verify(old_token)
        assert_invalid(caught, old_token, "unknown key")
        assert (await verifier.verify(new_token)).subject == "new"
        assert verifier.fetches == 3
    finally:
        await verifier.close()


async def test_unknown_kids_refetch_at_most_once_per_cooldown(main: MainApp) -> None:
    clock = Clock()
    verifier = JwksVerifier(jwks_config(main, refetch_cooldown=30), clock=clock)
    try:
        await verifier.verify(main.token())
        before = main.stats()["jwks_fetches"]
        stranger = Ed25519PrivateKey.generate()
        for _ in range(20):
            headers = {"kid": secrets.token_hex(8), "typ": "at+jwt"}
            token = jwt.encode(claims_for(main), stranger, algorithm="EdDSA", headers=headers)
            with pytest.raises(Unauthorized):
                await verifier.verify(token)
            clock.advance(1)
        assert verifier.fetches == 2
        assert main.stats()["jwks_fetches"] - before == 1
        clock.advance(11)  # 31 s after the first refetch
        with pytest.raises(Unauthorized):
            await verifier.verify(token)
        assert verifier.fetches == 3
    finally:
        await verifier.close()


async def test_outage_serves_last_good_keys_then_fails_closed(main: MainApp) -> None:
    clock = Clock()
    verifier = JwksVerifier(jwks_config(main, stale_for=3600), clock=clock)
    try:
        token = main.token()
        await verifier.verify(token)
        main.fail("down")
        clock.advance(301)  # keys are stale; the refetch fails; the last good keys still verify
        assert (await verifier.verify(token)).subject == "alice"
        assert verifier.fetches == 2
        for _ in range(10):  # failed fetches back off instead of hammering the issuer
            assert (await verifier.verify(token)).subject == "alice"
        assert verifier.fetches == 2
        clock.advance(3600)  # stale_for exceeded
        with pytest.raises(Unavailable):
            await verifier.verify(token)
        main.fail("ok")
        clock.advance(10)
        assert (await verifier.verify(token)).subject == "alice"
    finally:
        await verifier.close()


@pytest.mark.parametrize("mode", ["down", "slow"])
async def test_no_keys_yet_fails_closed(main: MainApp, mode: str) -> None:
    verifier = JwksVerifier(jwks_config(main, timeout=1.0))
    try:
        token = main.token()
        main.fail(mode)
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await verifier.verify(token)
        waited = time.monotonic() - started
        print(f"JWKS {mode}: failed closed after {waited:.3f} s (timeout 1 s; slow answers after {SLOW_SECONDS} s)")
        assert waited < SLOW_SECONDS  # never waited for a slow issuer's answer
        assert mode != "slow" or waited >= 0.99
    finally:
        await verifier.close()


@pytest.mark.parametrize(
    "changes",
    [
        {"algorithms": ("HS256",)},
        {"algorithms": ("none",)},
        {"algorithms": ("EdDSA", "HS512")},
        {"algorithms": ()},
        {"leeway": 120},
        {"leeway": -1},
        {"url": "file:///etc/jwks.json"},
    ],
)
def test_jwks_config_refuses_unsafe_settings(changes: dict[str, Any]) -> None:
    base = {"url": "http://127.0.0.1:1/jwks.json", "issuer": "http://127.0.0.1:1", "audience": AUDIENCE}
    with pytest.raises(ValueError):
        JwksConfig(**(base | changes))


async def test_jwks_keys_are_bound_to_their_own_algorithm() -> None:
    """Each published key verifies only with the alg of its own kty; symmetric and private keys are ignored.

    A JWK Set the reference main app would never publish, so it is served by an httpx.MockTransport."""
    ed, rsa_key = Ed25519PrivateKey.generate(), rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys = [
        OKPAlgorithm.to_jwk(ed.public_key(), as_dict=True) | {"kid": "ed"},  # no alg: inferred from kty/crv
        RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True) | {"kid": "rsa", "alg": "RS256"},
        OKPAlgorithm.to_jwk(ed.public_key(), as_dict=True) | {"kid": "labelled-rs256", "alg": "RS256"},
        {"kty": "oct", "kid": "hmac", "alg": "HS256", "k": b64(b"shared secret")},
        OKPAlgorithm.to_jwk(ed, as_dict=True) | {"kid": "private", "alg": "EdDSA"},
    ]
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"keys": keys}))
    config = JwksConfig(url="http://issuer.test/jwks", issuer="http://issuer.test", audience=AUDIENCE)
    verifier = JwksVerifier(config, transport=transport)
    claims = {"iss": "http://issuer.test", "aud": AUDIENCE, "sub": "s", "exp": int(time.time()) + 60}

    def sign(key: Any, alg: str, kid: str) -> str:
        return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, "typ": "at+jwt"})

    try:
        assert (await verifier.verify(sign(ed, "EdDSA", "ed"))).subject == "s"
        assert (await verifier.verify(sign(rsa_key, "RS256", "rsa"))).subject == "s"
        refused = {
            sign(ed, "EdDSA", "rsa"): "does not match",
            sign(rsa_key, "RS256", "ed"): "does not match",
            sign(ed, "EdDSA", "labelled-rs256"): "unknown key",
            sign(ed, "EdDSA", "private"): "unknown key",
            hs256_with(b"shared secret", "hmac", claims): "not allowed",
        }
        for token, reason in refused.items():
            with pytest.raises(Unauthorized) as caught:
                await verifier.verify(token)
            assert_invalid(caught, token, reason)
    finally:
        await verifier.close()
