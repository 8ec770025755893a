"""Parsers of `IMGSVC_*` values (each raises ValueError with a message for the operator) and how
`config --check` shows them."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

from imgsvc.spec import format_presets

# Asymmetric JWS algorithms only (RFC 8725 §3.1): a token can never be verified with a shared secret.
JwtAlgorithm = Literal["EdDSA", "ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_int(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text.strip().replace("_", ""))
        if value < low or (high is not None and value > high):
            raise ValueError(f"must be between {low} and {high if high is not None else 'any'}, got {value}")
        return value

    return parse


def parse_float(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text.strip())
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def parse_choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {text!r}")
        return value

    return parse


def parse_widths(text: str) -> tuple[int, ...] | None:
    if text.strip() == "*":
        return None
    values = tuple(sorted({parse_int(1, 100_000)(part) for part in text.split(",") if part.strip()}))
    if not values:
        raise ValueError("needs at least one width, or * for any")
    return values


def parse_scales(text: str) -> tuple[int, ...]:
    """Comma-separated reductions out of 2, 4, 8 (1/n of the size); `none` for none."""
    if text.strip().lower() == "none":
        return ()
    values = tuple(sorted({parse_choice(("2", "4", "8"))(part.strip()) for part in text.split(",") if part.strip()}))
    if not values:
        raise ValueError("needs at least one of 2, 4, 8, or none")
    return tuple(int(v) for v in values)


def parse_any_or(parse: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...] | None]:
    """A comma-separated list parsed item by item (sorted, deduplicated), or `*` for any value (None)."""

    def parse_list(text: str) -> tuple[Any, ...] | None:
        if text.strip() == "*":
            return None
        values = tuple(sorted({parse(part) for part in text.split(",") if part.strip()}))
        if not values:
            raise ValueError("needs at least one value, or * for any")
        return values

    return parse_list


def parse_member(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        if value not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(options)}")
        return value

    return parse


def parse_signing_keys(text: str) -> tuple[tuple[str, str], ...]:
    keys: list[tuple[str, str]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        kid, sep, secret = part.partition(":")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", kid) or len(secret) < 32:
            raise ValueError("expected kid:secret pairs separated by commas; kid [A-Za-z0-9_-]{1,32}, secret 32+ chars")
        if kid in dict(keys):
            raise ValueError(f"key id {kid!r} is given twice")
        keys.append((kid, secret))
    return tuple(keys)


def parse_storage_url(text: str) -> str:
    if not (text.startswith(("file:///", "s3://")) or text == "postgres:"):
        raise ValueError(f"expected file:///absolute/path, s3://bucket/prefix or postgres:, got {text!r}")
    return text


def parse_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {text!r}")
    return text


def parse_urls(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(parse_url(part.strip()) for part in text.split(",") if part.strip()))


def parse_prefix(text: str) -> str:
    """A Cloudflare purge prefix: host/path without scheme, query or spaces."""
    value = text.strip()
    if "://" in value or not re.fullmatch(r"[A-Za-z0-9.-]+(:\d+)?/[^\s?#]*", value):
        raise ValueError(f"expected host/path/ without a scheme, e.g. img.example.com/img/, got {text!r}")
    return value


def parse_algorithms(text: str) -> tuple[JwtAlgorithm, ...]:
    parse = parse_member(get_args(JwtAlgorithm))
    names = tuple(dict.fromkeys(parse(part) for part in text.split(",") if part.strip()))
    if not names:
        raise ValueError("needs at least one algorithm")
    return names  # type: ignore[return-value]  # each one checked by parse_member


def parse_database_url(text: str) -> str:
    if not text.startswith(("postgres://", "postgresql://")):
        raise ValueError("expected a postgresql:// DSN")
    return text


def parse_public_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise ValueError("expected an http:// or https:// base URL")
    return text.rstrip("/")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


def mask_secret(secret: str) -> str:
    """Hide a DSN's password but keep the rest, which operators need to see; hide other secrets whole."""
    scheme, sep, rest = secret.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if sep and at:
        return f"{scheme}://{userinfo.partition(':')[0]}:****@{host}"
    return "****"


def show_value(value: object) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "(none)"
    if isinstance(value, Mapping):
        return format_presets(value) or "(none)"
    return str(value)


def parse_origin(text: str) -> str:
    """A web origin as browsers send it in `Origin`: scheme://host[:port], lower case, default port left out."""
    value = text.strip()
    if value == "*" or value == "null":
        raise ValueError(f"{value} is not accepted: list each origin (README, Decisions: CORS)")
    match = re.fullmatch(r"(https?)://([a-z0-9.-]+|\[[0-9a-f:.]+\])(?::(\d{1,5}))?", value, re.IGNORECASE)
    if match is None:
        raise ValueError(f"expected scheme://host[:port] without a path, e.g. https://app.example.com, got {text!r}")
    scheme, host, port = match[1].lower(), match[2].lower(), match[3]
    if port is not None and not 1 <= int(port) <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    if port is None or int(port) == {"http": 80, "https": 443}[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{int(port)}"


def parse_origins(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(parse_origin(part) for part in text.split(",") if part.strip()))
