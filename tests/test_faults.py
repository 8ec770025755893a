"""Fault injection, database section: Postgres killed (-9) under load, embedded (imgsvc restarts it) and external
(imgsvc must not; the test does), then a slow and an erroring one. Statuses, time to recover, nothing lost;
run with `-s` to see the measured figures."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from imgsvc.config import Settings
from imgsvc.embedded import EmbeddedPostgres
from tests.conftest import REPO, ServerProcess, app_client, free_port, with_settings
from tests.test_config import run_cli

KINDS = ("upload", "render", "metadata")
SUCCESS = {"upload": {201}, "render": {200}, "metadata": {200}}
RENDER_WIDTHS = (64, 96, 128, 256)  # on the default unsigned allow-list
_seeds = itertools.count(1)


def unique_png(seed: int, side: int = 24) -> bytes:
    """A small RGB PNG of random pixels: every seed is new bytes, so every upload is a new image."""
    rng = random.Random(seed)
    raw = b"".join(b"\x00" + rng.randbytes(side * 3) for _ in range(side))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@dataclass(frozen=True, slots=True)
class Seen:
    kind: str
    status: int  # 0: no HTTP answer at all (refused, reset, timed out)
    sent: float  # time.monotonic()
    done: float
    problem: str | None = None
    retry_after: str | None = None
    image_id: str | None = None
    sha256: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in SUCCESS[self.kind]


def upload(client: httpx.Client) -> tuple[int, str | None, str, httpx.Response | None]:
    body = unique_png(next(_seeds))
    response = client.post("/images", content=body, headers={"Content-Type": "image/png"})
    image_id = response.json()["id"] if response.status_code == 201 else None
    return response.status_code, image_id, hashlib.sha256(body).hexdigest(), response


class Load:
    """A bounded client loop in a few threads: uploads, renders and metadata reads of `images`, every answer
    recorded. It stops when told to, or by itself after `limit` seconds."""

    def __init__(self, url: str, images: list[str], threads: int = 3, limit: float = 120.0) -> None:
        self.url, self.images, self.limit = url, images, limit
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, n: int) -> None:
        rng = random.Random(n)
        ends = time.monotonic() + self.limit
        with httpx.Client(base_url=self.url, timeout=20) as client:
            for i in itertools.count(n):
                if self._stop.is_set() or time.monotonic() > ends:
                    return
                kind = KINDS[i % len(KINDS)]
                sent = time.monotonic()
                image_id, sha256, response = None, None, None
                try:
                    if kind == "upload":
                        status, image_id, sha256, response = upload(client)
                    else:
                        image_id = rng.choice(self.images)
                        path = f"/img/{image_id}?w={rng.choice(RENDER_WIDTHS)}" if kind == "render" else ""
                        response = client.get(path or f"/images/{image_id}")
                        status = response.status_code
                except httpx.HTTPError:
                    status = 0
                problem = None
                if response is not None and response.headers.get("content-type") == "application/problem+json":
                    problem = response.json().get("type")
                retry_after = response.headers.get("retry-after") if response is not None else None
                seen = Seen(kind, status, sent, time.monotonic(), problem, retry_after, image_id, sha256)
                with self._lock:
                    self.seen.append(seen)
                time.sleep(0.01)

    def snapshot(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)

    def recovered(self, since: float, quiet: float = 1.0) -> bool:
        """Every kind succeeded after the last failure, and nothing failed for `quiet` seconds."""
        seen = self.snapshot()
        last_failure = max((s.done for s in seen if not s.ok), default=since)
        fine = all(any(s.ok and s.kind == k and s.sent > last_failure for s in seen) for k in KINDS)
        return fine and time.monotonic() - max(last_failure, since) >= quiet


def wait_for(condition, within: float, what: str, every: float = 0.1) -> float:  # type: ignore[no-untyped-def]
    """Poll `condition` until it holds (bounded); the seconds it took."""
    began = time.monotonic()
    while time.monotonic() - began < within:
        if condition():
            return time.monotonic() - began
        time.sleep(every)
    raise AssertionError(f"{what}: not within {within} s")


def figures(name: str, seen: list[Seen], fault_at: float, recovered_at: float, since: tuple[str, float]) -> str:
    """One line of measured figures: statuses per kind from the fault to the last failure, time to recover."""
    during = [s for s in seen if s.sent >= fault_at and s.sent <= recovered_at]
    statuses = {k: dict(sorted(Counter(s.status for s in during if s.kind == k).items())) for k in KINDS}
    label, reference = since
    first_ok = {
        k: min((s.done for s in seen if s.ok and s.kind == k and s.sent >= reference), default=None) for k in KINDS
    }
    firsts = ", ".join(f"{k} {t - reference:.2f} s" for k, t in first_ok.items() if t is not None)
    line = (
        f"{name}: statuses during the fault {statuses}; last failure {max(recovered_at - reference, 0):.2f} s after "
        f"{label}" + (f" ({recovered_at - fault_at:.2f} s after the kill), first success of each kind sent after "
                      f"it: {firsts}" if reference != fault_at else "") + f"; {len(seen)} requests"
    )  # fmt: skip
    print(f"\n{line}")
    return line


def assert_soft_failures(seen: list[Seen], fault_at: float) -> None:
    for s in seen:
        assert s.status in SUCCESS[s.kind] | {503}, s
        if s.status == 503:  # the database's 503, problem+json with a retry hint
            assert s.problem == "/problems/unavailable" and s.retry_after, s
        if s.done < fault_at:
            assert s.ok, s


def assert_nothing_lost(url: str, seen: list[Seen], before: list[str], env: dict[str, str]) -> int:
    """Every image answered 201 (before or during the fault) reads and renders; the blobs `imgsvc gc` would
    remove are only those of uploads that were refused. Returns the number of images lost (asserted 0)."""
    created = {s.image_id: s.sha256 for s in seen if s.kind == "upload" and s.status == 201}
    refused = {s.sha256 for s in seen if s.kind == "upload" and s.status != 201}
    lost = 0
    with httpx.Client(base_url=url, timeout=30) as client:
        for image_id in [*before, *created]:
            meta = client.get(f"/images/{image_id}")
            rendered = client.get(f"/img/{image_id}?w=48")  # a size never asked before: read from the store
            lost += meta.status_code != 200 or rendered.status_code != 200
            if image_id in created:
                assert meta.json()["sha256"] == created[image_id]
    gc = subprocess.run(
        [sys.executable, "-m", "imgsvc", "gc", "--dry-run", "--grace-days", "0"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert gc.returncode == 0, gc.stderr
    orphans = {line.rsplit("/", 1)[-1] for line in gc.stdout.splitlines() if line.startswith("would remove ")}
    assert orphans <= refused, orphans - refused  # no blob of a stored image is unreferenced
    assert lost == 0
    return lost


def assert_quiet_log(log_path: Path) -> tuple[int, int]:
    text = log_path.read_text()
    assert "Traceback" not in text and "Exception in ASGI application" not in text
    down, back = text.count('"database unavailable'), text.count('"database back"')
    assert 1 <= down <= 3 and back == down, (down, back)  # one warning per change of state
    return down, back


def kill_postmaster(postgres: EmbeddedPostgres) -> int:
    pid = postgres.postmaster_pid()
    assert pid is not None and postgres.alive()
    os.kill(pid, signal.SIGKILL)
    return pid


def prepare(url: str, count: int) -> list[str]:
    """`count` images uploaded and rendered once, so this replica holds their records and a variant."""
    ids = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(count):
            status, image_id, _sha, _ = upload(client)
            assert status == 201 and image_id
            assert client.get(f"/img/{image_id}?w=64").status_code == 200
            ids.append(image_id)
    return ids


def test_embedded_postgres_killed_under_load_is_restarted_and_nothing_is_lost(tmp_path: Path) -> None:
    env = {
        "IMGSVC_DATA_DIR": str(tmp_path / "data"),
        "IMGSVC_WORKERS": "2",
        "IMGSVC_UPLOAD_RATE": "0",
        "IMGSVC_RENDER_RATE": "0",
    }
    postgres = EmbeddedPostgres(tmp_path / "data")  # imgsvc's own, looked at from outside
    server = ServerProcess(env, tmp_path / "server.log").start(timeout=120)
    try:
        before = prepare(server.url, 6)
        with Load(server.url, before) as load:
            wait_for(lambda: len(load.snapshot()) >= 30, 60, "load before the fault")
            fault_at = time.monotonic()
            killed = kill_postmaster(postgres)
            wait_for(lambda: postgres.alive() and postgres.postmaster_pid() != killed, 60, "restart by imgsvc")
            wait_for(lambda: load.recovered(fault_at), 60, "recovery")
        seen = load.snapshot()
        assert_soft_failures(seen, fault_at)
        recovered_at = max((s.done for s in seen if not s.ok), default=fault_at)
        lost = assert_nothing_lost(server.url, seen, before, env)
        figures("embedded Postgres, kill -9 of the postmaster", seen, fault_at, recovered_at, ("the kill", fault_at))
        print(f"images lost: {lost}")
        assert recovered_at - fault_at < 30  # "within seconds", with room for a busy machine
        log = server.log_path.read_text()
        assert "embedded Postgres restarted" in log
        if any(not s.ok for s in seen):
            assert_quiet_log(server.log_path)
        else:
            assert "Traceback" not in log and "Exception in ASGI application" not in log
    finally:
        server.stop()
        pid = postgres.postmaster_pid()
        if pid is not None and postgres.alive():  # imgsvc stops its Postgres on shutdown; never leave one behind
            os.kill(pid, signal.SIGTERM)


def test_external_postgres_killed_is_left_alone_and_service_recovers_when_it_returns(tmp_path: Path) -> None:
    postgres = EmbeddedPostgres(tmp_path / "external")  # an external database as far as imgsvc knows
    dsn = postgres.start()
    ttl = 8.0
    env = {
        "IMGSVC_DATABASE_URL": dsn,
        "IMGSVC_STORAGE_URL": f"file://{tmp_path / 'blobs'}",
        "IMGSVC_DATA_DIR": str(tmp_path / "data"),
        "IMGSVC_WORKERS": "2",
        "IMGSVC_UPLOAD_RATE": "0",
        "IMGSVC_RENDER_RATE": "0",
        "IMGSVC_RECORD_TTL": str(ttl),
    }
    server = ServerProcess(env, tmp_path / "server.log").start(timeout=120)
    try:
        before = prepare(server.url, 6)
        with httpx.Client(base_url=server.url, timeout=30) as client:  # neither rendered (nor its record read) yet
            cached, uncached = upload(client)[1], upload(client)[1]
        assert cached and uncached
        with Load(server.url, before) as load, httpx.Client(base_url=server.url, timeout=30) as client:
            wait_for(lambda: len(load.snapshot()) >= 30, 60, "load before the fault")
            read_sent = time.monotonic()
            assert client.get(f"/img/{cached}?w=128").status_code == 200  # its record is read now
            read_done = fault_at = time.monotonic()
            killed = kill_postmaster(postgres)
            wait_for(lambda: client.get("/readyz").status_code == 503, 30, "/readyz 503")
            ready = client.get("/readyz").json()
            assert ready["checks"]["database"].startswith("failing"), ready

            # Within the record TTL of its last read, the LRU variant of `cached` is served; then it is not.
            window: list[tuple[float, float, int, str | None]] = []
            while time.monotonic() < read_done + ttl + 0.5:
                sent = time.monotonic()
                answer = client.get(f"/img/{cached}?w=128")
                window.append((sent, time.monotonic(), answer.status_code, answer.headers.get("x-cache")))
                time.sleep(0.2)
            inside = [w for w in window if w[1] < read_sent + ttl]
            assert inside and all(status == 200 and cache == "hit" for _, _, status, cache in inside), window
            after = client.get(f"/img/{cached}?w=128")
            assert after.status_code == 503 and after.json()["type"] == "/problems/unavailable"
            for path in (f"/img/{uncached}?w=128", f"/images/{cached}"):
                answer = client.get(path)
                assert answer.status_code == 503 and answer.headers["retry-after"], path
            assert client.post("/images", content=unique_png(next(_seeds)), headers={"Content-Type": "image/png"}
                               ).status_code == 503  # fmt: skip

            # imgsvc never restarts a database it was given: still dead, still the same postmaster.pid.
            assert not postgres.alive() and postgres.postmaster_pid() == killed
            wait_for(lambda: restart_quietly(postgres), 60, "the test restarting Postgres", every=0.5)
            back_at = time.monotonic()
            wait_for(lambda: load.recovered(back_at), 60, "recovery")
        seen = load.snapshot()
        assert_soft_failures(seen, fault_at)
        assert any(s.status == 503 for s in seen), "the load saw no outage"
        recovered_at = max((s.done for s in seen if not s.ok), default=back_at)
        lost = assert_nothing_lost(server.url, seen, [*before, cached, uncached], env)
        figures("external Postgres, kill -9", seen, fault_at, recovered_at, ("the test restarted it", back_at))
        print(f"images lost: {lost}")
        print(f"outage lasted {back_at - fault_at:.1f} s; LRU-hit renders answered 200 for "
              f"{max(w[1] for w in inside) - fault_at:.2f} s into it (record read {fault_at - read_sent:.3f} s "
              f"before the kill, TTL {ttl:g} s), then 503")  # fmt: skip
        assert recovered_at - back_at < 30
        down, back = assert_quiet_log(server.log_path)
        print(f"log: {down} 'database unavailable', {back} 'database back'; "
              f"/readyz during the outage: {json.dumps(ready)}")  # fmt: skip
    finally:
        server.stop()
        postgres.stop()


def restart_quietly(postgres: EmbeddedPostgres) -> bool:
    """One restart attempt (a dead postmaster must be reaped, and its backends gone, before Postgres starts)."""
    try:
        postgres.restart()
    except Exception:
        return False
    return True


async def test_a_slow_or_erroring_database_is_503_within_its_timeout_and_heals(
    settings: Settings, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    timeout = 1.0
    async with app_client(with_settings(settings, database_timeout=timeout)) as client:
        created = await client.post("/images", content=unique_png(next(_seeds)), headers={"Content-Type": "image/png"})
        image_id = created.json()["id"]
        assert (await client.get(f"/img/{image_id}?w=64")).status_code == 200  # its record is read now
        admin = await asyncpg.connect(database_url)
        try:
            # Slow: every catalog query waits on a lock held by another session.
            async with admin.transaction():
                await admin.execute("LOCK TABLE images IN ACCESS EXCLUSIVE MODE")
                began = time.monotonic()
                slow = await client.get(f"/images/{image_id}")
                waited = time.monotonic() - began
                upload = await client.post("/images", content=unique_png(next(_seeds)),
                                           headers={"Content-Type": "image/png"})  # fmt: skip
                cached = await client.get(f"/img/{image_id}?w=64")
            print(f"\nslow database: 503 after {waited:.2f} s (IMGSVC_DATABASE_TIMEOUT={timeout:g})")
            for answer in (slow, upload):
                assert answer.status_code == 503 and answer.json()["type"] == "/problems/unavailable"
                assert answer.headers["retry-after"] and answer.headers["cache-control"] == "no-store"
            assert waited >= timeout and cached.status_code == 200
            assert (await client.get(f"/images/{image_id}")).status_code == 200  # healed, no restart

            # Erroring: the server terminates every session of this database (as an admin or a failover would).
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            statuses = [(await client.get(f"/images/{image_id}")).status_code for _ in range(3)]
            assert set(statuses) <= {200, 503} and statuses[-1] == 200, statuses
        finally:
            await admin.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "imgsvc.catalog"]
    assert "database unavailable (TimeoutError)" in messages and "database back" in messages
    assert not [r for r in caplog.records if r.exc_info], "no traceback is logged"


@pytest.mark.parametrize("command", [["gc", "--dry-run"], ["migrate"]])
def test_commands_say_the_database_is_unavailable_without_a_traceback(command: list[str], tmp_path: Path) -> None:
    env = {"IMGSVC_DATABASE_URL": f"postgresql://imgsvc@127.0.0.1:{free_port()}/imgsvc",  # nothing listens
           "IMGSVC_DATABASE_TIMEOUT": "2", "IMGSVC_STORAGE_URL": f"file://{tmp_path / 'blobs'}"}  # fmt: skip
    result = run_cli(*command, env=env)
    assert result.returncode == 1, result.stderr
    assert "unavailable" in result.stderr and "Traceback" not in result.stderr
