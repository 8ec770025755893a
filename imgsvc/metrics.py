"""Prometheus metrics: one registry of everything operators watch, and the text exposition.

Multi-process safe: with `PROMETHEUS_MULTIPROC_DIR` set, every process writes there and `/metrics`
aggregates them (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

requests_total = Counter(
    "imgsvc_http_requests_total", "HTTP requests by route template, method and status class.",
    ["route", "method", "status"],
)  # fmt: skip
request_seconds = Histogram(
    "imgsvc_http_request_duration_seconds", "HTTP request latency by route template and status class.",
    ["route", "status"], buckets=LATENCY_BUCKETS,
)  # fmt: skip
bytes_total = Counter("imgsvc_http_bytes_total", "Body bytes received and sent.", ["direction"])
render_seconds = Histogram(
    "imgsvc_render_stage_seconds", "Render time by stage (fetch, pixels = decode+resize, encode) and output format.",
    ["stage", "format"], buckets=LATENCY_BUCKETS,
)  # fmt: skip
cache_total = Counter("imgsvc_cache_requests_total", "Cache lookups by tier and result.", ["tier", "result"])
renders_running = Gauge("imgsvc_render_workers_busy", "Renders running in worker threads.", multiprocess_mode="livesum")
renders_waiting = Gauge("imgsvc_render_queue_depth", "Renders waiting for a worker.", multiprocess_mode="livesum")
render_rejections = Counter("imgsvc_render_rejections_total", "Renders refused or stopped, by reason.", ["reason"])
settles_total = Counter(
    "imgsvc_encode_settles_total", "Fast first encodes and their settling, by outcome.", ["outcome"]
)
uploads_total = Counter("imgsvc_uploads_total", "Uploads by outcome.", ["outcome"])
purge_lag_seconds = Histogram(
    "imgsvc_purge_lag_seconds", "Time from a delete (its purge job) to its delivery to a CDN purge target.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)  # fmt: skip
purge_pending = Gauge(
    "imgsvc_purge_pending", "Undelivered (job, target) purge deliveries, as the sending replica last counted.",
    multiprocess_mode="livemax",
)  # fmt: skip
render_sources = Counter(
    "imgsvc_render_sources_total",
    "Renders by where they started: a pyramid level, the original, or the original after an unusable level.",
    ["source"],
)
derivations = Counter("imgsvc_derivations_total", "Pyramid and placeholder derivations by outcome.", ["outcome"])
derive_seconds = Histogram(
    "imgsvc_derive_cpu_seconds", "Thread CPU time of one blob's derivation (levels and placeholder).",
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
purge_failures = Counter("imgsvc_purge_failures_total", "Failed purge delivery attempts by target.", ["target"])


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def exposition() -> tuple[bytes, str]:
    """The text format of every metric (of every process, in multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
