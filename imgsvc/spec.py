"""The render query: raw query items -> one canonical `TransformSpec`, plus output-format negotiation.

Pure: no I/O; imports only the standard library and `imgsvc.errors`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from types import MappingProxyType
from typing import Literal, cast, get_args
from urllib.parse import parse_qsl

from imgsvc.errors import InvalidParameter

Fit = Literal["cover", "contain", "fill", "inside", "outside"]
Gravity = Literal["center", "north", "south", "east", "west", "ne", "nw", "se", "sw", "smart", "entropy"]
RequestedFormat = Literal["auto", "jpeg", "png", "webp", "avif", "gif"]
OutputFormat = Literal["jpeg", "png", "webp", "avif", "gif"]
SourceFormat = Literal["jpeg", "png", "webp", "gif", "avif", "heif", "tiff"]
AcceptToken = Literal["avif", "webp", "legacy"]
AutoHint = Literal["w", "dpr"]  # `w=auto` takes Sec-CH-Width, `dpr=auto` Sec-CH-DPR
PresetItems = tuple[tuple[str, str], ...]
Presets = Mapping[str, PresetItems]  # name -> its query items, as `IMGSVC_PRESETS` defines them

# png and gif are lossless here: their entry only completes the mapping, `q` never reaches them.
DEFAULT_QUALITY: Mapping[OutputFormat, int] = MappingProxyType(
    {"jpeg": 80, "webp": 80, "avif": 50, "png": 100, "gif": 100}
)
DEFAULT_BACKGROUND = "ffffff"
DEFAULT_PRESETS: Presets = MappingProxyType(
    {
        "thumbnail": (("w", "64"), ("h", "64"), ("fit", "cover")),
        "small": (("w", "128"),),
        "medium": (("w", "256"),),
        "large": (("w", "512"),),
        "full": (("w", "1024"),),
        "placeholder": (("w", "32"), ("fmt", "webp")),  # a few hundred bytes: small enough to inline
    }
)

_FITS: tuple[str, ...] = get_args(Fit)
_GRAVITIES: tuple[str, ...] = get_args(Gravity)
_FORMATS: tuple[str, ...] = get_args(RequestedFormat)
_KNOWN_KEYS = ("w", "h", "dpr", "fit", "g", "fmt", "q", "bg", "blur", "p", "v", "s", "kid", "exp")
_PRESET_FORBIDDEN = frozenset({"p", "v", "s", "kid", "exp"})
_INT = re.compile(r"[1-9][0-9]{0,8}")
_DPR = re.compile(r"[1-4](\.[0-9]{1,2})?")
_BLUR = re.compile(r"(0|[1-9][0-9]{0,2})(\.[0-9]{1,6})?")
_HEX = re.compile(r"[0-9a-fA-F]{3}|[0-9a-fA-F]{6}")
_TOKEN = re.compile(r"[A-Za-z0-9._-]{1,32}")
_SIG = re.compile(r"[A-Za-z0-9_-]{1,64}")
_KID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_EXP = re.compile(r"[1-9][0-9]{0,11}")
_PRESET_NAME = re.compile(r"[a-z0-9_-]{1,64}")
_QVALUE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")
_BLUR_MIN, _BLUR_MAX = Decimal("0.3"), Decimal("100")
_CENT = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class TransformSpec:
    """What the renderer does; `parse_query` only ever returns canonical (collapsed) instances."""

    width: int | None = None  # device pixels (w * dpr)
    height: int | None = None
    fit: Fit = "inside"
    gravity: Gravity = "center"
    format: RequestedFormat | None = None  # None = keep the original's family
    quality: int | None = None  # None = DEFAULT_QUALITY of the chosen format
    background: str = DEFAULT_BACKGROUND  # 6 lowercase hex digits (RGB)
    blur: float | None = None  # sigma, at most 2 decimals
    version: str | None = None  # the `v` token; ignored by the renderer
    auto: AutoHint | None = None  # a client-hint template: `resolve_hints` makes the spec that is rendered

    def canonical_query(self) -> str:
        """Alphabetical `key=value` pairs, defaults omitted, `v` included; never p/dpr/s/kid/exp."""
        return self._query(with_version=True)

    def render_key(self) -> str:
        """The canonical query without `v`: everything the rendered bytes depend on."""
        return self._query(with_version=False)

    def _query(self, *, with_version: bool) -> str:
        items: list[tuple[str, str]] = []
        if self.background != DEFAULT_BACKGROUND:
            items.append(("bg", self.background))
        if self.blur is not None:
            items.append(("blur", _format_blur(self.blur)))
        if self.auto == "dpr":
            items.append(("dpr", "auto"))
        if self.fit != "inside":
            items.append(("fit", self.fit))
        if self.format is not None:
            items.append(("fmt", self.format))
        if self.gravity != "center":
            items.append(("g", self.gravity))
        if self.height is not None:
            items.append(("h", str(self.height)))
        if self.quality is not None:
            items.append(("q", str(self.quality)))
        if with_version and self.version is not None:
            items.append(("v", self.version))
        if self.width is not None:
            items.append(("w", str(self.width)))
        elif self.auto == "w":
            items.append(("w", "auto"))
        return "&".join(f"{key}={value}" for key, value in items)


@dataclass(frozen=True, slots=True)
class SignatureParams:
    """The reserved signing parameters, checked for syntax only (verification happens elsewhere)."""

    s: str | None = None  # base64url without padding, 1..64 chars
    kid: str | None = None  # [A-Za-z0-9_-]{1,32}
    exp: int | None = None  # unix seconds


@dataclass(frozen=True, slots=True)
class ParsedQuery:
    spec: TransformSpec
    signature: SignatureParams
    preset: str | None  # the preset name used, if any


@dataclass(frozen=True, slots=True)
class SpecLimits:
    max_output_dim: int = 8192
    presets: Presets = field(default_factory=lambda: DEFAULT_PRESETS, hash=False)


_DEFAULT_LIMITS = SpecLimits()


def parse_query(items: Sequence[tuple[str, str]], limits: SpecLimits = _DEFAULT_LIMITS) -> ParsedQuery:
    """Validate the raw query (pairs in order) and reduce it to its canonical spec.

    Raises `InvalidParameter` (param = the offending key) on any unknown, duplicate, empty or malformed item.
    """
    raw: dict[str, str] = {}
    for key, value in items:
        if key not in _KNOWN_KEYS:
            raise InvalidParameter(f"unknown parameter {key[:40]!r}; allowed: {', '.join(_KNOWN_KEYS)}", param=key)
        if key in raw:
            raise InvalidParameter(f"parameter {key!r} is given more than once", param=key)
        if not value:
            raise InvalidParameter(f"parameter {key!r} has an empty value", param=key)
        raw[key] = value
    signature = SignatureParams(
        s=_match(raw.pop("s", None), "s", _SIG, "1..64 base64url characters [A-Za-z0-9_-] without padding"),
        kid=_match(raw.pop("kid", None), "kid", _KID, "1..32 characters [A-Za-z0-9_-]"),
        exp=_int(raw.pop("exp", None), "exp", _EXP, 1, 10**12 - 1, "an expiry in unix seconds"),
    )
    version = _match(raw.pop("v", None), "v", _TOKEN, "1..32 characters [A-Za-z0-9._-]")
    preset = raw.pop("p", None)
    values = raw
    if preset is not None:
        preset_items = limits.presets.get(preset)
        if preset_items is None:
            names = ", ".join(sorted(limits.presets)) or "(none configured)"
            raise InvalidParameter(f"p must name a preset; available: {names}", param="p")
        values = {**dict(preset_items), **raw}
    return ParsedQuery(_build_spec(values, version, limits), signature, preset)


def _build_spec(values: Mapping[str, str], version: str | None, limits: SpecLimits) -> TransformSpec:
    top = limits.max_output_dim
    auto = _parse_auto(values)
    width = None if auto == "w" else _int(values.get("w"), "w", _INT, 1, top, "a width in pixels")
    height = _int(values.get("h"), "h", _INT, 1, top, "a height in pixels")
    dpr = Decimal(1) if auto == "dpr" else _parse_dpr(values.get("dpr"))
    width, height = _scale(width, dpr, top), _scale(height, dpr, top)
    fit = cast(Fit, _choice(values.get("fit"), "fit", _FITS) or "inside")
    gravity = cast(Gravity, _choice(values.get("g"), "g", _GRAVITIES) or "center")
    fmt = _parse_format(values.get("fmt"))
    quality = _int(values.get("q"), "q", _INT, 1, 100, "a quality")
    background = _parse_background(values.get("bg"))
    blur = _parse_blur(values.get("blur"))
    # Collapse what the renderer would treat identically, so equivalent queries share one form.
    if width is None or height is None:
        fit = "inside"
    if fit not in ("cover", "contain") or (fit == "contain" and gravity in ("smart", "entropy")):
        gravity = "center"
    lossy = fmt in ("jpeg", "webp", "avif")
    if fmt in ("png", "gif") or (lossy and quality == DEFAULT_QUALITY[cast(OutputFormat, fmt)]):
        quality = None
    return TransformSpec(width, height, fit, gravity, fmt, quality, background, blur, version, auto)


def _parse_auto(values: Mapping[str, str]) -> AutoHint | None:
    if values.get("w") == "auto":
        if "dpr" in values:
            raise InvalidParameter("w=auto takes Sec-CH-Width, already in device pixels: drop dpr", param="dpr")
        return "w"
    if values.get("dpr") == "auto":
        if "w" not in values and "h" not in values:
            raise InvalidParameter("dpr=auto multiplies w or h: give one of them", param="dpr")
        return "dpr"
    return None


def _match(value: str | None, key: str, pattern: re.Pattern[str], allowed: str) -> str | None:
    if value is not None and not pattern.fullmatch(value):
        raise InvalidParameter(f"{key} must be {allowed}", param=key)
    return value


def _int(value: str | None, key: str, pattern: re.Pattern[str], low: int, high: int, what: str) -> int | None:
    if value is None:
        return None
    if not pattern.fullmatch(value) or not low <= int(value) <= high:
        raise InvalidParameter(f"{key} must be {what}: a decimal integer {low}..{high}", param=key)
    return int(value)


def _choice(value: str | None, key: str, allowed: tuple[str, ...]) -> str | None:
    if value is not None and value not in allowed:
        raise InvalidParameter(f"{key} must be one of: {', '.join(allowed)}", param=key)
    return value


def _parse_dpr(value: str | None) -> Decimal:
    if value is None:
        return Decimal(1)
    if not _DPR.fullmatch(value) or Decimal(value) > 4:
        raise InvalidParameter("dpr must be a number 1..4 with at most 2 decimals (e.g. 2 or 1.5)", param="dpr")
    return Decimal(value)


def _scale(size: int | None, dpr: Decimal, top: int) -> int | None:
    if size is None or dpr == 1:
        return size
    scaled = int((size * dpr).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    if scaled > top:
        raise InvalidParameter(f"{size} × dpr {dpr} = {scaled} pixels exceeds the maximum {top}", param="dpr")
    return scaled


def _parse_format(value: str | None) -> RequestedFormat | None:
    if value is not None and value.lower() == "jpg":
        raise InvalidParameter(f"fmt={value} is not accepted; use jpeg", param="fmt")
    return cast(RequestedFormat | None, _choice(value, "fmt", _FORMATS))


def _parse_background(value: str | None) -> str:
    if value is None:
        return DEFAULT_BACKGROUND
    if not _HEX.fullmatch(value):
        raise InvalidParameter("bg must be 3 or 6 hex digits without '#' (e.g. fff or 1a2b3c)", param="bg")
    value = value.lower()
    return "".join(c * 2 for c in value) if len(value) == 3 else value


def _parse_blur(value: str | None) -> float | None:
    if value is None:
        return None
    sigma = Decimal(value).quantize(_CENT, rounding=ROUND_HALF_UP) if _BLUR.fullmatch(value) else None
    if sigma is None or not _BLUR_MIN <= sigma <= _BLUR_MAX:
        raise InvalidParameter("blur must be a decimal sigma 0.3..100 (e.g. 2 or 0.5)", param="blur")
    return float(sigma)


def _format_blur(sigma: float) -> str:
    return f"{sigma:.2f}".rstrip("0").rstrip(".")


def parse_presets(text: str) -> Presets:
    """Parse the preset config syntax `name:query;name:query` (e.g. `thumbnail:w=64&h=64&fit=cover;small:w=128`).

    Raises ValueError naming the preset when a name or its query is malformed.
    """
    presets: dict[str, PresetItems] = {}
    for entry in text.split(";"):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, query = (part.strip() for part in entry.partition(":"))
        if not sep or not _PRESET_NAME.fullmatch(name):
            raise ValueError(f"malformed preset {entry!r}: expected name:query with a name of [a-z0-9_-]")
        if name in presets:
            raise ValueError(f"preset {name!r} is defined twice")
        items: PresetItems = tuple(parse_qsl(query, keep_blank_values=True))
        if not items:
            raise ValueError(f"preset {name!r} has no parameters")
        forbidden = sorted({key for key, _ in items} & _PRESET_FORBIDDEN)
        if forbidden:
            raise ValueError(f"preset {name!r} may not set {', '.join(forbidden)} (p, v, s, kid, exp are reserved)")
        try:
            parse_query(items, SpecLimits(presets={}))
        except InvalidParameter as exc:
            raise ValueError(f"preset {name!r}: {exc.detail}") from exc
        presets[name] = items
    return MappingProxyType(presets)


def format_presets(presets: Presets) -> str:
    """The config syntax of `presets`, which `parse_presets` reads back to the same mapping."""
    return ";".join(f"{name}:" + "&".join(f"{key}={value}" for key, value in items) for name, items in presets.items())


def accept_token(accept: str | None) -> AcceptToken:
    """Reduce an Accept header to avif > webp > legacy; only explicit image/avif or image/webp with q>0 count.

    A media range with a malformed q is ignored. Never raises.
    """
    best = {"image/avif": 0.0, "image/webp": 0.0}
    for media_range in (accept or "").split(","):
        media, _, params = media_range.partition(";")
        media = media.strip().lower()
        if media in best:
            best[media] = max(best[media], _qvalue(params))
    if best["image/avif"] > 0:
        return "avif"
    return "webp" if best["image/webp"] > 0 else "legacy"


def _qvalue(params: str) -> float:
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            value = value.strip()
            return float(value) if _QVALUE.fullmatch(value) else 0.0
    return 1.0


def choose_output_format(
    requested: RequestedFormat | None, accept: AcceptToken, source: SourceFormat, has_alpha: bool, animated: bool
) -> OutputFormat:
    """The encoder to use: explicit fmt as is; none keeps the family; auto negotiates from the Accept token."""
    legacy: OutputFormat = "png" if has_alpha else "jpeg"
    if requested is None:
        return legacy if source in ("heif", "tiff") else cast(OutputFormat, source)
    if requested != "auto":
        return requested
    if animated:
        return "webp" if accept in ("avif", "webp") else "gif"
    return legacy if accept == "legacy" else accept


def varies_on_accept(spec: TransformSpec) -> bool:
    """Whether the response depends on Accept (and so must send `Vary: Accept`): only for fmt=auto."""
    return spec.format == "auto"
