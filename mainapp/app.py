"""The reference main app: token issuance, JWKS with key rotation, RFC 7662 introspection and RFC 7009
revocation, plus test-only controls (/stats, /admin/rotate, /admin/retire/{kid}, /admin/fail).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

FailMode = Literal["ok", "down", "slow"]
SLOW_SECONDS = 5.0
MAX_TTL = 86_400
NO_STORE = {"Cache-Control": "no-store"}


@dataclass
class Issuer:
    """Everything the main app knows: its signing keys (the last one signs), revoked jtis, counters, fail mode."""

    issuer: str
    audience: str
    client_id: str | None = None
    client_secret: str | None = None
    keys: dict[str, Ed25519PrivateKey] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    stats: dict[str, int] = field(default_factory=lambda: {"introspection_calls": 0, "jwks_fetches": 0, "tokens": 0})
    mode: FailMode = "ok"

    def __post_init__(self) -> None:
        if not self.keys:
            self.rotate()

    @property
    def current_kid(self) -> str:
        return next(reversed(self.keys))

    def rotate(self) -> str:
        kid = f"k{len(self.keys) + 1}-{secrets.token_hex(4)}"
        self.keys[kid] = Ed25519PrivateKey.generate()
        return kid

    def jwks(self) -> dict[str, Any]:
        published = []
        for kid, key in self.keys.items():
            jwk = OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
            published.append({**jwk, "kid": kid, "alg": "EdDSA", "use": "sig"})
        return {"keys": published}

    def issue(self, sub: str | None, scope: str, ttl: int, aud: str | list[str] | None, nbf: int | None) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": aud if aud is not None else self.audience,
            "scope": scope,
            "iat": now,
            "exp": now + ttl,
            "jti": secrets.token_urlsafe(16),
            "client_id": self.client_id or "mainapp",
        }
        if sub is not None:
            claims["sub"] = sub
        if nbf is not None:
            claims["nbf"] = nbf
        kid = self.current_kid
        headers = {"kid": kid, "typ": "at+jwt"}
        self.stats["tokens"] += 1
        return jwt.encode(claims, self.keys[kid], algorithm="EdDSA", headers=headers)

    def claims(self, token: str, *, verify_exp: bool = True) -> dict[str, Any] | None:
        """The claims of a token this app issued with a still-published key, or None."""
        try:
            header = jwt.get_unverified_header(token)
            key = self.keys.get(header.get("kid", ""))
            if key is None or header.get("alg") != "EdDSA":
                return None
            return jwt.decode(
                token,
                key.public_key(),
                algorithms=["EdDSA"],
                issuer=self.issuer,
                options={"verify_aud": False, "verify_exp": verify_exp, "require": ["exp", "iat", "jti"]},
            )
        except jwt.PyJWTError:
            return None

    def client_ok(self, request: Request) -> bool:
        if self.client_id is None:
            return True
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return (
            scheme.lower() == "basic"
            and secrets.compare_digest(user, self.client_id)
            and secrets.compare_digest(password, self.client_secret or "")
        )

    async def obey_fail_mode(self) -> Response | None:
        if self.mode == "down":
            return JSONResponse({"error": "temporarily_unavailable"}, 503, headers=NO_STORE)
        if self.mode == "slow":
            await asyncio.sleep(SLOW_SECONDS)
        return None


def create_app(
    issuer: str, audience: str = "imgsvc", client_id: str | None = None, client_secret: str | None = None
) -> Starlette:
    state = Issuer(issuer, audience, client_id, client_secret)

    async def token(request: Request) -> Response:
        try:
            body = await request.json()
            sub, scope, ttl = body.get("sub"), body.get("scope", ""), int(body.get("ttl", 300))
            aud, nbf = body.get("aud"), body.get("nbf")
            valid = (
                (sub is None or (isinstance(sub, str) and sub))
                and isinstance(scope, str)
                and -MAX_TTL <= ttl <= MAX_TTL
                and (aud is None or isinstance(aud, str | list))
                and (nbf is None or isinstance(nbf, int))
            )
        except (ValueError, TypeError, AttributeError):
            valid = False
        if not valid:
            return JSONResponse({"error": "invalid_request"}, 400)
        access_token = state.issue(sub, scope, ttl, aud, nbf)
        return JSONResponse({"access_token": access_token, "token_type": "Bearer", "expires_in": ttl}, headers=NO_STORE)

    async def jwks(request: Request) -> Response:
        state.stats["jwks_fetches"] += 1
        if (failed := await state.obey_fail_mode()) is not None:
            return failed
        return JSONResponse(state.jwks(), headers={"Cache-Control": "max-age=300"})

    async def introspect(request: Request) -> Response:
        state.stats["introspection_calls"] += 1
        if (failed := await state.obey_fail_mode()) is not None:
            return failed
        if not state.client_ok(request):
            return JSONResponse({"error": "invalid_client"}, 401, headers={"WWW-Authenticate": "Basic"})
        form = await request.form()
        token = form.get("token")
        if not isinstance(token, str) or not token:
            return JSONResponse({"error": "invalid_request"}, 400, headers=NO_STORE)
        claims = state.claims(token)
        if claims is None or claims["jti"] in state.revoked:
            return JSONResponse({"active": False}, headers=NO_STORE)
        answer = {"active": True, "token_type": "Bearer", **claims}
        return JSONResponse(answer, headers=NO_STORE)

    async def revoke(request: Request) -> Response:
        if not state.client_ok(request):
            return JSONResponse({"error": "invalid_client"}, 401, headers={"WWW-Authenticate": "Basic"})
        form = await request.form()
        token = form.get("token")
        claims = state.claims(token, verify_exp=False) if isinstance(token, str) else None
        if claims is not None:
            state.revoked.add(claims["jti"])
        return Response(status_code=200)  # RFC 7009 §2.2: 200 whether or not the token was valid

    async def stats(request: Request) -> Response:
        return JSONResponse(state.stats, headers=NO_STORE)

    async def rotate(request: Request) -> Response:
        return JSONResponse({"kid": state.rotate()})

    async def retire(request: Request) -> Response:
        kid = request.path_params["kid"]
        if kid not in state.keys:
            return JSONResponse({"error": "unknown kid"}, 404)
        if kid == state.current_kid:
            return JSONResponse({"error": "cannot retire the current signing key"}, 409)
        del state.keys[kid]
        return Response(status_code=204)

    async def fail(request: Request) -> Response:
        mode = request.query_params.get("mode", "")
        if mode not in ("ok", "down", "slow"):
            return JSONResponse({"error": "mode must be ok, down or slow"}, 400)
        state.mode = mode  # type: ignore[assignment]
        return JSONResponse({"mode": mode})

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[
            Route("/token", token, methods=["POST"]),
            Route("/.well-known/jwks.json", jwks),
            Route("/introspect", introspect, methods=["POST"]),
            Route("/revoke", revoke, methods=["POST"]),
            Route("/stats", stats),
            Route("/healthz", healthz),
            Route("/admin/rotate", rotate, methods=["POST"]),
            Route("/admin/retire/{kid}", retire, methods=["POST"]),
            Route("/admin/fail", fail, methods=["POST"]),
        ]
    )
    app.state.issuer = state
    return app
