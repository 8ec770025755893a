"""What operators see: Prometheus metrics by route, stage, tier and outcome; JSON logs with request ids."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
from prometheus_client import REGISTRY

from tests.conftest import FLICKR, PHOTO, ServerProcess, app_client, with_settings


async def upload(client: httpx.AsyncClient, path: Path) -> str:
    response = await client.post("/images", content=path.read_bytes(), headers={"Content-Type": "image/*"})
    return str(response.json()["id"])


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_metrics_count_requests_renders_caches_and_uploads(client: httpx.AsyncClient) -> None:
    before = {
        "img_2xx": sample("imgsvc_http_requests_total", route="/img/{id}", method="GET", status="2xx"),
        "img_4xx": sample("imgsvc_http_requests_total", route="/img/{id}", method="GET", status="4xx"),
        "pixels": sample("imgsvc_render_stage_seconds_count", stage="pixels", format="webp"),
        "encode": sample("imgsvc_render_stage_seconds_count", stage="encode", format="webp"),
        "fetch": sample("imgsvc_render_stage_seconds_count", stage="fetch", format="webp"),
        "hit": sample("imgsvc_cache_requests_total", tier="variant", result="hit"),
        "miss": sample("imgsvc_cache_requests_total", tier="variant", result="miss"),
        "created": sample("imgsvc_uploads_total", outcome="created"),
        "replayed": sample("imgsvc_uploads_total", outcome="replayed"),
        "unsupported": sample("imgsvc_uploads_total", outcome="unsupported-format"),
        "out": sample("imgsvc_http_bytes_total", direction="out"),
    }
    image_id = await upload(client, FLICKR)
    retry = {"Content-Type": "image/*", "Idempotency-Key": "upload-1"}
    await client.post("/images", content=FLICKR.read_bytes(), headers=retry)
    await client.post("/images", content=FLICKR.read_bytes(), headers=retry)
    await client.post("/images", content=b"<svg/>", headers={"Content-Type": "image/svg+xml"})
    first = await client.get(f"/img/{image_id}?w=100&fmt=webp")
    await client.get(f"/img/{image_id}?w=100&fmt=webp")
    await client.get(f"/img/{image_id}?w=0")
    assert sample("imgsvc_http_requests_total", route="/img/{id}", method="GET", status="2xx") - before["img_2xx"] == 2
    assert sample("imgsvc_http_requests_total", route="/img/{id}", method="GET", status="4xx") - before["img_4xx"] == 1
    for stage in ("pixels", "encode", "fetch"):
        assert sample("imgsvc_render_stage_seconds_count", stage=stage, format="webp") - before[stage] == 1
    assert sample("imgsvc_cache_requests_total", tier="variant", result="hit") - before["hit"] == 1
    assert sample("imgsvc_cache_requests_total", tier="variant", result="miss") - before["miss"] == 1
    assert sample("imgsvc_uploads_total", outcome="created") - before["created"] == 2
    assert sample("imgsvc_uploads_total", outcome="replayed") - before["replayed"] == 1
    assert sample("imgsvc_uploads_total", outcome="unsupported-format") - before["unsupported"] == 1
    assert sample("imgsvc_http_bytes_total", direction="out") - before["out"] >= 2 * len(first.content)

    exposition = await client.get("/metrics")
    assert exposition.status_code == 200 and exposition.headers["content-type"].startswith("text/plain")
    text = exposition.text
    for name in ("imgsvc_http_request_duration_seconds_bucket", "imgsvc_render_queue_depth",
                 "imgsvc_render_workers_busy", "imgsvc_render_rejections_total"):  # fmt: skip
        assert name in text
    assert image_id not in text  # no ids in labels: bounded cardinality


async def test_queue_rejections_are_counted(settings) -> None:  # type: ignore[no-untyped-def]
    async with app_client(with_settings(settings, workers=1, render_queue=0)) as client:
        image_id = await upload(client, PHOTO)
        before = sample("imgsvc_render_rejections_total", reason="queue_full")
        responses = await asyncio.gather(*(client.get(f"/img/{image_id}?w={w}&fmt=avif") for w in (300, 301, 302)))
        refused = sum(r.status_code == 503 for r in responses)
        assert refused >= 1
        assert sample("imgsvc_render_rejections_total", reason="queue_full") - before == refused
        assert sample("imgsvc_render_queue_depth") == 0 and sample("imgsvc_render_workers_busy") == 0


def test_logs_are_json_lines_with_the_request_id(server: ServerProcess, tmp_path: Path) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        created = http.post("/images", content=FLICKR.read_bytes(), headers={"Content-Type": "image/jpeg",
                                                                              "X-Request-ID": "upload-42"})  # fmt: skip
        image_id = created.json()["id"]
        http.get(f"/img/{image_id}?w=64&kid=k&s=secret-signature-value", headers={"X-Request-ID": "render-43"})
    server.stop()
    lines = [line for line in (tmp_path / "server.log").read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(entries) >= len(lines) - 1  # everything after the start-up banner is JSON
    access = {e["request_id"]: e for e in entries if e["logger"] == "imgsvc.access"}
    assert access["upload-42"]["status"] == 201 and access["upload-42"]["bytes_in"] == FLICKR.stat().st_size
    assert access["render-43"]["uri"].endswith("s=REDACTED") and access["render-43"]["route"] == "/img/{id}"
    assert "secret-signature-value" not in "\n".join(lines)


def test_the_access_log_can_be_turned_off(server_env: dict[str, str], tmp_path: Path) -> None:
    server = ServerProcess({**server_env, "IMGSVC_ACCESS_LOG": "false"}, tmp_path / "quiet.log").start()
    try:
        assert httpx.get(f"{server.url}/livez", headers={"X-Request-ID": "quiet-1"}).status_code == 200
    finally:
        server.stop()
    assert "quiet-1" not in (tmp_path / "quiet.log").read_text()
