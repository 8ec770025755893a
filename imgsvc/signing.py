"""Signed render URLs: HMAC-SHA256 over the canonical spec, key rotation by `kid`, optional expiry.

Pure and stdlib-only, so the main application can import it (through `imgsvc.client`) to sign
URLs without a network call. The signature covers the canonical form, never the raw query string.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from imgsvc.config import DEFAULT_UNSIGNED_QUALITIES, DEFAULT_WIDTHS, UNSIGNED_FORMATS, UNSIGNED_GRAVITIES, Settings
from imgsvc.errors import Forbidden, InvalidParameter
from imgsvc.spec import (
    DEFAULT_BACKGROUND,
    DEFAULT_PRESETS,
    ParsedQuery,
    Presets,
    SpecLimits,
    TransformSpec,
    parse_query,
)

_V = TypeVar("_V", int, float, str)

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
class UnsignedSpace:
    """The variants an unsigned URL may name, checked on the canonical spec; None allows any value."""

    sizes: frozenset[int] | None = frozenset(DEFAULT_WIDTHS)  # w and h, after dpr
    qualities: frozenset[int] | None = frozenset(DEFAULT_UNSIGNED_QUALITIES)
    formats: frozenset[str] | None = frozenset(UNSIGNED_FORMATS)
    gravities: frozenset[str] | None = frozenset(UNSIGNED_GRAVITIES)
    blurs: frozenset[float] | None = frozenset()  # only "no blur"
    backgrounds: frozenset[str] | None = frozenset({DEFAULT_BACKGROUND})

    @classmethod
    def allowing(
        cls,
        sizes: Iterable[int] | None,
        qualities: Iterable[int] | None,
        formats: Iterable[str] | None,
        gravities: Iterable[str] | None,
        *,
        effects: bool = False,
    ) -> UnsignedSpace:
        """The space of the settings' lists (None: any value); `effects` allows any blur and bg as well."""
        return cls(
            _values(sizes),
            _values(qualities),
            _values(formats),
            _values(gravities),
            None if effects else frozenset(),
            None if effects else frozenset({DEFAULT_BACKGROUND}),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> UnsignedSpace:
        """What a server with these settings serves unsigned: the `IMGSVC_UNSIGNED_*` lists and its presets."""
        return cls.allowing(
            settings.unsigned_widths,
            settings.unsigned_qualities,
            settings.unsigned_formats,
            settings.unsigned_gravities,
            effects=settings.unsigned_effects,
        ).with_presets(settings.presets, SpecLimits(max_output_dim=settings.max_output_dim))

    def with_presets(self, presets: Presets, limits: SpecLimits) -> UnsignedSpace:
        """Also allow every value a preset sets, so that a preset is unsigned however it is spelled."""
        specs = [parse_query(items, replace(limits, presets={})).spec for items in presets.values()]
        return UnsignedSpace(
            _union(self.sizes, [size for spec in specs for size in (spec.width, spec.height) if size is not None]),
            _union(self.qualities, [spec.quality for spec in specs if spec.quality is not None]),
            _union(self.formats, [spec.format for spec in specs if spec.format is not None]),
            _union(self.gravities, [spec.gravity for spec in specs]),
            _union(self.blurs, [spec.blur for spec in specs if spec.blur is not None]),
            _union(self.backgrounds, [spec.background for spec in specs]),
        )

    def check(self, spec: TransformSpec) -> None:
        """Raise InvalidParameter naming the first parameter of `spec` outside this space."""
        for param, size in (("w", spec.width), ("h", spec.height)):
            if size is not None:
                _require(param, size, self.sizes, "these sizes (after dpr)")
        if spec.quality is not None:
            _require("q", spec.quality, self.qualities, "these qualities")
        if spec.format is not None:
            _require("fmt", spec.format, self.formats, "these formats")
        _require("g", spec.gravity, self.gravities, "these gravities")
        if spec.blur is not None:
            _require("blur", spec.blur, self.blurs, "these blurs")
        _require("bg", spec.background, self.backgrounds, "these backgrounds")


def _values(allowed: Iterable[_V] | None) -> frozenset[_V] | None:
    return None if allowed is None else frozenset(allowed)


def _union(allowed: frozenset[_V] | None, more: list[_V]) -> frozenset[_V] | None:
    return None if allowed is None else allowed | frozenset(more)


def _require(param: str, value: _V, allowed: frozenset[_V] | None, what: str) -> None:
    if allowed is None or value in allowed:
        return
    if not allowed or allowed == {DEFAULT_BACKGROUND}:
        raise InvalidParameter(f"an unsigned URL may not set {param}: use a preset or a signed URL", param=param)
    shown = ", ".join(map(str, sorted(allowed)))
    raise InvalidParameter(
        f"an unsigned URL may only ask for {what}: {shown}; use a preset or a signed URL", param=param
    )


# What servers with the default settings serve unsigned (and so what the client leaves unsigned).
DEFAULT_UNSIGNED = UnsignedSpace().with_presets(DEFAULT_PRESETS, SpecLimits())


@dataclass(frozen=True, slots=True)
class UrlPolicy:
    """Which render URLs are served: signed ones, or unsigned ones inside the allow-listed space."""

    keyring: Keyring | None = None
    unsigned: UnsignedSpace | None = DEFAULT_UNSIGNED  # None: any variant within the limits
    require_signed: bool = False

    def grant(self, image_id: str, query: ParsedQuery, now: float | None = None) -> Grant:
        grant = verify(self.keyring, image_id, query, now)
        if grant.signed:
            return grant
        if self.require_signed:
            raise Forbidden("this server only serves signed render URLs", param="s")
        if self.unsigned is not None:
            self.unsigned.check(query.spec)
        return grant
