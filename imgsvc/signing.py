"""Signed render URLs: HMAC-SHA256 over the canonical spec, key rotation by `kid`, optional expiry.

Pure and stdlib-only, so the main application can import it (through `imgsvc.client`) to sign
URLs without a network call. The signature covers the canonical form, never the raw query string.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from imgsvc.errors import Forbidden, InvalidParameter
from imgsvc.spec import ParsedQuery, TransformSpec

SIGNATURE_CHARS = 32  # 192 bits of the HMAC, base64url


@dataclass(frozen=True, slots=True)
class Keyring:
    """Signing keys by id; the first signs, every listed one verifies (rotation without downtime)."""

    keys: Mapping[str, bytes]
    current: str

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[str, str]]) -> Keyring | None:
        if not pairs:
            return None
        return cls({kid: secret.encode() for kid, secret in pairs}, pairs[0][0])


def signing_payload(image_id: str, spec: TransformSpec, kid: str, exp: int | None) -> bytes:
    return f"imgsvc-v1\n/img/{image_id}\n{spec.canonical_query()}\nkid={kid}\nexp={exp or ''}".encode()


def signature(key: bytes, image_id: str, spec: TransformSpec, kid: str, exp: int | None) -> str:
    digest = hmac.new(key, signing_payload(image_id, spec, kid, exp), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")[:SIGNATURE_CHARS]


def signed_query(keyring: Keyring, image_id: str, spec: TransformSpec, exp: int | None = None) -> str:
    """The canonical query of `spec` with `kid`, `exp` and `s` appended: what a signed URL carries."""
    kid = keyring.current
    sig = signature(keyring.keys[kid], image_id, spec, kid, exp)
    parts = [spec.canonical_query(), f"kid={kid}", *([f"exp={exp}"] if exp is not None else []), f"s={sig}"]
    return "&".join(part for part in parts if part)


@dataclass(frozen=True, slots=True)
class Grant:
    """What a request's URL proves on its own: nothing (unsigned), or a valid signature (maybe expiring)."""

    signed: bool
    expires: int | None = None


UNSIGNED = Grant(signed=False)


def verify(keyring: Keyring | None, image_id: str, query: ParsedQuery, now: float | None = None) -> Grant:
    """Check `s`/`kid`/`exp`; raise Forbidden for a bad, unknown-key or expired signature."""
    sig = query.signature
    if sig.s is None:
        if sig.kid is not None or sig.exp is not None:
            raise Forbidden("kid and exp are only meaningful with a signature (s)", param="s")
        return UNSIGNED
    if keyring is None:
        raise Forbidden("this server verifies no signatures", param="s")
    kid = sig.kid or keyring.current
    key = keyring.keys.get(kid)
    if key is None:
        raise Forbidden("unknown signing key", param="kid")
    expected = signature(key, image_id, query.spec, kid, sig.exp)
    if not hmac.compare_digest(expected.encode(), sig.s.encode()):
        raise Forbidden("the signature does not match this URL", param="s")
    if sig.exp is not None and sig.exp <= (time.time() if now is None else now):
        raise Forbidden("the signed URL has expired", param="exp")
    return Grant(signed=True, expires=sig.exp)


@dataclass(frozen=True, slots=True)
class UrlPolicy:
    """Which render URLs are served: signed ones, or unsigned ones within the size allow-list."""

    keyring: Keyring | None = None
    unsigned_sizes: frozenset[int] | None = None  # None: any size within the limits
    require_signed: bool = False

    def grant(self, image_id: str, query: ParsedQuery, now: float | None = None) -> Grant:
        grant = verify(self.keyring, image_id, query, now)
        if grant.signed:
            return grant
        if self.require_signed:
            raise Forbidden("this server only serves signed render URLs", param="s")
        if self.unsigned_sizes is not None:
            for param, size in (("w", query.spec.width), ("h", query.spec.height)):
                if size is not None and size not in self.unsigned_sizes:
                    allowed = ", ".join(map(str, sorted(self.unsigned_sizes)))
                    raise InvalidParameter(
                        f"an unsigned URL may only ask for these sizes (after dpr): {allowed}; "
                        "use a preset or a signed URL",
                        param=param,
                    )
        return grant
