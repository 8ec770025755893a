"""View counts: what imgsvc answers (LRU and remembered hits, misses, 304s) and what nginx answers from its cache
(`imgsvc views ingest` over its real access log) add up to the requests made, per image and day, across restarts,
log rotation, an ingest killed mid-way and a database outage; the route's rights and parameters."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
import pyvips

from imgsvc.config import Settings
from imgsvc.viewlog import counted_view
from imgsvc.views import ViewCounter
from tests.conftest import AUDIENCE, CLIENT_ID, CLIENT_SECRET, REPO, MainApp, ServerProcess, app_client, with_settings
from tests.nginx_process import NginxProcess

ID = "AAAAAAAAAAAAAAAAAAAAAA"
LIVE_ID = "Xb3kq_-9AAAAAAAAAAAAAA"


def small_jpeg(seed: int) -> bytes:
    return bytes((pyvips.Image.black(96, 64, bands=3) + seed).cast("uchar").jpegsave_buffer())


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def wait_for(condition: Callable[[], Any], what: str, within: float = 20.0) -> Any:
    """Poll `condition` until it returns something truthy (bounded: the machine may be busy)."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            assert value, f"{what}: not within {within} s"
            return value
        time.sleep(0.05)


async def async_wait_for(condition: Callable[[], Any], what: str, within: float = 20.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = await condition()
        if value or time.monotonic() > deadline:
            assert value, f"{what}: not within {within} s"
            return value
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            b'{"ts":"2026-11-29T10:00:00+00:00","method":"GET","uri":"/img/%s?w=64","status":200,"cache":"HIT",'
            b'"upstream_status":"-"}',
            (LIVE_ID, "2026-11-29"),
        ),
        (
            b'{"ts":"2026-11-29T23:30:00-02:00","method":"GET","uri":"/img/%s","status":304,"cache":"HIT",'
            b'"upstream_status":""}',
            (LIVE_ID, "2026-11-30"),
        ),  # the UTC day
        (
            b'{"ts":"2026-11-29T10:00:00+00:00","uri":"/img/%s?w=64","status":200,"cache":"STALE",'
            b'"upstream_status":"503"}',
            (LIVE_ID, "2026-11-29"),
        ),  # imgsvc answered 503: not counted there
        (b'{"ts":1700000000,"uri":"/img/%s","status":200,"cache":"hit"}', (LIVE_ID, "2023-11-14")),  # minimal (CDN)
        (b'{"ts":"2026-11-29T10:00:00Z","uri":"/img/%s","status":200,"cache":"UPDATING"}', (LIVE_ID, "2026-11-29")),
        (
            b'{"ts":"2026-11-29T10:00:00+00:00","uri":"/img/%s","status":200,"cache":"REVALIDATED",'
            b'"upstream_status":"304"}',
            None,
        ),  # imgsvc answered (and counted) the revalidation
        (
            b'{"ts":"2026-11-29T10:00:00+00:00","uri":"/img/%s","status":200,"cache":"MISS","upstream_status":"200"}',
            None,
        ),
        (b'{"ts":"2026-11-29T10:00:00+00:00","uri":"/img/%s","status":200,"cache":"EXPIRED"}', None),
        (b'{"ts":"2026-11-29T10:00:00+00:00","method":"HEAD","uri":"/img/%s","status":200,"cache":"HIT"}', None),
        (b'{"ts":"2026-11-29T10:00:00+00:00","uri":"/img/%s","status":404,"cache":"HIT"}', None),
        (b'{"ts":"2026-11-29T10:00:00+00:00","uri":"/images/%s","status":200,"cache":"HIT"}', None),
        (b'{"ts":"2026-11-29T10:00:00+00:00","uri":"/img/%s/x","status":200,"cache":"HIT"}', None),
        (b'{"ts":"2026-11-29T10:00:00+00:00","uri":"/img/%s","status":200,"cache":"-"}', None),
        (b'{"ts":"yesterday","uri":"/img/%s","status":200,"cache":"HIT"}', None),
        (b'{"uri":"/img/%s","status":200,"cache":"HIT"}', None),
        (b'{"ts":"2026-11-29T10:00:00+00:00","uri":"/img/%s","status":"x","cache":"HIT"}', None),
        (b'["not", "an", "object"]', None),
        (b'{"ts":"2026-11-29T10:00:', None),  # a torn line
        (b"\xff\xfe", None),
    ],
)
def test_which_log_lines_are_views(line: bytes, expected: tuple[str, str] | None) -> None:
    view = counted_view(line.replace(b"%s", LIVE_ID.encode()))
    assert (None if view is None else (view[0], view[1].date().isoformat())) == expected


def test_pending_counts_are_bounded_and_put_back_after_a_failed_flush() -> None:
    counter = ViewCounter(max_pending=2)
    midnight = datetime(2026, 11, 29, tzinfo=UTC).timestamp()
    for image_id, at in (("a", midnight - 1), ("a", midnight + 1), ("b", midnight + 2), ("c", midnight + 3)):
        counter.count(image_id, at)  # a on two UTC days fills the bound: b and c are dropped
    counter.count("a", midnight + 4)
    rows = counter.take()
    assert [(r.image_id, r.day.isoformat(), r.views) for r in rows] == [("a", "2026-11-28", 1), ("a", "2026-11-29", 2)]
    assert len(counter) == 0 and counter.take() == []
    counter.count("a", midnight + 5)
    counter.restore(rows)  # the flush failed: merged with what was counted meanwhile
    again = counter.take()
    assert [(r.image_id, r.day.isoformat(), r.views) for r in again] == [("a", "2026-11-28", 1), ("a", "2026-11-29", 3)]
    assert again[1].last_viewed_at == datetime.fromtimestamp(midnight + 5, UTC)


async def views_of(client: httpx.AsyncClient, image_id: str, **params: Any) -> dict[str, Any]:
    response = await client.get(f"/images/{image_id}/views", params=params)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def wait_for_total(client: httpx.AsyncClient, image_id: str, total: int) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        views = await views_of(client, image_id)
        return views if views["total"] >= total else None

    return dict(await async_wait_for(reached, f"{total} views of {image_id}"))


async def test_imgsvc_counts_hits_misses_and_304s_and_flushes_each_once(settings: Settings) -> None:
    async with app_client(with_settings(settings, views_flush_interval=0.1)) as client:
        jpeg = {"Content-Type": "image/jpeg"}
        a, b = [(await client.post("/images", content=small_jpeg(s), headers=jpeg)).json()["id"] for s in (1, 2)]
        outcomes = []

        async def get(url: str, expect: int, **headers: str) -> httpx.Response:
            response = await client.get(url, headers=headers)
            assert response.status_code == expect, (url, response.text)
            outcomes.append(response.headers.get("x-cache", str(response.status_code)))
            return response

        etag = (await get(f"/img/{a}?w=64", 200)).headers["etag"]  # a miss, then remembered
        for _ in range(3):
            await get(f"/img/{a}?w=64", 200)  # remembered hits
        await get(f"/img/{a}?w=64", 304, **{"If-None-Match": etag})
        await get(f"/img/{a}?w=48", 200)  # a miss
        await get(f"/img/{a}?w=48", 200, Range="bytes=0-10")  # the full path: an LRU hit
        assert (await client.head(f"/img/{a}?w=64")).status_code == 200  # not a view
        await get(f"/img/{a}?w=0", 400)
        await get(f"/img/{ID}?w=64", 404)
        await get(f"/img/{b}?w=64", 200)
        await get(f"/img/{b}?w=64", 304, **{"If-None-Match": (await client.get(f"/img/{b}?w=64")).headers["etag"]})
        assert outcomes.count("miss") == 3 and outcomes.count("hit") == 4 and outcomes.count("304") == 2, outcomes

        views_a = await wait_for_total(client, a, 7)
        views_b = await wait_for_total(client, b, 3)
        await asyncio.sleep(0.5)  # five more flush periods: nothing is added twice
        assert await views_of(client, a) == views_a and await views_of(client, b) == views_b
        assert views_a["total"] == 7 and views_b["total"] == 3
        assert len(views_a["days"]) == 30 and views_a["days"][-1] == {"date": today(), "views": 7}
        assert sum(day["views"] for day in views_a["days"]) == 7
        last = datetime.fromisoformat(views_a["last_viewed_at"])
        assert abs((datetime.now(UTC) - last).total_seconds()) < 120
        assert (await views_of(client, a, days=1))["days"] == [{"date": today(), "views": 7}]
        assert len((await views_of(client, a, days=365))["days"]) == 365


async def allow_connections(postgres: str, database_url: str, allowed: bool) -> None:
    """A database outage for imgsvc alone: its database refuses new connections and its open ones are cut."""
    name = urlsplit(database_url).path.lstrip("/")
    admin = await asyncpg.connect(postgres)
    try:
        await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS {str(allowed).lower()}")
        if not allowed:
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
    finally:
        await admin.close()


async def test_counts_wait_out_a_database_outage(settings: Settings, database_url: str, postgres: str) -> None:
    async with app_client(with_settings(settings, views_flush_interval=0.1, record_ttl=600)) as client:
        image = (await client.post("/images", content=small_jpeg(3), headers={"Content-Type": "image/jpeg"})).json()
        assert (await client.get(f"/img/{image['id']}?w=64")).status_code == 200
        await wait_for_total(client, image["id"], 1)
        await allow_connections(postgres, database_url, False)
        try:

            async def down() -> bool:
                return (await client.get(f"/images/{image['id']}/views")).status_code == 503

            await async_wait_for(down, "the database refusing imgsvc")
            statuses = [(await client.get(f"/img/{image['id']}?w=64")).status_code for _ in range(20)]
            assert statuses == [200] * 20  # remembered hits need no database
            await asyncio.sleep(0.5)  # several flushes fail meanwhile
        finally:
            await allow_connections(postgres, database_url, True)
        views = await wait_for_total(client, image["id"], 21)
        await asyncio.sleep(0.3)
        assert (await views_of(client, image["id"]))["total"] == views["total"] == 21


def auth_settings(settings: Settings, main: MainApp) -> Settings:
    return with_settings(settings, auth="introspect", auth_introspect_url=f"{main.url}/introspect",
                         auth_client_id=CLIENT_ID, auth_client_secret=CLIENT_SECRET, auth_audience=AUDIENCE,
                         views_flush_interval=0.1)  # fmt: skip


async def test_rights_parameters_and_deletes(settings: Settings, main: MainApp, database_url: str) -> None:
    alice, bob = main.token("alice", "images:read images:write"), main.token("bob", "images:read images:write")
    admin = main.token("root", "images:admin images:read")
    async with app_client(auth_settings(settings, main)) as client:
        headers = {"Content-Type": "image/jpeg", "Authorization": f"Bearer {alice}"}
        created = await client.post("/images", content=small_jpeg(4), headers=headers)
        image_id = created.json()["id"]
        assert (await client.get(f"/img/{image_id}?w=64")).status_code == 200
        path = f"/images/{image_id}/views"

        def as_(token: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {token}"}

        anonymous = await client.get(path)
        assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Bearer")
        assert (await client.get(path, headers=as_(bob))).status_code == 403
        assert (await client.get(f"/images/{ID}/views", headers=as_(alice))).status_code == 404

        async def alice_total() -> bool:
            return bool((await client.get(path, headers=as_(alice))).json()["total"] == 1)

        await async_wait_for(alice_total, "the view flushed")
        assert (await client.get(path, headers=as_(admin))).json()["total"] == 1
        for days in ("0", "366", "abc", "", "1.5", "-1"):
            bad = await client.get(path, params={"days": days}, headers=as_(alice))
            assert bad.status_code == 400 and bad.json()["param"] == "days", days
        twice = await client.get(f"{path}?days=1&days=2", headers=as_(alice))
        assert twice.status_code == 400 and twice.json()["param"] == "days"
        assert (await client.get(path, params={"day": "1"}, headers=as_(alice))).status_code == 400

        assert (await client.delete(f"/images/{image_id}", headers=as_(alice))).status_code == 204
        assert (await client.get(path, headers=as_(alice))).status_code == 404
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM image_views WHERE image_id = $1", image_id) == 0
    finally:
        await conn.close()


def test_counts_survive_a_restart_of_imgsvc(server_env: dict[str, str], tmp_path: Path) -> None:
    env = {**server_env, "IMGSVC_VIEWS_FLUSH_INTERVAL": "5"}
    server = ServerProcess(env, tmp_path / "server.log").start()
    try:
        image_id = httpx.post(f"{server.url}/images", content=small_jpeg(5),
                              headers={"Content-Type": "image/jpeg"}).json()["id"]  # fmt: skip
        with httpx.Client(base_url=server.url) as http:
            assert {http.get(f"/img/{image_id}?w={(32, 48, 64)[n % 3]}").status_code for n in range(25)} == {200}
    finally:
        server.stop()  # SIGTERM: the last flush runs before the process ends
    server = ServerProcess(env, tmp_path / "server.log").start()
    try:
        views = httpx.get(f"{server.url}/images/{image_id}/views").json()
        assert views["total"] == 25 and views["days"][-1] == {"date": today(), "views": 25}
    finally:
        server.stop()


# ---- nginx in front: its cache hits are counted from its access log -----------------------------------------


def ingest(server: ServerProcess, log: Path, *flags: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "imgsvc", "views", "ingest", str(log), *flags], env=server.env,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def ingest_once(server: ServerProcess, log: Path) -> str:
    proc = ingest(server, log, "--once")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out.decode()
    return out.decode()


class Scenario:
    """One image behind nginx: requests through nginx and straight to imgsvc, and the total they should make."""

    def __init__(self, server: ServerProcess, nginx: NginxProcess) -> None:
        self.server, self.nginx = server, nginx
        self.via_nginx = httpx.Client(base_url=nginx.url, timeout=30)
        self.direct = httpx.Client(base_url=server.url, timeout=30)
        response = self.via_nginx.post("/images", content=small_jpeg(6), headers={"Content-Type": "image/jpeg"})
        self.image_id = response.json()["id"]
        self.made = 0

    def requests(self, count: int, spread: float = 0.0) -> None:
        """`count` GETs: most through nginx (two variants, some with the ETag: 304s), every fifth straight to
        imgsvc; spread over `spread` seconds, so that nginx entries expire and are revalidated in between."""
        for n in range(count):
            url = f"/img/{self.image_id}?w={64 if n % 2 else 32}"
            http = self.direct if n % 5 == 4 else self.via_nginx
            etag = http.get(url).headers["etag"] if n % 7 == 6 else None
            self.made += 1 if etag is None else 2
            response = http.get(url, headers={"If-None-Match": etag} if etag else {})
            assert response.status_code == (304 if etag else 200), response.text
            time.sleep(spread / count)

    def total(self) -> int:
        return int(self.direct.get(f"/images/{self.image_id}/views").json()["total"])

    def wait_total(self) -> int:
        wait_for(lambda: self.total() >= self.made, f"{self.made} views")
        time.sleep(0.5)  # a few more flushes of imgsvc: nothing more arrives
        return self.total()


def nginx_lines(log: Path, image_id: str) -> int:
    """Lines for the image in the log and its rotated predecessor (nginx's workers reopen shortly after its master)."""
    paths = [path for path in (log, log.with_name(log.name + ".1")) if path.exists()]
    return sum(1 for path in paths for line in path.read_text().splitlines() if f"/img/{image_id}" in line)


@pytest.fixture
def behind_nginx(request: pytest.FixtureRequest, server_env: dict[str, str], tmp_path: Path, start_nginx: Any):
    env = {**server_env, "IMGSVC_VIEWS_FLUSH_INTERVAL": "0.2"}
    server = ServerProcess(env, tmp_path / "server.log").start()
    nginx = start_nginx(server.url.removeprefix("http://"), CACHE_VALID=getattr(request, "param", "10m"))
    scenario = Scenario(server, nginx)
    yield scenario
    scenario.via_nginx.close()
    scenario.direct.close()
    server.stop()


def through_nginx(scenario: Scenario, count: int, log: Path, spread: float = 0.0) -> None:
    """Make `count` requests and wait until nginx logged (it buffers up to 1 s) those it answered."""
    before = nginx_lines(log, scenario.image_id)
    scenario.requests(count, spread)
    via_nginx = sum(1 for n in range(count) if n % 5 != 4) + sum(1 for n in range(count) if n % 7 == 6 and n % 5 != 4)
    wait_for(lambda: nginx_lines(log, scenario.image_id) >= before + via_nginx, "nginx's log lines")


@pytest.mark.parametrize("behind_nginx", ["10m", "second"], indirect=True)
def test_nginx_hits_are_ingested_once_across_runs_rotation_and_truncation(behind_nginx: Scenario) -> None:
    scenario, log = behind_nginx, behind_nginx.nginx.access_log
    through_nginx(scenario, 30, log, spread=2.5 if scenario.nginx.values.get("CACHE_VALID") == "second" else 0)
    entries = [e for e in scenario.nginx.log() if e["uri"].startswith(f"/img/{scenario.image_id}")]
    answered = {e["cache"] for e in entries}
    print("nginx answered:", {cache: sum(e["cache"] == cache for e in entries) for cache in sorted(answered)})
    assert "HIT" in answered and "MISS" in answered, answered
    if scenario.nginx.values.get("CACHE_VALID") == "second":  # entries expired: imgsvc answered revalidations
        assert "REVALIDATED" in answered, answered
    ingest_once(scenario.server, log)
    assert scenario.wait_total() == scenario.made
    ingest_once(scenario.server, log)  # a second run from the saved offset counts nothing again
    assert scenario.wait_total() == scenario.made

    rotated = log.with_name(log.name + ".1")
    through_nginx(scenario, 10, log)  # lines of the file about to be rotated, after the saved offset
    log.rename(rotated)
    before = nginx_lines(log, scenario.image_id)
    scenario.requests(5)  # nginx still writes to the renamed file until it reopens its logs
    wait_for(lambda: nginx_lines(log, scenario.image_id) >= before + 4, "lines in the rotated file")
    assert not log.exists()
    assert scenario.nginx.proc is not None
    scenario.nginx.proc.send_signal(signal.SIGUSR1)  # reopen: what logrotate's postrotate does
    wait_for(log.exists, "nginx reopening its log")
    through_nginx(scenario, 10, log)
    ingest_once(scenario.server, log)
    assert scenario.wait_total() == scenario.made

    with log.open("r+b") as truncated:  # copytruncate's way (the lines before it were ingested)
        truncated.truncate(0)
    through_nginx(scenario, 10, log)
    ingest_once(scenario.server, log)
    assert scenario.wait_total() == scenario.made
    views = scenario.direct.get(f"/images/{scenario.image_id}/views").json()
    assert views["days"][-1] == {"date": today(), "views": scenario.made}


def test_a_killed_follower_restarts_from_its_committed_offset(behind_nginx: Scenario) -> None:
    scenario, log = behind_nginx, behind_nginx.nginx.access_log
    follower = ingest(scenario.server, log, "--follow", "--interval", "0.1")
    try:
        through_nginx(scenario, 20, log)
        assert scenario.wait_total() == scenario.made
        follower.kill()  # SIGKILL: whatever it had read but not committed is read again
        follower.communicate(timeout=30)
        through_nginx(scenario, 20, log)
        follower = ingest(scenario.server, log, "--follow", "--interval", "0.1")
        assert scenario.wait_total() == scenario.made
        through_nginx(scenario, 10, log)
        assert scenario.wait_total() == scenario.made
    finally:
        follower.send_signal(signal.SIGTERM)
        out, _ = follower.communicate(timeout=30)
    assert follower.returncode == 0, out.decode()
    assert "counted" in out.decode()


@pytest.mark.parametrize(("flags", "code", "says"), [((), 2, b"--once"), (("--once",), 1, b"No such file")])
def test_the_ingest_refuses_without_a_mode_or_a_log(
    server_env: dict[str, str], tmp_path: Path, flags: tuple[str, ...], code: int, says: bytes
) -> None:
    proc = subprocess.run([sys.executable, "-m", "imgsvc", "views", "ingest", str(tmp_path / "none.log"), *flags],
                          env={**os.environ, **server_env}, cwd=REPO, capture_output=True, timeout=120)  # fmt: skip
    assert proc.returncode == code and says in proc.stderr, proc.stderr
    assert b"Traceback" not in proc.stderr


def minimal_lines(image_id: str, at: datetime, count: int, cache: str = "HIT") -> str:
    """A CDN log export mapped to the minimal line format."""
    line = f'{{"ts": "{at.isoformat()}", "uri": "/img/{image_id}?w=256", "status": 200, "cache": "{cache}"}}\n'
    return line * count


def test_a_cdn_log_in_the_minimal_format_is_followed_through_a_database_outage(
    server: ServerProcess, database_url: str, postgres: str, tmp_path: Path
) -> None:
    image_id = httpx.post(f"{server.url}/images", content=small_jpeg(7), headers={"Content-Type": "image/jpeg"}).json()[
        "id"
    ]
    now = datetime.now(UTC)
    yesterday = now - timedelta(days=1)
    log = tmp_path / "cdn.log"
    log.write_text(minimal_lines(image_id, yesterday, 5) + minimal_lines(image_id, now, 3)
                   + minimal_lines(image_id, now, 2, cache="MISS"))  # fmt: skip  # misses: counted by the origin

    def views() -> dict[str, Any]:
        return dict(httpx.get(f"{server.url}/images/{image_id}/views", params={"days": 2}).json())

    follower = ingest(server, log, "--follow", "--interval", "0.1")
    try:
        wait_for(lambda: views().get("total") == 8, "the first 8 views")
        assert views()["days"] == [{"date": yesterday.date().isoformat(), "views": 5},
                                   {"date": now.date().isoformat(), "views": 3}]  # fmt: skip
        asyncio.run(allow_connections(postgres, database_url, False))
        try:
            wait_for(lambda: httpx.get(f"{server.url}/images/{image_id}/views").status_code == 503, "the outage")
            with log.open("a") as out:
                out.write(minimal_lines(image_id, now, 4))
            time.sleep(1.5)  # the follower reads them and fails to commit, more than once
            assert follower.poll() is None
        finally:
            asyncio.run(allow_connections(postgres, database_url, True))
        wait_for(lambda: views().get("total") == 12, "the views read during the outage")
        time.sleep(0.5)
        assert views()["total"] == 12
    finally:
        follower.send_signal(signal.SIGTERM)
        out, _ = follower.communicate(timeout=30)
    assert follower.returncode == 0, out.decode()
    assert b"Traceback" not in out and b"paused" in out
