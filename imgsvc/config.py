"""Settings: one frozen object read from `IMGSVC_*` environment variables.

Every field documents itself (variable, group, default, help); all errors are reported at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from imgsvc.config_values import (
    JwtAlgorithm,
    is_loopback,
    mask_secret,
    parse_algorithms,
    parse_any_or,
    parse_bool,
    parse_choice,
    parse_database_url,
    parse_float,
    parse_int,
    parse_member,
    parse_origins,
    parse_prefix,
    parse_public_url,
    parse_scales,
    parse_signing_keys,
    parse_storage_url,
    parse_url,
    parse_urls,
    parse_widths,
    show_value,
)
from imgsvc.errors import InvalidParameter
from imgsvc.logs import LogFormat
from imgsvc.spec import DEFAULT_PRESETS, Presets, SpecLimits, parse_presets, parse_query

AuthMode = Literal["none", "introspect", "jwks"]
LogLevel = Literal["debug", "info", "warning", "error"]
Group = Literal["server", "storage", "auth", "render", "cache", "limits", "ops"]  # in the order they are shown
DEFAULT_JWT_ALGORITHMS: tuple[JwtAlgorithm, ...] = ("EdDSA", "ES256", "RS256")

DEFAULT_WIDTHS = (16, 32, 48, 64, 96, 128, 256, 384, 640, 750, 828, 1080, 1200, 1920, 2048, 3840)
UNSIGNED_FORMATS = ("auto", "jpeg", "png", "webp", "avif", "gif")  # every fmt: each is one encode of one size
UNSIGNED_GRAVITIES = ("center", "north", "south", "east", "west", "ne", "nw", "se", "sw")  # crops, not analyses
DEFAULT_UNSIGNED_QUALITIES = (60, 75, 85)
MiB = 1024 * 1024


def _setting(
    default: Any, help: str, *, group: Group, parse: Callable[[str], Any] | None = None, secret: bool = False
) -> Any:
    metadata = {"help": help, "group": group, "parse": parse, "secret": secret}
    if isinstance(default, Mapping):  # read-only (presets), but dataclasses refuse any unhashable default
        return field(default_factory=lambda: default, hash=False, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = _setting("127.0.0.1", "Bind address of the HTTP server.", group="server")
    port: int = _setting(8080, "Bind port of the HTTP server.", parse=parse_int(1, 65535), group="server")
    forwarded_allow_ips: str = _setting(
        "127.0.0.1",
        "Proxies (comma-separated addresses, or *) whose X-Forwarded-For/-Proto are trusted.",
        group="server",
    )
    data_dir: Path = _setting(
        Path("./imgsvc-data"),
        "Where the embedded defaults keep their state (Postgres, blobs).",
        parse=Path,
        group="storage",
    )
    database_url: str | None = _setting(
        None,
        "Postgres DSN; unset starts a private embedded Postgres in the data dir.",
        parse=parse_database_url,
        secret=True,
        group="storage",
    )
    storage_url: str | None = _setting(
        None,
        "Blob store: file:///path, s3://bucket/prefix, or postgres: (bytea rows in the catalog "
        "database); unset means file://<data dir>/blobs.",
        parse=parse_storage_url,
        group="storage",
    )
    s3_endpoint_url: str | None = _setting(
        None, "S3-compatible endpoint (unset: AWS S3).", parse=parse_url, group="storage"
    )
    s3_region: str | None = _setting(
        None, "S3 region (unset: AWS_REGION / AWS_DEFAULT_REGION / AWS config).", group="storage"
    )
    s3_access_key_id: str | None = _setting(
        None, "S3 access key (unset: the usual AWS credential chain).", group="storage"
    )
    s3_secret_access_key: str | None = _setting(None, "S3 secret key (unset: the usual AWS credential chain).",
                                                secret=True, group="storage")  # fmt: skip
    s3_path_style: bool = _setting(
        False,
        "Path-style S3 addressing (http://host/bucket/key), which most S3-compatible stores need.",
        parse=parse_bool,
        group="storage",
    )
    public_url: str | None = _setting(
        None,
        "Base URL used in the ready-made URLs of image JSON; unset means http://host:port.",
        parse=parse_public_url,
        group="server",
    )
    auth: AuthMode = _setting(
        "none",
        "Token verification: introspect (ask the main app), jwks (verify locally with its keys), or none "
        "(every caller is 'anonymous'; loopback only).",
        parse=parse_choice(get_args(AuthMode)),
        group="auth",
    )
    auth_introspect_url: str | None = _setting(
        None, "The main app's RFC 7662 introspection endpoint.", parse=parse_url, group="auth"
    )
    auth_client_id: str | None = _setting(
        None, "Client id imgsvc presents to the introspection endpoint.", group="auth"
    )
    auth_client_secret: str | None = _setting(
        None, "Client secret imgsvc presents to the introspection endpoint.", secret=True, group="auth"
    )
    auth_cache_ttl: float = _setting(
        60.0,
        "Longest time an active introspection answer is reused (also capped by the token's exp).",
        parse=parse_float(1, 3600),
        group="auth",
    )
    auth_jwks_url: str | None = _setting(None, "The main app's JWKS URL (auth=jwks).", parse=parse_url, group="auth")
    auth_issuer: str | None = _setting(None, "Required `iss` of tokens (auth=jwks).", group="auth")
    auth_audience: str | None = _setting(
        None, "Required `aud` of tokens: this service's name at the main app (required for jwks).", group="auth"
    )
    auth_algorithms: tuple[JwtAlgorithm, ...] = _setting(
        DEFAULT_JWT_ALGORITHMS,
        "Accepted JWT algorithms, asymmetric only (auth=jwks).",
        parse=parse_algorithms,
        group="auth",
    )
    upload_rate: int = _setting(
        60,
        "Uploads per minute per subject (bursts up to the same number); 0 disables the limit.",
        parse=parse_int(0, 1_000_000),
        group="limits",
    )
    signing_keys: tuple[tuple[str, str], ...] = _setting(
        (),
        "Render URL signing keys as kid:secret,...; the first signs, all verify.",
        parse=parse_signing_keys,
        secret=True,
        group="auth",
    )
    require_signed: bool = _setting(False, "Every render URL needs a valid signature.", parse=parse_bool, group="auth")
    unsigned_widths: tuple[int, ...] | None = _setting(
        DEFAULT_WIDTHS,
        "Sizes (w or h, after dpr) an unsigned URL may ask for, comma-separated; * allows any within limits.",
        parse=parse_widths,
        group="auth",
    )
    workers: int = _setting(
        (os.cpu_count() or 1) + 1,
        "Render worker threads (concurrent renders); one more than the cores keeps them busy while a render "
        "waits on Python or I/O.",
        parse=parse_int(1, 256),
        group="render",
    )
    render_queue: int = _setting(
        64,
        "Renders that may wait for a worker; beyond this a render is refused with 503.",
        parse=parse_int(0, 100_000),
        group="render",
    )
    render_timeout: float = _setting(
        10.0, "Deadline of one render in seconds.", parse=parse_float(0.1, 600), group="render"
    )
    cache_bytes: int = _setting(
        256 * MiB, "Rendered-variant LRU budget in bytes; 0 disables it.", parse=parse_int(0), group="cache"
    )
    originals_cache_bytes: int = _setting(
        64 * MiB,
        "Budget in bytes of the LRU of recently read originals; 0 disables it.",
        parse=parse_int(0),
        group="cache",
    )
    decoded_cache_bytes: int = _setting(
        128 * MiB,
        "Budget in bytes of the LRU of decoded JPEG/PNG originals (one entry per JPEG scale), so that more "
        "sizes of a recent original skip its decode; 0 disables it. Larger decodes than a quarter are not kept.",
        parse=parse_int(0),
        group="cache",
    )
    max_upload_bytes: int = _setting(
        25_000_000, "Largest accepted upload body in bytes.", parse=parse_int(1), group="limits"
    )
    upload_idle_timeout: float = _setting(
        30.0,
        "An upload whose body stops arriving for this many seconds is answered 408.",
        parse=parse_float(0.1, 3600),
        group="limits",
    )
    max_pixels: int = _setting(
        50_000_000,
        "Largest accepted image in pixels, summed over animation frames.",
        parse=parse_int(1),
        group="limits",
    )
    max_frames: int = _setting(
        100, "Most animation frames accepted in an upload.", parse=parse_int(1, 100_000), group="limits"
    )
    max_output_dim: int = _setting(
        8192, "Largest width or height of a rendered variant.", parse=parse_int(1, 65_535), group="render"
    )
    gc_grace_days: float = _setting(
        7.0,
        "Blobs no live image has referenced for this many days are removed by `imgsvc gc`.",
        parse=parse_float(0, 3650),
        group="ops",
    )
    gc_interval: float = _setting(
        0.0,
        "Seconds between garbage collections run by the service itself; 0 leaves it to `imgsvc gc`.",
        parse=parse_float(0, 30 * 86400),
        group="ops",
    )
    presets: Presets = _setting(
        DEFAULT_PRESETS,
        "Named render presets as name:query;name:query (?p=name).",
        parse=parse_presets,
        group="render",
    )
    drain_seconds: float = _setting(
        0.0,
        "After SIGTERM, seconds /readyz answers 503 while requests are still served (load balancer drain).",
        parse=parse_float(0, 600),
        group="server",
    )
    shutdown_timeout: float = _setting(
        20.0,
        "Then, seconds in-flight requests get to finish before the process stops.",
        parse=parse_float(0, 600),
        group="server",
    )
    access_log: bool = _setting(
        True,
        "One access-log line per request, queued and written in batches by a background thread (~10 µs a request).",
        parse=parse_bool,
        group="ops",
    )
    log_level: LogLevel = _setting("info", "Log level.", parse=parse_choice(get_args(LogLevel)), group="ops")
    database_timeout: float = _setting(
        5.0,
        "Seconds a catalog query, or the wait for a database connection, may take before the request is answered "
        "503 /problems/unavailable (migrations are not bound by it).",
        parse=parse_float(0.1, 600),
        group="storage",
    )
    record_ttl: float = _setting(
        30.0,
        "Seconds a replica trusts an image record it read (deletes evict it at once); during a database outage, "
        "renders of images whose record was read less than this long ago are still served.",
        parse=parse_float(0, 3600),
        group="cache",
    )

    unsigned_qualities: tuple[int, ...] | None = _setting(
        DEFAULT_UNSIGNED_QUALITIES,
        "Values of q an unsigned URL may ask for (a format's default quality needs no q), comma-separated; "
        "* allows 1..100.",
        parse=parse_any_or(parse_int(1, 100)),
        group="auth",
    )
    unsigned_formats: tuple[str, ...] | None = _setting(
        UNSIGNED_FORMATS,
        "Values of fmt an unsigned URL may ask for, comma-separated; * allows every format.",
        parse=parse_any_or(parse_member(UNSIGNED_FORMATS)),
        group="auth",
    )
    unsigned_gravities: tuple[str, ...] | None = _setting(
        UNSIGNED_GRAVITIES,
        "Values of g an unsigned URL may ask for, comma-separated; * also allows smart and entropy (which analyse "
        "the pixels).",
        parse=parse_any_or(parse_member((*UNSIGNED_GRAVITIES, "smart", "entropy"))),
        group="auth",
    )
    unsigned_effects: bool = _setting(
        False,
        "Unsigned URLs may also set blur and bg (any value, each a new render); presets always may.",
        parse=parse_bool,
        group="auth",
    )
    render_rate: int = _setting(
        120,
        "Render misses per minute per client address (after a trusted proxy's X-Forwarded-For); 0 disables "
        "the limit; images:admin tokens are exempt.",
        parse=parse_int(0, 1_000_000),
        group="limits",
    )
    render_burst: int = _setting(
        30,
        "Render misses one client address may make at once before IMGSVC_RENDER_RATE applies.",
        parse=parse_int(1, 1_000_000),
        group="limits",
    )
    max_jpeg_scans: int = _setting(
        100,
        "Most scans (SOS segments) in an accepted JPEG, counted from the bytes before decoding: libjpeg reads every "
        "scan over the whole image, so 10,000 empty scans in 474 KB cost ~16 s of CPU. Ordinary progressive JPEGs "
        "have 6-10; libtiff stops a JPEG inside a TIFF at 100 scans too.",
        parse=parse_int(1, 1_000_000),
        group="limits",
    )
    max_png_chunks: int = _setting(
        10_000,
        "Most PNG chunks (25 MB written in libpng's 8 KiB IDAT chunks are ~3,100; walking 10,000 takes ~3 ms).",
        parse=parse_int(3, 10_000_000),
        group="limits",
    )
    max_png_text_bytes: int = _setting(
        8_000_000,
        "Most bytes of PNG text (tEXt, zTXt, iTXt), summed and decompressed (a zTXt bomb is stopped there).",
        parse=parse_int(0),
        group="limits",
    )
    isolate_pixels: int = _setting(
        16_000_000,
        "WebP, AVIF and HEIF frames of more pixels are decoded in a child process killed at the deadline: their "
        "decoders cannot be interrupted (a 16 MP frame overshoots a deadline by ~0.7 s in-process); 0 isolates all.",
        parse=parse_int(0),
        group="render",
    )
    header_timeout: float = _setting(
        10.0,
        "Seconds a client has to send a request's complete headers, counted from the connection's start or the "
        "request's first byte; then 408 and the connection is closed.",
        parse=parse_float(0.5, 600),
        group="limits",
    )
    body_min_rate: int = _setting(
        1024,
        "Least upload rate in bytes per second, averaged over each IMGSVC_BODY_RATE_WINDOW; a slower body gets "
        "408. 0 leaves only IMGSVC_UPLOAD_IDLE_TIMEOUT.",
        parse=parse_int(0, 1_000_000_000),
        group="limits",
    )
    body_rate_window: float = _setting(
        10.0, "Seconds over which IMGSVC_BODY_MIN_RATE is averaged.", parse=parse_float(0.5, 600), group="limits"
    )
    max_connections: int = _setting(
        1000,
        "Most open client connections; one more is answered 503 and closed at once, so that clients cannot "
        "exhaust file descriptors.",
        parse=parse_int(1, 1_000_000),
        group="limits",
    )
    backlog: int = _setting(
        2048,
        "Listen backlog: connections the kernel queues before imgsvc accepts them (capped by net.core.somaxconn).",
        parse=parse_int(1, 65_535),
        group="server",
    )
    s3_connect_timeout: float = _setting(
        2.0, "Seconds to open a connection to S3, per attempt.", parse=parse_float(0.1, 60), group="storage"
    )
    s3_read_timeout: float = _setting(
        5.0,
        "Seconds S3 may stay silent while answering (per read, per attempt).",
        parse=parse_float(0.1, 300),
        group="storage",
    )
    s3_max_attempts: int = _setting(
        3, "Attempts per S3 request, the first included (botocore standard retries, jittered backoff); past "
        "them the request answers 503.", parse=parse_int(1, 10), group="storage",
    )  # fmt: skip
    purge_webhooks: tuple[str, ...] = _setting(
        (),
        "CDN purge: URLs (comma-separated) that receive a signed JSON POST for every deleted image.",
        parse=parse_urls,
        group="cache",
    )
    purge_webhook_secret: str | None = _setting(
        None,
        "CDN purge: HMAC-SHA256 key (16+ chars) of the webhooks' Imgsvc-Signature header; required with webhooks.",
        secret=True,
        group="cache",
    )
    purge_cloudflare_zone: str | None = _setting(
        None, "CDN purge: Cloudflare zone id whose cache is purged by tag (needs the token).", group="cache"
    )
    purge_cloudflare_token: str | None = _setting(
        None, "CDN purge: Cloudflare API token with Cache Purge permission.", secret=True, group="cache"
    )
    purge_cloudflare_url: str = _setting(
        "https://api.cloudflare.com/client/v4", "CDN purge: Cloudflare API base URL.", parse=parse_url, group="cache"
    )
    purge_cloudflare_prefix: str = _setting(
        "",
        "CDN purge: purge Cloudflare by URL prefix <this><image id> (e.g. img.example.com/img/) instead of by "
        "cache tag; empty purges the tag img-<id>.",
        parse=parse_prefix,
        group="cache",
    )
    purge_fastly_service: str | None = _setting(
        None, "CDN purge: Fastly service id purged by surrogate key (needs the key).", group="cache"
    )
    purge_fastly_key: str | None = _setting(
        None, "CDN purge: Fastly API token with purge_select scope.", secret=True, group="cache"
    )
    purge_fastly_url: str = _setting("https://api.fastly.com", "CDN purge: Fastly API base URL.", parse=parse_url,
                                     group="cache")  # fmt: skip
    purge_timeout: float = _setting(
        10.0, "CDN purge: seconds one purge request may take before it counts as failed.", parse=parse_float(0.1, 300),
        group="cache",
    )  # fmt: skip
    purge_retry_base: float = _setting(
        1.0, "CDN purge: first retry delay in seconds, doubled per failed attempt (jittered).",
        parse=parse_float(0.01, 3600), group="cache",
    )  # fmt: skip
    purge_retry_max: float = _setting(
        60.0, "CDN purge: longest retry delay in seconds: after a purge API comes back, the backlog is delivered "
        "within about this long.", parse=parse_float(0.01, 86400), group="cache",
    )  # fmt: skip
    purge_keep_days: float = _setting(
        7.0, "CDN purge: delivered purge jobs older than this are removed by garbage collection.",
        parse=parse_float(0, 3650), group="cache",
    )  # fmt: skip
    cache_tags: bool = _setting(
        True,
        "Tag every /img/ response with its image (`Surrogate-Key` and `Cache-Tag`: `img-<id>`), so a CDN can purge "
        "all variants of a deleted image at once.",
        parse=parse_bool,
        group="cache",
    )
    cors_origins: tuple[str, ...] = _setting(
        (),
        "Web origins (scheme://host[:port], comma-separated) whose pages may call the /images API from browsers "
        "with a bearer token (CORS); none by default; no * (see the README's Decisions).",
        parse=parse_origins,
        group="server",
    )
    console: bool | None = _setting(
        None,
        "Serve the console page at /console. Unset: on for `imgsvc serve` bound to a loopback address with the "
        "embedded database and blob store (make run), off otherwise.",
        parse=parse_bool,
        group="server",
    )
    purge_nginx: tuple[str, ...] = _setting(
        (),
        "nginx purge: every nginx node's deny-list feed (comma-separated base URLs, the nodes' PURGE_LISTEN, e.g. "
        "http://10.0.0.7:8082), sent every deleted image's id (retries capped at 1 s) and, after a node restarts, "
        "the deletes of its cache-validity window; a node with DENY_LIST=on serves no cache hit until then.",
        parse=parse_urls,
        group="cache",
    )
    purge_nginx_key: str | None = _setting(
        None,
        "nginx purge: the shared secret (16+ chars) the nodes' feeds require (their IMGSVC_PURGE_NGINX_KEY "
        "environment variable); required with IMGSVC_PURGE_NGINX.",
        secret=True,
        group="cache",
    )
    derive_scales: tuple[int, ...] = _setting(
        (4, 8),
        "Pyramid: reduced copies kept of each original, at 1/n of its size (n from 2, 4, 8; for a JPEG exactly "
        "what its DCT scaling decodes), derived after upload off the request path; a render starts from the "
        "smallest that leaves it at least 2x to resize. none: every render starts from the original.",
        parse=parse_scales, group="render",
    )  # fmt: skip
    derive_workers: int = _setting(
        1, "Pyramid and placeholders: derivations run at a time in this process (each on one worker thread, after "
        "queued renders); 0: this process derives nothing (another replica or `imgsvc derive` does).",
        parse=parse_int(0, 16), group="render",
    )  # fmt: skip
    derive_timeout: float = _setting(
        30.0, "Pyramid and placeholders: deadline of one original's derivation in seconds; a derivation left by a "
        "crash is taken again after twice this plus 10 s.",
        parse=parse_float(0.5, 600), group="render",
    )  # fmt: skip
    log_format: LogFormat = _setting(
        "auto",
        "Log lines as `json` (one object per line, for collectors) or `text` (one short line per event, for "
        "people); `auto`: text when stderr is a terminal, JSON otherwise.",
        parse=parse_choice(get_args(LogFormat)),
        group="ops",
    )
    processes: int = _setting(
        1,
        "imgsvc processes serving one port (SO_REUSEPORT: the kernel spreads connections over them), each with its "
        "own caches and IMGSVC_WORKERS render threads; for a host without nginx in front. The embedded Postgres "
        "is shared by all of them.",
        parse=parse_int(1, 64),
        group="ops",
    )
    views: bool = _setting(
        True,
        "Count views per image (GET /img/ answered 200 or 304) and flush them to the database in batches; "
        "GET /images/{id}/views reads them.",
        parse=parse_bool,
        group="ops",
    )
    views_flush_interval: float = _setting(
        5.0,
        "Seconds between flushes of the view counts kept in memory (also flushed at a clean shutdown).",
        parse=parse_float(0.05, 5),
        group="ops",
    )
    views_max_pending: int = _setting(
        100_000,
        "Most (image, day) view counts kept in memory between flushes, e.g. through a database outage; views of "
        "further images are dropped (imgsvc_views_dropped_total) until a flush succeeds.",
        parse=parse_int(1, 100_000_000),
        group="ops",
    )
    encode_settle: bool = _setting(
        False,
        "Fast first, best later: a WebP/AVIF miss larger than 400x400 px is answered with a fast encode, cached "
        "for 60 s only (not immutable) under its own ETag, and re-encoded at the settled setting when no render "
        "is running or queued; from then on the settled bytes are served, immutable. false: every miss is "
        "encoded at the settled setting at once.",
        parse=parse_bool,
        group="render",
    )
    encode_settle_queue: int = _setting(
        64,
        "Fast encodes waiting to be settled; past it, one is dropped and offered again by its next request.",
        parse=parse_int(1, 100_000),
        group="render",
    )
    encode_settle_bytes: int = _setting(
        64 * MiB,
        "Bytes of finished pixels the waiting settles may hold (an encode of them needs no new decode); past it, "
        "a settle is dropped and offered again by its next request.",
        parse=parse_int(0),
        group="render",
    )

    @property
    def effective_storage_url(self) -> str:
        return self.storage_url or f"file://{(self.data_dir / 'blobs').resolve()}"

    @property
    def effective_public_url(self) -> str:
        if self.public_url:
            return self.public_url
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every `IMGSVC_*` variable; raise ConfigError listing all problems at once."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        problems: list[str] = []
        known = {env_name(f.name) for f in fields(cls)}
        for name in sorted(k for k in environ if k.startswith("IMGSVC_") and k not in known):
            problems.append(f"{name}: unknown setting")
        for f in fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is None or raw == "":
                continue
            parse = f.metadata["parse"] or str
            try:
                values[f.name] = parse(raw)
            except ValueError as exc:
                problems.append(f"{env_name(f.name)}: {exc}")
        if not problems:
            settings = cls(**values)
            problems.extend(settings.check())
            if not problems:
                return settings
        raise ConfigError(problems)

    def check(self) -> list[str]:
        """Cross-field rules that no single variable can enforce."""
        problems = []
        if self.auth == "none" and not is_loopback(self.host):
            problems.append("IMGSVC_AUTH: 'none' is only allowed when IMGSVC_HOST is a loopback address")
        if self.auth == "introspect" and not self.auth_introspect_url:
            problems.append("IMGSVC_AUTH_INTROSPECT_URL: required when IMGSVC_AUTH=introspect")
        if self.auth == "jwks":
            problems.extend(
                f"{env_name(name)}: required when IMGSVC_AUTH=jwks"
                for name in ("auth_jwks_url", "auth_issuer", "auth_audience")
                if not getattr(self, name)
            )
        if self.require_signed and not self.signing_keys:
            problems.append("IMGSVC_REQUIRE_SIGNED: needs IMGSVC_SIGNING_KEYS")
        if self.purge_webhooks and len(self.purge_webhook_secret or "") < 16:
            problems.append("IMGSVC_PURGE_WEBHOOK_SECRET: required (16+ characters) with IMGSVC_PURGE_WEBHOOKS")
        if bool(self.purge_cloudflare_zone) != bool(self.purge_cloudflare_token):
            problems.append("IMGSVC_PURGE_CLOUDFLARE_ZONE and IMGSVC_PURGE_CLOUDFLARE_TOKEN: set both or neither")
        if bool(self.purge_fastly_service) != bool(self.purge_fastly_key):
            problems.append("IMGSVC_PURGE_FASTLY_SERVICE and IMGSVC_PURGE_FASTLY_KEY: set both or neither")
        if self.purge_nginx and len(self.purge_nginx_key or "") < 16:
            problems.append("IMGSVC_PURGE_NGINX_KEY: required (16+ characters) with IMGSVC_PURGE_NGINX")
        if self.purge_nginx and self.purge_keep_days < 1:
            problems.append("IMGSVC_PURGE_KEEP_DAYS: at least 1 with IMGSVC_PURGE_NGINX (a restarted node is re-sent "
                            "the deletes of its cache validity from the kept jobs)")  # fmt: skip
        if self.purge_retry_max < self.purge_retry_base:
            problems.append("IMGSVC_PURGE_RETRY_MAX: must not be below IMGSVC_PURGE_RETRY_BASE")
        for name, items in self.presets.items():  # parse_presets checked them against the default maximum
            try:
                parse_query(items, SpecLimits(max_output_dim=self.max_output_dim, presets={}))
            except InvalidParameter as exc:
                problems.append(f"IMGSVC_PRESETS: preset {name!r}: {exc.detail} (IMGSVC_MAX_OUTPUT_DIM)")
        return problems

    def describe(self) -> list[tuple[Group, str, str, str]]:
        """(group, variable, effective value with secrets masked, help) for every setting, group by group."""
        rows = []
        for f in sorted(fields(self), key=lambda f: GROUPS.index(f.metadata["group"])):
            value = getattr(self, f.name)
            shown = mask_secret(str(value)) if f.metadata["secret"] and value else show_value(value)
            rows.append((f.metadata["group"], env_name(f.name), shown, f.metadata["help"]))
        return rows


GROUPS: tuple[Group, ...] = get_args(Group)


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


def env_name(field_name: str) -> str:
    return "IMGSVC_" + field_name.upper()
