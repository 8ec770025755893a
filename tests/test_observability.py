"""What operators see: Prometheus metrics by route, stage, tier and outcome; JSON logs with request ids, and
one short text line per event on a terminal."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from prometheus_client import REGISTRY

from imgsvc import logs
from imgsvc.server import DrainingServer
from tests.conftest import FLICKR, PHOTO, ServerProcess, app_client, free_port, with_settings


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


def test_no_access_line_is_lost_on_a_clean_shutdown(server: ServerProcess, tmp_path: Path) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for i in range(300):
            assert http.get("/livez", headers={"X-Request-ID": f"burst-{i}"}).status_code == 200
    assert server.stop() is not None  # SIGTERM right after the last answer, while lines are still queued
    entries = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines() if line[:1] == "{"]
    logged = {e["request_id"] for e in entries if e["logger"] == "imgsvc.access"}
    assert {f"burst-{i}" for i in range(300)} <= logged
    assert any(e["msg"].startswith("Finished server process") for e in entries)  # written after the lifespan


def test_queued_lines_are_written_before_a_signal_ends_the_server() -> None:
    """uvicorn ends a signalled process by raising the signal again, which skips `atexit`."""
    stream, root = io.StringIO(), logging.getLogger()
    saved = root.handlers[:], root.level
    logs.configure("info", "json", stream)
    try:
        for i in range(100):
            logs.log_access(logs.AccessEntry(time.time(), "GET", "/livez", b"", "/livez", 200, 0.001, 0, 15,
                                             "127.0.0.1", f"queued-{i}", ""))  # fmt: skip
        assert stream.getvalue() == ""  # a request only queues its line
        with DrainingServer(uvicorn.Config(app=None), threading.Event(), 0).capture_signals():
            pass
        written = [json.loads(line)["request_id"] for line in stream.getvalue().splitlines()]
        assert written == [f"queued-{i}" for i in range(100)]  # all of them, in order, at once
    finally:
        logs.close()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def run_on_a_terminal(env: dict[str, str], tmp_path: Path, until: str) -> tuple[subprocess.Popen[bytes], int, str]:
    """`imgsvc serve` (what `make run` starts) with a pseudo-terminal as stdout and stderr, read until `until`."""
    controller, terminal = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSVC_")} | env
    proc = subprocess.Popen([sys.executable, "-m", "imgsvc", "serve"], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                            stdout=terminal, stderr=terminal)  # fmt: skip
    os.close(terminal)
    return proc, controller, read_terminal(controller, until)


def read_terminal(controller: int, until: str | None, timeout: float = 240) -> str:
    """What the terminal showed until `until` appears (None: until the program closes it), bounded."""
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (until is None or until.encode() not in seen):
        ready, _, _ = select.select([controller], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    return seen.decode(errors="replace").replace("\r\n", "\n")


def test_a_terminal_shows_one_short_text_line_per_event(tmp_path: Path) -> None:
    port = free_port()
    env = {"IMGSVC_PORT": str(port), "IMGSVC_DATA_DIR": str(tmp_path / "data")}  # embedded Postgres, fresh
    proc, controller, started = run_on_a_terminal(env, tmp_path, "Uvicorn running on")
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/img/no-such-image?w=256", timeout=30).status_code == 404
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        shown = started + read_terminal(controller, None)
        assert proc.wait(30) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(controller)
    lines = [line for line in shown.splitlines() if line.strip()]
    assert lines[0].startswith("imgsvc: starting on http://127.0.0.1:")
    assert not [line for line in lines if line.lstrip().startswith("{")], shown  # no JSON on a terminal
    assert all(len(line) < 200 for line in lines), shown
    assert len(started.splitlines()) <= 20, started  # the start-up, up to "running", fits a screen
    event = r"^\d\d:\d\d:\d\d\.\d{3} (INFO |WARN ) [\w.]+: "
    assert re.search(event + r"postgres: initialised a cluster in .+ in [\d.]+ s$", started, re.M), started
    assert re.search(event + r"postgres: started \(pid \d+, socket in .+\) in [\d.]+ s$", started, re.M), started
    assert re.search(r"^\d\d:\d\d:\d\d\.\d{3} GET /img/no-such-image\?w=256 404 [\d.]+ms$", shown, re.M), shown
    assert re.search(event + r"postgres: stopped in [\d.]+ s$", shown, re.M), shown  # queued lines survive SIGINT
    assert "Traceback" not in shown and "KeyboardInterrupt" not in shown
    assert "initdb" not in shown and "Running commandline" not in shown  # the wheel's output is summarised


def test_postgres_output_is_shown_whole_when_it_fails(tmp_path: Path) -> None:
    (tmp_path / "data" / "postgres").mkdir(parents=True)
    (tmp_path / "data" / "postgres" / "PG_VERSION").write_text("9\n")  # a data directory pg_ctl cannot start
    env = {"IMGSVC_PORT": str(free_port()), "IMGSVC_DATA_DIR": str(tmp_path / "data"), "IMGSVC_LOG_FORMAT": "json"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSVC_")} | env
    done = subprocess.run([sys.executable, "-m", "imgsvc", "serve"], cwd=tmp_path, env=env, capture_output=True,
                          timeout=240, check=False)  # fmt: skip
    assert done.returncode != 0
    entries = [json.loads(line) for line in done.stderr.decode().splitlines() if line.startswith("{")]
    failed = [e for e in entries if e["logger"] == "imgsvc.embedded" and e["level"] == "error"]
    assert len(failed) == 1 and failed[0]["msg"].startswith("postgres: start failed after"), entries
    assert "pg_ctl" in failed[0]["msg"] and "Showing contents of postgres server log" in failed[0]["msg"]
