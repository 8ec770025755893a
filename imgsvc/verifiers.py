"""Delegated token verifiers for `auth.Verifier`: RFC 7662 introspection against the main app
(TTL-cached by token hash, single-flight), or local JWT checks against its JWKS. Both fail closed (503).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, get_args

import httpx
import jwt
from cachetools import TTLCache

from imgsvc.auth import ALL_SCOPES, Principal
from imgsvc.cache import SingleFlight
from imgsvc.config import DEFAULT_JWT_ALGORITHMS, JwtAlgorithm
from imgsvc.errors import Unauthorized, Unavailable

log = logging.getLogger("imgsvc.verifiers")

MAX_TOKEN_LENGTH = 8192
TOKEN_SHAPE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750 b64token
KEY_TYPES = {"Ed": "OKP", "ES": "EC", "RS": "RSA", "PS": "RSA"}  # JWA family (RFC 7518 §3.1) -> JWK kty
# algorithm -> the only key type it may be used with (RFC 8725 §3.1)
ASYMMETRIC: Mapping[str, str] = {alg: KEY_TYPES[alg[:2]] for alg in get_args(JwtAlgorithm)}
FORBIDDEN_HEADERS = ("jku", "x5u", "jwk", "x5c")  # a token never chooses its own key (RFC 8725 §3.10)
ACCESS_TOKEN_TYPES = ("at+jwt", "application/at+jwt")  # RFC 9068 §2.1
MIN_KEYS_TTL, MAX_KEYS_TTL = 300.0, 86_400.0  # JWKS Cache-Control max-age is clamped to this range
MAX_KEYS = 64
FAILED_FETCH_BACKOFF = 5.0  # after a failed JWKS fetch, wait this long (at most the cooldown) before trying again


def invalid_token(reason: str) -> Unauthorized:
    """A 401 for a token that is not acceptable; `reason` is short and never contains the token."""
    return Unauthorized(reason, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


def issuer_unavailable() -> Unavailable:
    return Unavailable("the token issuer cannot be reached")


def principal_of(sub: object, scope: object) -> Principal:
    """Principal(sub, the images:* scopes in the space-separated `scope` string); `sub` is required."""
    if not isinstance(sub, str) or not sub:
        raise invalid_token("token has no subject")
    granted = frozenset(scope.split()) if isinstance(scope, str) else frozenset()
    return Principal(subject=sub, scopes=granted & ALL_SCOPES)


def check_shape(token: str) -> None:
    if not token or len(token) > MAX_TOKEN_LENGTH or not TOKEN_SHAPE.fullmatch(token):
        raise invalid_token("malformed token")


@dataclass(frozen=True, slots=True)
class IntrospectionConfig:
    """RFC 7662 introspection at `url` (HTTP Basic client auth when `client_id` is set). Active answers are
    cached for min(exp - now, ttl) s, inactive ones for `negative_ttl`, errors never; `audience` is checked if set."""

    url: str
    client_id: str | None = None
    client_secret: str | None = None
    audience: str | None = None
    ttl: float = 60.0
    negative_ttl: float = 5.0
    timeout: float = 2.0
    max_entries: int = 100_000

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"the introspection url must be http(s), got {self.url!r}")
        if not (0 < self.ttl <= 3600 and 0 <= self.negative_ttl <= 60 and 0 < self.timeout <= 30):
            raise ValueError("need 0 < ttl <= 3600, 0 <= negative_ttl <= 60 and 0 < timeout <= 30")
        if self.max_entries < 1:
            raise ValueError("max_entries must be positive")


class IntrospectionVerifier:
    """`auth.Verifier` asking the main app about each token (cache misses only), failing closed."""

    def __init__(self, config: IntrospectionConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.calls = 0
        auth = httpx.BasicAuth(config.client_id, config.client_secret or "") if config.client_id else None
        self._client = httpx.AsyncClient(
            transport=transport,
            auth=auth,
            timeout=httpx.Timeout(config.timeout),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
            headers={"Accept": "application/json"},
        )
        # token sha256 -> (monotonic deadline, principal); TTLCache bounds both age and count.
        self._active: TTLCache[bytes, tuple[float, Principal]] = TTLCache(config.max_entries, config.ttl)
        # token sha256 -> the reason it was refused; short-lived, only to absorb floods of bad tokens.
        self._inactive: TTLCache[bytes, str] = TTLCache(config.max_entries, max(config.negative_ttl, 0.001))
        self._flight: SingleFlight[bytes, Principal | str] = SingleFlight()

    async def verify(self, token: str) -> Principal:
        check_shape(token)
        key = hashlib.sha256(token.encode()).digest()
        hit = self._active.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        reason = self._inactive.get(key)
        if reason is None:
            answer = await self._flight.run(key, lambda: self._introspect(key, token))
            if isinstance(answer, Principal):
                return answer
            reason = answer
        raise invalid_token(reason)

    async def _introspect(self, key: bytes, token: str) -> Principal | str:
        self.calls += 1
        try:
            async with asyncio.timeout(self.config.timeout):
                response = await self._client.post(
                    self.config.url, data={"token": token, "token_type_hint": "access_token"}
                )
            body = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, TimeoutError, ValueError) as exc:
            log.warning("token introspection failed: %s", type(exc).__name__)
            raise issuer_unavailable() from None
        if not isinstance(body, dict) or not isinstance(body.get("active"), bool):
            log.warning("token introspection answered HTTP %s without a usable body", response.status_code)
            raise issuer_unavailable()
        answer = self._judge(body)
        if isinstance(answer, Principal):
            exp = body.get("exp")
            lifetime = exp - time.time() if isinstance(exp, int | float) else self.config.ttl
            if lifetime <= 0:
                answer = "token has expired"
            else:
                self._active[key] = (time.monotonic() + min(lifetime, self.config.ttl), answer)
                return answer
        if self.config.negative_ttl > 0:
            self._inactive[key] = answer
        return answer

    def _judge(self, body: Mapping[str, Any]) -> Principal | str:
        if body["active"] is not True:
            return "token is not active"
        aud = body.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if self.config.audience is not None and self.config.audience not in audiences:
            return "token is not meant for this audience"
        try:
            return principal_of(body.get("sub"), body.get("scope"))
        except Unauthorized as refused:
            return refused.detail

    async def close(self) -> None:
        await self._client.aclose()


@dataclass(frozen=True, slots=True)
class JwksConfig:
    """Local verification of the main app's JWTs against its JWK Set at `url`.

    Algorithms are pinned (asymmetric only); `exp`, `iss`, `aud` and `sub` are required; `typ` must be
    at+jwt unless `require_typ` is off. Keys are refetched on an unknown `kid` at most once per
    `refetch_cooldown`, and served through a JWKS outage for `stale_for` seconds after they go stale.
    """

    url: str
    issuer: str
    audience: str
    algorithms: tuple[JwtAlgorithm, ...] = DEFAULT_JWT_ALGORITHMS
    leeway: float = 30.0
    refetch_cooldown: float = 30.0
    stale_for: float = 6 * 3600
    timeout: float = 2.0
    require_typ: bool = True

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"the JWKS url must be http(s), got {self.url!r}")
        if not self.issuer or not self.audience:
            raise ValueError("JWKS verification needs an issuer and an audience")
        if not self.algorithms or not set(self.algorithms) <= ASYMMETRIC.keys():
            raise ValueError(f"algorithms must be a non-empty subset of {sorted(ASYMMETRIC)}")
        if not (0 <= self.leeway <= 60 and 0 < self.timeout <= 30):
            raise ValueError("need 0 <= leeway <= 60 and 0 < timeout <= 30")
        if self.refetch_cooldown < 1 or self.stale_for < 0:
            raise ValueError("refetch_cooldown must be at least 1 s and stale_for not negative")


@dataclass(frozen=True, slots=True)
class KeySet:
    keys: Mapping[str, jwt.PyJWK]  # kid -> key, each bound to its own alg
    fresh_until: float  # monotonic
    usable_until: float  # monotonic: fresh_until + stale_for


class JwksVerifier:
    """`auth.Verifier` checking JWT signatures and claims locally with keys from the main app's JWKS."""

    def __init__(
        self,
        config: JwksConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.fetches = 0
        self._clock = clock
        self._client = httpx.AsyncClient(
            transport=transport, timeout=httpx.Timeout(config.timeout), headers={"Accept": "application/json"}
        )
        self._keys: KeySet | None = None
        self._retry_at = float("-inf")  # no fetch before this (after a failure)
        self._kid_refetch_at = float("-inf")  # last refetch caused by an unknown kid
        self._flight: SingleFlight[str, KeySet] = SingleFlight()

    async def verify(self, token: str) -> Principal:
        check_shape(token)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise invalid_token("malformed token") from None
        alg, kid = header.get("alg"), header.get("kid")
        if any(name in header for name in FORBIDDEN_HEADERS):
            raise invalid_token("token names its own key")
        if alg not in self.config.algorithms:
            raise invalid_token("token algorithm is not allowed")
        if self.config.require_typ and str(header.get("typ", "")).lower() not in ACCESS_TOKEN_TYPES:
            raise invalid_token("token is not an access token")
        if not isinstance(kid, str) or not 0 < len(kid) <= 256:
            raise invalid_token("token has no key id")
        key = await self._key(kid)
        if key.algorithm_name != alg:
            raise invalid_token("token algorithm does not match its key")
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[key.algorithm_name],
                audience=self.config.audience,
                issuer=self.config.issuer,
                leeway=self.config.leeway,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise invalid_token(_jwt_reason(exc)) from None
        return principal_of(claims.get("sub"), claims.get("scope"))

    async def _key(self, kid: str) -> jwt.PyJWK:
        now = self._clock()
        keys, refreshed = self._keys, False
        if keys is None or now >= keys.fresh_until:
            keys, refreshed = await self._refresh(keys, now), True
        key = keys.keys.get(kid)
        cooled = now - self._kid_refetch_at >= self.config.refetch_cooldown
        if key is None and not refreshed and (cooled or self._flight):
            # An unfamiliar kid may be a new signing key (OIDC Core §10.1.1): refetch, but rarely,
            # and let concurrent callers join a fetch already in flight.
            if not self._flight:
                self._kid_refetch_at = now
            keys = await self._refresh(keys, now)
            key = keys.keys.get(kid)
        if key is None:
            raise invalid_token("token is signed by an unknown key")
        return key

    async def _refresh(self, current: KeySet | None, now: float) -> KeySet:
        """Fetch the key set (single-flight); on failure keep the last good keys while they are usable."""
        if now < self._retry_at and not self._flight:
            if current is not None and now < current.usable_until:
                return current
            raise issuer_unavailable()
        try:
            keys = await self._flight.run("jwks", self._fetch)
            return keys
        except Unavailable:
            if current is not None and self._clock() < current.usable_until:
                return current
            raise

    async def _fetch(self) -> KeySet:
        self.fetches += 1
        try:
            async with asyncio.timeout(self.config.timeout):
                response = await self._client.get(self.config.url)
            response.raise_for_status()
            keys = self._parse(response.json())
        except (httpx.HTTPError, TimeoutError, ValueError) as exc:
            self._retry_at = self._clock() + min(FAILED_FETCH_BACKOFF, self.config.refetch_cooldown)
            log.warning("JWKS fetch failed: %s", type(exc).__name__)
            raise issuer_unavailable() from None
        now = self._clock()
        fresh_until = now + _max_age(response.headers.get("cache-control"))
        self._keys = KeySet(keys, fresh_until, fresh_until + self.config.stale_for)
        return self._keys

    def _parse(self, document: object) -> dict[str, jwt.PyJWK]:
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ValueError("not a JWK Set")
        keys = {entry["kid"]: key for entry in entries[:MAX_KEYS] if (key := self._usable_key(entry)) is not None}
        if not keys:
            raise ValueError("no usable keys")
        return keys

    def _usable_key(self, entry: object) -> jwt.PyJWK | None:
        """A public signing key bound to one allowed algorithm that matches its key type, or None."""
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str) or "d" in entry:
            return None
        if entry.get("use", "sig") != "sig" or entry.get("kty") not in set(ASYMMETRIC.values()):
            return None
        try:
            key = jwt.PyJWK(entry)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            return None
        if key.algorithm_name not in self.config.algorithms or ASYMMETRIC[key.algorithm_name] != entry["kty"]:
            return None
        return key

    async def close(self) -> None:
        await self._client.aclose()


def _max_age(cache_control: str | None) -> float:
    match = re.search(r"(?:^|[,\s])max-age=\"?(\d+)", cache_control or "")
    seconds = float(match.group(1)) if match else MIN_KEYS_TTL
    return min(max(seconds, MIN_KEYS_TTL), MAX_KEYS_TTL)


JWT_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token has expired"),
    (jwt.ImmatureSignatureError, "token is not yet valid"),
    (jwt.InvalidAudienceError, "token is not meant for this audience"),
    (jwt.InvalidIssuerError, "token has the wrong issuer"),
    (jwt.InvalidSignatureError, "token signature is invalid"),
)


def _jwt_reason(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token lacks the {exc.claim} claim"
    return next((reason for kind, reason in JWT_REASONS if isinstance(exc, kind)), "token is invalid")
