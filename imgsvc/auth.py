"""Who is calling: the `Principal`, the verifier seam, and `authorize()`.

Identity belongs to the main application; imgsvc only verifies its tokens. Mode `none`
(loopback development only) treats every caller as the `anonymous` owner.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Protocol

from starlette.requests import HTTPConnection

from imgsvc.catalog import ImageRecord
from imgsvc.errors import Forbidden, Unauthorized

log = logging.getLogger("imgsvc.auth")
Scope = Literal["images:read", "images:write", "images:admin"]
ALL_SCOPES: frozenset[str] = frozenset({"images:read", "images:write", "images:admin"})


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    scopes: frozenset[str]

    def has(self, scope: Scope) -> bool:
        return scope in self.scopes or "images:admin" in self.scopes


ANONYMOUS = Principal("anonymous", ALL_SCOPES - {"images:admin"})


class Verifier(Protocol):
    async def verify(self, token: str) -> Principal:
        """The principal a bearer token stands for; raise Unauthorized when it is not valid."""

    async def close(self) -> None: ...


class NoAuth:
    """Mode `none`: no token needed, everyone is `anonymous` (refused on non-loopback binds by config)."""

    def __init__(self) -> None:
        log.warning("IMGSVC_AUTH=none: every caller is 'anonymous' with read and write rights (loopback only)")

    async def verify(self, token: str) -> Principal:
        return ANONYMOUS

    async def close(self) -> None:
        return None


def bearer_token(conn: HTTPConnection) -> str | None:
    """The token of `Authorization: Bearer ...`; tokens anywhere else (query, cookies) are ignored."""
    scheme, _, token = conn.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def authenticate(conn: HTTPConnection, verifier: Verifier, *, required: bool) -> Principal | None:
    token = bearer_token(conn)
    if isinstance(verifier, NoAuth):
        return ANONYMOUS
    if token is None:
        if required:
            raise Unauthorized("a bearer token is required", headers={"WWW-Authenticate": 'Bearer realm="imgsvc"'})
        return None
    return await verifier.verify(token)


def authorize(principal: Principal, scope: Scope, image: ImageRecord | None = None) -> None:
    """Raise Forbidden unless the principal holds the scope and, for an image, owns it (or is admin)."""
    if not principal.has(scope):
        raise Forbidden(
            f"this token lacks the {scope} scope", headers={"WWW-Authenticate": 'Bearer error="insufficient_scope"'}
        )
    if image is not None and image.owner != principal.subject and "images:admin" not in principal.scopes:
        raise Forbidden("this image belongs to someone else")


def may_view(principal: Principal | None, image: ImageRecord) -> bool:
    """Whether a render of this image may be served to this caller without a signature."""
    if image.visibility == "public":
        return True
    return principal is not None and (principal.subject == image.owner or "images:admin" in principal.scopes)
