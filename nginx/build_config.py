"""Build nginx/nginx.conf from nginx/imgsvc.conf.template (production values), or with overrides.

Only upper-case `${NAME}`s are substituted, so nginx's own `$variables` pass through untouched.
Usage: python nginx/build_config.py [--set NAME=VALUE ...] [-o PATH | -o -] [--check]
"""

from __future__ import annotations

import argparse
import re
import string
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "imgsvc.conf.template"
CONFIG = HERE / "nginx.conf"

BANNER = "# GENERATED from imgsvc.conf.template by `python nginx/build_config.py`: edit the template, not this file.\n"

PRODUCTION: Mapping[str, str] = {
    "USER": "www-data",  # Debian's nginx user ("nginx" in the official nginx image)
    "PID": "/run/nginx.pid",
    "ERROR_LOG": "/var/log/nginx/error.log",
    "ACCESS_LOG": "/var/log/nginx/access.log",
    "TEMP_DIR": "/var/lib/nginx",
    "CACHE_DIR": "/var/cache/nginx",
    "CACHE_MAX_SIZE": "20g",
    "CACHE_MIN_FREE": "2g",
    # How long a 200 stays fresh: an nginx time, or "second" (until the second it was fetched or revalidated
    # in ends: deletes leave within 1 s by revalidation, without the deny-list, at one 304 per hot variant a second).
    "CACHE_VALID": "10m",
    # "on": deleted images leave within 1 s through a Lua deny-list imgsvc feeds (IMGSVC_PURGE_NGINX); "off": no
    # Lua module needed, deletes leave when CACHE_VALID ends.
    "DENY_LIST": "on",
    "DENY_LIST_SIZE": "16m",  # the shared dict: ~100,000 ids deleted within DENY_LIST_SECONDS
    "PURGE_LISTEN": "127.0.0.1:8082",  # the feed; an address imgsvc's replicas reach when they run elsewhere
    "MODULES_DIR": "/usr/lib/nginx/modules",  # Debian's, and the nginx.org packages'
    "LISTEN": "80",
    "RENDER_LISTEN": "127.0.0.1:8081",
    "UPSTREAM": "127.0.0.1:8080",  # imgsvc: IMGSVC_HOST:IMGSVC_PORT; several replicas comma-separated
    "MAX_BODY": "25000000",  # = IMGSVC_MAX_UPLOAD_BYTES
    "STRIP_CACHE_TAGS": "off",  # "on" when browsers, not a CDN, are nginx's clients
}
# Switches: on/off values that stand for directives in the template.
SWITCHES: Mapping[str, Mapping[str, str]] = {
    "STRIP_CACHE_TAGS": {
        "off": "# STRIP_CACHE_TAGS=off: Surrogate-Key and Cache-Tag reach the client (a CDN).",
        "on": "proxy_hide_header Surrogate-Key; proxy_hide_header Cache-Tag;",
    },
}


DENY_MARGIN = (
    60  # seconds a deleted id outlives CACHE_VALID: a request in flight at the delete may still store its answer
)
_BLOCK = re.compile(r"^# @if (?P<name>[A-Z_]+)\n(?P<then>.*?)(?:^# @else\n(?P<otherwise>.*?))?^# @end\n", re.M | re.S)
_TIME = re.compile(r"(\d+)(ms|s|m|h|d|w|M|y)?")
_UNIT = {"ms": 0.001, "s": 1, "": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "M": 2592000, "y": 31536000}


def nginx_seconds(value: str) -> float:
    """An nginx time ("10m", "1h30m", "90") in seconds; "second" is 1."""
    if value == "second":
        return 1
    parts = _TIME.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"not an nginx time: {value!r}")
    return sum(int(n) * _UNIT[u] for n, u in parts)


class ConfTemplate(string.Template):
    """`${NAME}` with NAME in upper case, and nothing else: `$uri`, `${request_id}` stay nginx's."""

    flags = re.VERBOSE  # not IGNORECASE: lower-case names belong to nginx
    pattern = r"""
        \$\{(?P<braced>[A-Z][A-Z0-9_]*)\}
        | (?P<escaped>(?!))
        | (?P<named>(?!))
        | (?P<invalid>(?!))
    """


def build(values: Mapping[str, str] | None = None, **overrides: str) -> str:
    """The template with PRODUCTION values updated by `values` and `overrides`; every name must be known and used."""
    merged = {**PRODUCTION, **(values or {}), **overrides}
    template = ConfTemplate(TEMPLATE.read_text())
    switched = {m["name"] for m in _BLOCK.finditer(template.template)}
    names = (set(template.get_identifiers()) | switched) - {"RENDER_TIER_EXPIRES", "DENY_LIST_SECONDS"}  # derived
    if unknown := sorted(set(merged) - names):
        raise KeyError(f"not in {TEMPLATE.name}: {', '.join(unknown)}")
    if missing := sorted(names - set(merged)):
        raise KeyError(f"no value for: {', '.join(missing)}")
    # Switched blocks first (their ${NAME}s count as used either way).
    if merged["DENY_LIST"] not in ("on", "off"):
        raise ValueError(f"DENY_LIST must be one of on, off, not {merged['DENY_LIST']!r}")
    text = _BLOCK.sub(lambda m: m["then"] if merged[m["name"]] == "on" else (m["otherwise"] or ""), template.template)
    merged["DENY_LIST_SECONDS"] = str(round(nginx_seconds(merged["CACHE_VALID"]) + DENY_MARGIN))
    # From CACHE_VALID: the render tier's X-Accel-Expires, and the public tier's validity without it.
    if merged["CACHE_VALID"] == "second":
        merged["CACHE_VALID"] = "1s"  # only for an answer that lacks the X-Accel-Expires
        merged["RENDER_TIER_EXPIRES"] = "add_header X-Accel-Expires $img_fresh_until;"
    else:
        merged["RENDER_TIER_EXPIRES"] = f"# CACHE_VALID={merged['CACHE_VALID']}: the public tier's proxy_cache_valid"
    for name, choices in SWITCHES.items():
        if merged[name] not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, not {merged[name]!r}")
        merged[name] = choices[merged[name]]
    # One `server` line per replica: "a:8080,b:8080" -> "a:8080;\n        server b:8080".
    merged["UPSTREAM"] = ";\n        server ".join(part.strip() for part in merged["UPSTREAM"].split(","))
    return BANNER + ConfTemplate(text).substitute(merged)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a value")
    parser.add_argument("-o", "--output", default=str(CONFIG), help="where to write ('-' for stdout)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the output file differs from the built config")
    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set if "=" in item)
    if len(overrides) != len(args.set):
        parser.error("--set takes NAME=VALUE")
    text = build(overrides)
    if args.check:
        current = Path(args.output).read_text() if Path(args.output).exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run python nginx/build_config.py", file=sys.stderr)
            return 1
        return 0
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
