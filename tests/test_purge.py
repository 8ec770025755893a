"""CDN purge outbox with real replicas over one Postgres and a loopback stand-in for the purge APIs: deletes are
delivered to every target once, in order, through retries, a killed sender, a receiver outage and restarts."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import asyncpg
import httpx
import pytest
import pyvips

from imgsvc.app import purge_targets
from imgsvc.config import ConfigError, Settings
from imgsvc.gc import collect_garbage
from imgsvc.purge import Job, Target
from tests.conftest import PNG_ALPHA, REPO, ServerProcess, app_client, free_port

SECRET = "purge-test-secret-0123456789"
GRACE = timedelta(days=7)
SENDER_LOCK = 0x70757267  # imgsvc.purge's advisory lock id, as pg_locks shows it (objid)
TARGETS = ("webhook", "cloudflare", "fastly")


@dataclass(frozen=True)
class Call:
    target: str
    image_id: str
    delivery: str | None  # the webhook's Imgsvc-Delivery (the job id)
    authentic: bool  # webhook signature, Cloudflare bearer token or Fastly key as configured
    status: int  # what the receiver answered; 0 for a call held until the sender died
    at: float  # time.time() on arrival


class Receiver:
    """A loopback HTTP server standing in for a CDN's purge API (and a webhook endpoint): records each call, checks
    its credentials, and answers 200, or 503 for the first `fail_first` calls, or holds a call while `hold` is set."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.calls: list[Call] = []
        self.errors: list[str] = []
        self.fail_first = 0
        self.hold = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    call = receiver.classify(self.path, dict(self.headers), body)
                except Exception as exc:  # a malformed purge request: fails the test at teardown
                    receiver.errors.append(f"{self.path}: {exc!r}")
                    self.send_error(400)
                    return
                with receiver.lock:
                    held = receiver.hold.is_set()
                    failing = not held and len(receiver.calls) < receiver.fail_first
                    status = 0 if held else 503 if failing else 200
                    receiver.calls.append(Call(*call, status=status, at=time.time()))
                if held:
                    receiver.release.wait(60)
                    status = 200
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender is gone

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def classify(self, path: str, headers: dict[str, str], body: bytes) -> tuple[str, str, str | None, bool]:
        if path == "/hook":
            payload = json.loads(body)
            t, v1 = re.fullmatch(r"t=(\d+),v1=([0-9a-f]{64})", headers["Imgsvc-Signature"]).groups()  # type: ignore[union-attr]
            expected = hmac.new(SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
            fresh = abs(time.time() - int(t)) < 300
            assert payload["tags"] == [f"img-{payload['image_id']}"]
            ok = hmac.compare_digest(expected, v1) and fresh
            return "webhook", payload["image_id"], headers["Imgsvc-Delivery"], ok
        if path == "/cf/client/v4/zones/zone-1/purge_cache":
            (tag,) = json.loads(body)["tags"]
            return "cloudflare", tag.removeprefix("img-"), None, headers["Authorization"] == "Bearer cf-token"
        match = re.fullmatch(r"/fastly/service/svc-1/purge/img-([A-Za-z0-9_-]{22})", path)
        assert match, path
        return "fastly", match.group(1), None, headers["Fastly-Key"] == "fastly-key"

    def delivered(self, target: str) -> list[str]:
        """Image ids the target accepted (2xx), in arrival order."""
        with self.lock:
            return [c.image_id for c in self.calls if c.target == target and c.status == 200]

    def arrival(self, target: str, image_id: str) -> float:
        with self.lock:
            return next(c.at for c in self.calls if c.target == target and c.image_id == image_id and c.status == 200)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.release.set()
    r.stop()
    assert r.errors == []


@pytest.fixture
def purge_env(server_env: dict[str, str], receiver: Receiver) -> dict[str, str]:
    return {
        **server_env,
        "IMGSVC_PURGE_WEBHOOKS": f"{receiver.url}/hook",
        "IMGSVC_PURGE_WEBHOOK_SECRET": SECRET,
        "IMGSVC_PURGE_CLOUDFLARE_URL": f"{receiver.url}/cf/client/v4",
        "IMGSVC_PURGE_CLOUDFLARE_ZONE": "zone-1",
        "IMGSVC_PURGE_CLOUDFLARE_TOKEN": "cf-token",
        "IMGSVC_PURGE_FASTLY_URL": f"{receiver.url}/fastly",
        "IMGSVC_PURGE_FASTLY_SERVICE": "svc-1",
        "IMGSVC_PURGE_FASTLY_KEY": "fastly-key",
        "IMGSVC_PURGE_RETRY_BASE": "0.2",
        "IMGSVC_PURGE_RETRY_MAX": "2",
        "IMGSVC_PURGE_TIMEOUT": "5",
    }


@pytest.fixture
def replicas(purge_env: dict[str, str], tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for proc in started:
        proc.stop()


def png(seed: int) -> bytes:
    return bytes(pyvips.Image.black(8, 8).new_from_image([seed % 256, seed // 256 % 256, 7]).pngsave_buffer())


async def upload(client: httpx.AsyncClient, url: str, data: bytes) -> str:
    created = await client.post(f"{url}/images", content=data, headers={"Content-Type": "image/png"})
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


async def wait_for(condition: Callable[[], object], within: float, what: str) -> float:
    """Poll until `condition()` is true; the seconds it took."""
    began = time.monotonic()
    while time.monotonic() - began < within:
        if condition():
            return time.monotonic() - began
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {within} s: {what}")


def all_delivered(receiver: Receiver, ids: list[str]) -> Callable[[], bool]:
    return lambda: all(set(ids) <= set(receiver.delivered(t)) for t in TARGETS)


async def sender_locked(database_url: str) -> bool:
    conn = await asyncpg.connect(database_url)
    try:
        return bool(
            await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1 AND granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                SENDER_LOCK,
            )
        )
    finally:
        await conn.close()


async def wait_for_sender(database_url: str, within: float = 30.0) -> None:
    began = time.monotonic()
    while not await sender_locked(database_url):
        assert time.monotonic() - began < within, "no replica took the sender lock"
        await asyncio.sleep(0.05)


async def deliveries(database_url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(
            "SELECT j.image_id, d.target, d.attempts, d.last_error, d.delivered_at FROM purge_deliveries d "
            "JOIN purge_jobs j ON j.id = d.job_id ORDER BY d.target, d.job_id"
        )
    finally:
        await conn.close()


def start(replicas: list[ServerProcess], env: dict[str, str], tmp_path: Path, name: str) -> ServerProcess:
    proc = ServerProcess(env, tmp_path / f"{name}.log").start()
    replicas.append(proc)
    return proc


async def test_a_delete_reaches_every_target_once_through_retries(
    replicas: list[ServerProcess], purge_env: dict[str, str], receiver: Receiver, database_url: str, tmp_path: Path
) -> None:
    a = start(replicas, purge_env, tmp_path, "a")
    b = start(replicas, purge_env, tmp_path, "b")
    await wait_for_sender(database_url)
    receiver.fail_first = 4  # the first four calls (across the three targets) answer 503
    async with httpx.AsyncClient(timeout=30) as client:
        image_id = await upload(client, a.url, png(1))
        assert (await client.delete(f"{b.url}/images/{image_id}")).status_code == 204
        await wait_for(all_delivered(receiver, [image_id]), 60, "delivered to every target")
    await asyncio.sleep(1.0)  # nothing more arrives: each target accepted it once
    assert [(t, receiver.delivered(t)) for t in TARGETS] == [(t, [image_id]) for t in TARGETS]
    assert all(c.authentic for c in receiver.calls) and len(receiver.calls) == 4 + 3
    rows = await deliveries(database_url)
    assert sorted(r["target"].split(":")[0] for r in rows) == sorted(TARGETS)
    assert all(r["delivered_at"] is not None and r["last_error"] is None for r in rows)
    assert sum(r["attempts"] for r in rows) == 4 + 3  # every call was recorded as an attempt
    metrics = httpx.get(f"{a.url}/metrics").text + httpx.get(f"{b.url}/metrics").text
    assert re.search(r"^imgsvc_purge_failures_total\{target=\"[^\"]+\"\} [1-4]\.0$", metrics, re.M)
    assert re.search(r"^imgsvc_purge_lag_seconds_count [1-9]", metrics, re.M)


async def test_two_images_sharing_one_blob_are_two_purges(
    replicas: list[ServerProcess], purge_env: dict[str, str], receiver: Receiver, database_url: str, tmp_path: Path
) -> None:
    a = start(replicas, purge_env, tmp_path, "a")
    await wait_for_sender(database_url)
    async with httpx.AsyncClient(timeout=30) as client:
        ids = [await upload(client, a.url, png(2)) for _ in range(2)]
        assert ids[0] != ids[1]
        for image_id in ids:
            assert (await client.delete(f"{a.url}/images/{image_id}")).status_code == 204
        await wait_for(all_delivered(receiver, ids), 30, "both purges delivered")
    assert [receiver.delivered(t) for t in TARGETS] == [ids] * 3


async def test_killing_the_sender_mid_delivery_lets_the_other_replica_deliver(
    replicas: list[ServerProcess], purge_env: dict[str, str], receiver: Receiver, database_url: str, tmp_path: Path
) -> None:
    env = {**purge_env, "IMGSVC_PURGE_WEBHOOKS": "", "IMGSVC_PURGE_WEBHOOK_SECRET": ""}  # one target: fastly ...
    env |= {"IMGSVC_PURGE_CLOUDFLARE_ZONE": "", "IMGSVC_PURGE_CLOUDFLARE_TOKEN": ""}
    a = start(replicas, env, tmp_path, "a")
    await wait_for_sender(database_url)  # A is the sender; B starts as a standby
    b = start(replicas, env, tmp_path, "b")
    receiver.hold.set()
    async with httpx.AsyncClient(timeout=30) as client:
        image_id = await upload(client, b.url, png(3))
        assert (await client.delete(f"{b.url}/images/{image_id}")).status_code == 204
        await wait_for(lambda: receiver.calls, 30, "A's purge request arrives")
        assert a.proc is not None
        receiver.hold.clear()  # later calls are answered; A's stays held
        a.proc.kill()  # SIGKILL while the receiver still holds A's request open
        a.proc.wait(10)
        killed = time.time()
        took = await wait_for(lambda: receiver.delivered("fastly") == [image_id], 60, "B delivers")
    print(f"\nsender killed mid-delivery: delivered by the other replica {took:.2f} s after the kill")
    assert receiver.arrival("fastly", image_id) > killed
    assert [c.status for c in receiver.calls] == [0, 200]  # the receiver saw the purge twice: once held, once done
    (row,) = await deliveries(database_url)
    assert row["attempts"] == 2 and row["delivered_at"] is not None
    receiver.release.set()


async def test_a_receiver_down_for_a_minute_gets_everything_after_in_order_once(
    replicas: list[ServerProcess], purge_env: dict[str, str], receiver: Receiver, database_url: str, tmp_path: Path
) -> None:
    env = {**purge_env, "IMGSVC_PURGE_RETRY_MAX": "5"}
    a = start(replicas, env, tmp_path, "a")
    b = start(replicas, env, tmp_path, "b")
    await wait_for_sender(database_url)
    receiver.stop()
    async with httpx.AsyncClient(timeout=30) as client:
        ids = [await upload(client, a.url, png(100 + i)) for i in range(5)]
        for i, image_id in enumerate(ids):
            assert (await client.delete(f"{(a, b)[i % 2].url}/images/{image_id}")).status_code == 204
    down_since = time.monotonic()
    while time.monotonic() - down_since < 60:
        await asyncio.sleep(1)
    pending = await deliveries(database_url)
    assert all(r["delivered_at"] is None for r in pending) and len(pending) == 15
    heads = [r for i, r in enumerate(pending) if i % 5 == 0]  # each target retries its oldest job only
    assert [r["image_id"] for r in heads] == [ids[0]] * 3 and all(r["attempts"] >= 3 for r in heads)
    assert all(r["attempts"] == 0 for i, r in enumerate(pending) if i % 5)
    gauges = httpx.get(f"{a.url}/metrics").text + httpx.get(f"{b.url}/metrics").text
    assert re.search(r"^imgsvc_purge_pending 15\.0$", gauges, re.M)  # as the sender counted it
    assert any("ConnectError" in (r["last_error"] or "") for r in pending)
    receiver.start()
    took = await wait_for(all_delivered(receiver, ids), 60, "the backlog delivered after the outage")
    await asyncio.sleep(1.0)
    print(f"\nreceiver down 60 s (retry cap 5 s): 5 deletes x 3 targets delivered {took:.2f} s after it came back")
    assert [receiver.delivered(t) for t in TARGETS] == [ids] * 3  # in order, once per target
    assert len(receiver.calls) == 15


async def test_pending_purges_survive_a_restart_of_every_replica(
    replicas: list[ServerProcess], purge_env: dict[str, str], receiver: Receiver, database_url: str, tmp_path: Path
) -> None:
    a = start(replicas, purge_env, tmp_path, "a")
    b = start(replicas, purge_env, tmp_path, "b")
    await wait_for_sender(database_url)
    receiver.fail_first = 1_000_000
    async with httpx.AsyncClient(timeout=30) as client:
        ids = [await upload(client, a.url, png(200 + i)) for i in range(3)]
        for image_id in ids:
            assert (await client.delete(f"{b.url}/images/{image_id}")).status_code == 204
        await wait_for(lambda: len(receiver.calls) >= 3, 30, "failed attempts")
    for proc in (a, b):
        proc.stop()
    replicas.clear()
    assert all(r["delivered_at"] is None for r in await deliveries(database_url))
    cli = cli_run(purge_env, "purge", "--pending")
    assert cli.returncode == 0, cli.stderr
    assert "9 undelivered purges" in cli.stdout and "HTTP 503" in cli.stdout and ids[0] in cli.stdout
    with receiver.lock:
        receiver.fail_first, failed = 0, len(receiver.calls)
        receiver.calls.clear()
    began = time.monotonic()
    start(replicas, purge_env, tmp_path, "a2")
    start(replicas, purge_env, tmp_path, "b2")
    took = await wait_for(all_delivered(receiver, ids), 60, "delivered after the restart")
    print(f"\nafter {failed} failed calls and a restart of both replicas: delivered {time.monotonic() - began:.2f} s "
          f"after the restart began ({took:.2f} s after both were ready)")  # fmt: skip
    assert [receiver.delivered(t) for t in TARGETS] == [ids] * 3
    # `imgsvc purge ID` sends it again, as a new job, to every target.
    resend = cli_run(purge_env, "purge", ids[1])
    assert resend.returncode == 0 and "for 3 targets" in resend.stdout, resend.stderr
    await wait_for(lambda: all(receiver.delivered(t).count(ids[1]) == 2 for t in TARGETS), 30, "re-sent")
    assert cli_run(purge_env, "purge", "A" * 22).returncode == 1


async def test_delete_to_purge_delivered_over_twenty_deletes(
    replicas: list[ServerProcess], purge_env: dict[str, str], receiver: Receiver, database_url: str, tmp_path: Path
) -> None:
    a = start(replicas, purge_env, tmp_path, "a")
    b = start(replicas, purge_env, tmp_path, "b")
    await wait_for_sender(database_url)
    lags: list[float] = []
    async with httpx.AsyncClient(timeout=30) as client:
        ids = [await upload(client, a.url, png(300 + i)) for i in range(20)]
        for i, image_id in enumerate(ids):
            began = time.time()
            assert (await client.delete(f"{(a, b)[i % 2].url}/images/{image_id}")).status_code == 204
            await wait_for(all_delivered(receiver, [image_id]), 30, "delivered")
            lags.append(max(receiver.arrival(t, image_id) for t in TARGETS) - began)
    print(f"\ndelete -> purge delivered to all 3 targets, 20 deletes over 2 replicas: "
          f"p50 {statistics.median(lags) * 1000:.1f} ms, max {max(lags) * 1000:.1f} ms")  # fmt: skip
    assert [receiver.delivered(t) for t in TARGETS] == [ids] * 3


def cli_run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imgsvc", *args], env={**os.environ, **env}, cwd=REPO, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip


def test_purge_secrets_are_required_validated_and_masked() -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"IMGSVC_PURGE_WEBHOOKS": "http://127.0.0.1:9/h", "IMGSVC_PURGE_CLOUDFLARE_ZONE": "z",
                           "IMGSVC_PURGE_RETRY_BASE": "10", "IMGSVC_PURGE_RETRY_MAX": "5"})  # fmt: skip
    assert [p.split(":")[0] for p in raised.value.problems] == [
        "IMGSVC_PURGE_WEBHOOK_SECRET",
        "IMGSVC_PURGE_CLOUDFLARE_ZONE and IMGSVC_PURGE_CLOUDFLARE_TOKEN",
        "IMGSVC_PURGE_RETRY_MAX",
    ]
    env = {"IMGSVC_PURGE_WEBHOOKS": "https://a.example/h, https://b.example/h", "IMGSVC_PURGE_WEBHOOK_SECRET": SECRET,
           "IMGSVC_PURGE_FASTLY_SERVICE": "svc", "IMGSVC_PURGE_FASTLY_KEY": "fastly-secret-key"}  # fmt: skip
    assert Settings.from_env(env).purge_webhooks == ("https://a.example/h", "https://b.example/h")
    shown = cli_run(env, "config", "--check")
    assert shown.returncode == 0, shown.stderr
    assert SECRET not in shown.stdout and "fastly-secret-key" not in shown.stdout
    assert re.search(r"^IMGSVC_PURGE_WEBHOOK_SECRET +\*\*\*\*$", shown.stdout, re.M)


async def test_gc_removes_purge_jobs_every_target_received_and_keeps_the_rest(settings: Settings) -> None:
    async with app_client(settings) as client:
        ids = []
        for _ in range(2):
            created = await client.post("/images", content=PNG_ALPHA.read_bytes(), headers={"Content-Type": "image/*"})
            ids.append(created.json()["id"])
        services = client.services  # type: ignore[attr-defined]
        pool = services.catalog.pool
        assert (await client.delete(f"/images/{ids[0]}")).status_code == 204  # no targets: nothing to deliver
        await pool.execute("INSERT INTO purge_targets (name) VALUES ('webhook:https://hooks.example/purge')")
        assert (await client.delete(f"/images/{ids[1]}")).status_code == 204  # one delivery, never sent
        assert await pool.fetchval("SELECT count(*) FROM purge_jobs") == 2
        kept = await collect_garbage(services.catalog, services.store, GRACE, purge_keep=timedelta(days=1))
        assert kept.expired_purge_jobs == 0
        report = await collect_garbage(services.catalog, services.store, GRACE, purge_keep=timedelta(0))
        assert report.expired_purge_jobs == 1
        assert await pool.fetchval("SELECT image_id FROM purge_jobs") == ids[1]


def test_target_names_carry_no_credentials() -> None:
    target = Target("webhook", "https://user:pw@hooks.example:8443/purge?token=s3cret")
    assert target.name == "webhook:https://hooks.example:8443/purge"


@pytest.mark.parametrize(
    ("prefix", "body"),
    [
        ("", {"tags": ["img-AAAAAAAAAAAAAAAAAAAAAA"]}),
        ("img.example.com/img/", {"prefixes": ["img.example.com/img/AAAAAAAAAAAAAAAAAAAAAA"]}),
    ],
)
def test_cloudflare_purges_the_tag_or_the_url_prefix(prefix: str, body: dict[str, list[str]]) -> None:
    env = {"IMGSVC_PURGE_CLOUDFLARE_ZONE": "zone-1", "IMGSVC_PURGE_CLOUDFLARE_TOKEN": "cf-token"}
    settings = Settings.from_env({**env, "IMGSVC_PURGE_CLOUDFLARE_PREFIX": prefix})
    (target,) = purge_targets(settings)
    job = Job(7, "A" * 22, "delete", datetime.now(UTC))
    url, headers, sent = target.request(job, time.time())
    assert url == "https://api.cloudflare.com/client/v4/zones/zone-1/purge_cache"
    assert json.loads(sent) == body and headers["Authorization"] == "Bearer cf-token"


def test_a_purge_prefix_with_a_scheme_is_refused() -> None:
    with pytest.raises(ConfigError, match="IMGSVC_PURGE_CLOUDFLARE_PREFIX"):
        Settings.from_env({"IMGSVC_PURGE_CLOUDFLARE_PREFIX": "https://img.example.com/img/"})


def test_purge_command_says_the_database_is_unavailable_without_a_traceback(tmp_path: Path) -> None:
    env = {"IMGSVC_DATABASE_URL": f"postgresql://imgsvc@127.0.0.1:{free_port()}/imgsvc",  # nothing listens
           "IMGSVC_DATABASE_TIMEOUT": "2", "IMGSVC_STORAGE_URL": f"file://{tmp_path / 'blobs'}"}  # fmt: skip
    result = cli_run(env, "purge", "--pending")
    assert result.returncode == 1 and "unavailable" in result.stderr and "Traceback" not in result.stderr
    assert cli_run(env, "purge").returncode == 2  # neither --pending nor an id
