"""The nginx origin tier (nginx/): the shipped config, then a real nginx on loopback in front of a real imgsvc."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from imgsvc import nginx_deny
from imgsvc.client import RenderUrls
from tests.conftest import FLICKR, PHOTO, ServerProcess
from tests.nginx_process import NGINX_DIR, NginxProcess, config_builder, loopback_values

StartNginx = Callable[..., NginxProcess]
PER_REQUEST = {"date", "x-request-id", "x-cache-status"}  # headers that differ between two answers of one entry
CHROME = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
FIREFOX = "image/avif,image/webp,*/*"
SAFARI_16 = "image/webp,image/png,image/svg+xml,image/*;q=0.8,video/*;q=0.8,*/*;q=0.5"
NO_AVIF = "image/avif;q=0, image/webp;q=0.9, */*;q=0.1"


def upstream_of(server: ServerProcess) -> str:
    return server.url.removeprefix("http://")


@pytest.fixture
def origin(server: ServerProcess, start_nginx: StartNginx) -> NginxProcess:
    """nginx with the production values (25 MB uploads, entries fresh for 10 minutes, ...) in front of imgsvc, but
    no deny-list (nothing feeds it here; tests of it: below and test_nginx_deletes.py)."""
    return start_nginx(upstream_of(server), CACHE_VALID="10m")


@pytest.fixture
def revalidating(server: ServerProcess, start_nginx: StartNginx) -> NginxProcess:
    """The option without the Lua module: entries fresh until the second they were fetched in ends."""
    return start_nginx(upstream_of(server), CACHE_VALID="second")


@pytest.fixture
def http(origin: NginxProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=origin.url, timeout=30) as client:
        yield client


def upload(http: httpx.Client, path: Path = FLICKR, **params: str) -> str:
    response = http.post("/images", params=params, content=path.read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def reached_upstream(nginx: NginxProcess, uri: str, requests: int) -> list[dict]:
    """Of the `requests` logged for `uri`, those nginx passed upstream (to the render tier, then imgsvc)."""
    return [e for e in nginx.wait_for_log(lambda e: e["uri"] == uri, requests) if e["upstream"]]


def app_requests(server: ServerProcess, method: str, uri: str, at_least: int = 1) -> list[dict]:
    """imgsvc's access-log entries (JSON lines) for `method uri`: what really reached imgsvc. The line is
    written after the response is sent, so wait (bounded) until `at_least` are there."""
    deadline = time.monotonic() + 5
    while True:
        lines = server.log_path.read_text().splitlines()
        entries = [json.loads(line) for line in lines if line.startswith("{") and line.endswith("}")]
        found = [e for e in entries if e["logger"] == "imgsvc.access" and (e["method"], e["uri"]) == (method, uri)]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def stable(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k not in PER_REQUEST}


# ---- the configuration itself -----------------------------------------------------------------


def test_checked_in_config_is_the_rendering_of_the_template() -> None:
    assert (NGINX_DIR / "nginx.conf").read_text() == config_builder().build(), "run: python nginx/build_config.py"


def test_render_refuses_unknown_names() -> None:
    with pytest.raises(KeyError, match="LISTN"):
        config_builder().build(LISTN="80")


def test_shipped_config_passes_nginx_t(nginx_bin: str, tmp_path: Path) -> None:
    """As root, nginx/nginx.conf exactly as shipped (it opens /var/log/nginx, creates /var/cache/nginx, as a start
    would). Otherwise the same rendering with its paths moved under tmp_path, since those need root."""
    if os.geteuid() == 0:
        conf = NGINX_DIR / "nginx.conf"
    else:
        conf = tmp_path / "nginx.conf"
        (tmp_path / "tmp").mkdir()
        values = loopback_values(tmp_path, listen="127.0.0.1:1", render_listen="127.0.0.1:2", upstream="127.0.0.1:3")
        conf.write_text(
            config_builder().build({k: v for k, v in values.items() if "LISTEN" not in k and k != "DENY_LIST"})
        )
    result = subprocess.run([nginx_bin, "-t", "-e", "stderr", "-c", str(conf)],
                            capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


# ---- the cache -------------------------------------------------------------------------------


def test_miss_then_hit_with_identical_bytes_and_headers(http: httpx.Client, origin: NginxProcess,
                                                        server: ServerProcess) -> None:  # fmt: skip
    uri = f"/img/{upload(http)}?w=256"
    first, second = http.get(uri), http.get(uri)
    assert (first.status_code, second.status_code) == (200, 200)
    assert (first.headers["x-cache-status"], second.headers["x-cache-status"]) == ("MISS", "HIT")
    assert first.content == second.content and first.headers["content-type"] == "image/jpeg"
    assert stable(first) == stable(second)
    # What the browser and CDN get is imgsvc's caching contract, untouched by nginx's own validity.
    assert second.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert second.headers["etag"].startswith('"') and "vary" not in second.headers
    assert len(reached_upstream(origin, uri, 2)) == 1
    assert len(app_requests(server, "GET", uri)) == 1


def test_browsers_whose_accept_normalises_alike_share_one_entry(http: httpx.Client, origin: NginxProcess) -> None:
    uri = f"/img/{upload(http)}?w=128&fmt=auto"
    answers = [(accept, http.get(uri, headers={"Accept": accept}))
               for accept in (CHROME, FIREFOX, SAFARI_16, NO_AVIF, "*/*", "image/*")]  # fmt: skip
    seen = [(r.headers["content-type"], r.headers["x-cache-status"], r.headers["vary"]) for _, r in answers]
    assert seen == [
        ("image/avif", "MISS", "Accept"), ("image/avif", "HIT", "Accept"),  # Chrome, then Firefox
        ("image/webp", "MISS", "Accept"), ("image/webp", "HIT", "Accept"),  # Safari 16, then avif;q=0
        ("image/jpeg", "MISS", "Accept"), ("image/jpeg", "HIT", "Accept"),  # */*, then image/*
    ]  # fmt: skip
    assert answers[0][1].content == answers[1][1].content
    assert [e["fmt"] for e in reached_upstream(origin, uri, 6)] == ["avif", "webp", "legacy"]

    explicit = f"{uri.replace('fmt=auto', 'fmt=webp')}"
    chrome, legacy = http.get(explicit, headers={"Accept": CHROME}), http.get(explicit, headers={"Accept": "*/*"})
    assert (chrome.headers["x-cache-status"], legacy.headers["x-cache-status"]) == ("MISS", "HIT")
    assert "vary" not in legacy.headers and legacy.headers["content-type"] == "image/webp"


def test_thirty_concurrent_identical_misses_render_once(http: httpx.Client, origin: NginxProcess,
                                                        server: ServerProcess) -> None:  # fmt: skip
    uri = f"/img/{upload(http, PHOTO)}?w=1920&fmt=webp"  # a slow render: the 30 overlap it
    barrier = threading.Barrier(30, timeout=10)

    def get(_: int) -> httpx.Response:
        barrier.wait()
        return httpx.get(f"{origin.url}{uri}", timeout=30)

    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        responses = list(pool.map(get, range(30)))
    assert {r.status_code for r in responses} == {200}
    assert len({r.content for r in responses}) == 1
    entries = origin.wait_for_log(lambda e: e["uri"] == uri, 30)
    assert len(entries) == 30
    assert len([e for e in entries if e["upstream"]]) == 1
    assert len(app_requests(server, "GET", uri)) == 1
    assert sum(1 for e in entries if e["rt"] > 0.1) > 1, "the requests did not overlap the render"


def test_private_responses_are_never_cached(http: httpx.Client, origin: NginxProcess) -> None:
    """In auth mode `none` anyone may view a private image, answered `private, no-cache`: nginx must not share it."""
    uri = f"/img/{upload(http, visibility='private')}?w=64"
    answers = [http.get(uri) for _ in range(3)]
    assert [(r.status_code, r.headers["x-cache-status"]) for r in answers] == [(200, "MISS")] * 3
    assert answers[0].headers["cache-control"] == "private, no-cache"
    assert len(reached_upstream(origin, uri, 3)) == 3
    assert origin.cache_files() == []


def test_credentials_bypass_the_cache_and_never_reach_a_key(http: httpx.Client, origin: NginxProcess) -> None:
    uri = f"/img/{upload(http)}?w=64"
    token = "tok-7f3a9c-never-on-disk"
    with_token = http.get(uri, headers={"Authorization": f"Bearer {token}"})
    assert (with_token.status_code, with_token.headers["x-cache-status"]) == (200, "BYPASS")
    assert origin.cache_files() == []  # a credentialed answer is not stored
    assert [http.get(uri).headers["x-cache-status"] for _ in range(2)] == ["MISS", "HIT"]
    assert http.get(uri, headers={"Authorization": f"Bearer {token}"}).headers["x-cache-status"] == "BYPASS"
    (entry,) = origin.cache_files()
    stored = entry.read_bytes()
    assert f"\nKEY: img|{uri}|url\n".encode() in stored
    assert token.encode() not in stored and b"Bearer" not in stored


def test_head_and_conditional_requests_through_the_cache(http: httpx.Client, origin: NginxProcess,
                                                         server: ServerProcess) -> None:  # fmt: skip
    image_id = upload(http)
    uri = f"/img/{image_id}?w=256"
    head = http.head(uri)  # a HEAD miss fetches (and stores) the GET
    assert (head.status_code, head.headers["x-cache-status"], head.content) == (200, "MISS", b"")
    get = http.get(uri)
    assert get.headers["x-cache-status"] == "HIT"
    assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.content))
    assert stable(head) == stable(get)
    again = http.head(uri)
    assert (again.headers["x-cache-status"], again.content, stable(again)) == ("HIT", b"", stable(get))

    etag = get.headers["etag"]
    not_modified = http.get(uri, headers={"If-None-Match": etag})
    assert (not_modified.status_code, not_modified.headers["x-cache-status"]) == (304, "HIT")
    assert not_modified.content == b""
    assert not_modified.headers["etag"] == etag
    assert not_modified.headers["cache-control"] == get.headers["cache-control"]
    assert http.get(uri, headers={"If-None-Match": '"other"'}).status_code == 200

    # A conditional request on a miss: nginx fetches the full answer, stores it, and answers 304.
    auto = f"/img/{image_id}?w=128&fmt=auto"
    auto_etag = httpx.head(f"{server.url}{auto}", headers={"Accept": "image/avif"}).headers["etag"]
    first = http.get(auto, headers={"Accept": CHROME, "If-None-Match": auto_etag})
    assert (first.status_code, first.headers["x-cache-status"], first.headers["vary"]) == (304, "MISS", "Accept")
    full = http.get(auto, headers={"Accept": FIREFOX})
    assert (full.status_code, full.headers["x-cache-status"], full.headers["etag"]) == (200, "HIT", auto_etag)
    assert full.content[4:12] == b"ftypavif"
    assert len(reached_upstream(origin, auto, 2)) == 1


# ---- CACHE_VALID=second: revalidation, and how long a deleted image may still be served -----------

# An entry is fresh until the end of the (wall-clock) second the render tier fetched or revalidated it in
# (its X-Accel-Expires), so nginx serves it for at most one second. The production deny-list: test_nginx_deletes.py.
BOUND = 1


def early_in_a_second() -> None:
    """Wait until a wall-clock second (nginx's unit) has just begun, so an entry filled now is fresh for ~1 s."""
    while time.time() % 1 > 0.2:
        time.sleep(0.01)


def test_an_expired_entry_is_revalidated_with_a_304(revalidating: NginxProcess) -> None:
    with httpx.Client(base_url=revalidating.url, timeout=30) as http:
        uri = f"/img/{upload(http)}?w=64"
        first = http.get(uri)
        assert first.headers["x-cache-status"] == "MISS"
        time.sleep(BOUND + 0.2)
        early_in_a_second()  # so that the next request is still in the revalidation's second
        later = http.get(uri)
        assert (later.status_code, later.headers["x-cache-status"]) == (200, "REVALIDATED")
        assert later.content == first.content and stable(later) == stable(first)
        assert http.get(uri).headers["x-cache-status"] == "HIT"
    assert [e["upstream_status"] for e in reached_upstream(revalidating, uri, 3)] == ["200", "304"]


def test_a_burst_when_a_hot_entry_expires_is_not_refused(revalidating: NginxProcess) -> None:
    """A hot entry expires while a CDN edge (one address) asks for it 100 times at once. nginx locks only
    new entries, so each request goes to the render tier as a revalidation (a cheap 304): none may be
    refused by the render tier's limits (they were: 429 EXPIRED, measured at every expiry under load)."""
    with httpx.Client(base_url=revalidating.url, timeout=30) as http:
        uri = f"/img/{upload(http)}?w=64"
        assert http.get(uri).headers["x-cache-status"] == "MISS"
    host, port = revalidating.url.removeprefix("http://").split(":")
    sockets = [socket.create_connection((host, int(port)), timeout=30) for _ in range(100)]
    try:
        time.sleep(BOUND + 0.2)
        request = f"GET {uri} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        for sock in sockets:  # all 100 within a millisecond or two, like a loaded edge
            sock.sendall(request)
        heads = []
        for sock in sockets:
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            heads.append(answer.split(b"\r\n", 1)[0].decode())
    finally:
        for sock in sockets:
            sock.close()
    assert collections.Counter(heads) == {"HTTP/1.1 200 OK": 100}


def test_a_deleted_image_stops_being_served_when_its_validity_ends(
    revalidating: NginxProcess, server: ServerProcess
) -> None:
    with httpx.Client(base_url=revalidating.url, timeout=30) as http:
        for _ in range(5):  # until nginx still had the entry after the delete (a stall may cross a second)
            image_id = upload(http)
            uri = f"/img/{image_id}?w=64"
            early_in_a_second()
            assert http.get(uri).headers["x-cache-status"] == "MISS"
            filled = time.monotonic()  # nginx stored the entry before this
            assert http.delete(f"/images/{image_id}").status_code == 204
            assert httpx.get(f"{server.url}{uri}").status_code == 404  # imgsvc forgets it at once
            cached = http.get(uri)  # ... while nginx still has it: the bound below is not vacuous
            if (cached.status_code, cached.headers["x-cache-status"]) == (200, "HIT"):
                break
        else:
            pytest.fail(f"nginx never served the entry after the delete: {cached.headers}")

        # Poll; `started` is when each request left, relative to `filled` (after nginx stored the entry).
        seen: list[tuple[float, int, str]] = []
        while not seen or (seen[-1][1] != 404 and seen[-1][0] < BOUND + 3):
            started = time.monotonic() - filled
            response = http.get(uri)
            seen.append((started, response.status_code, response.headers["x-cache-status"]))
            time.sleep(0.05)
        assert seen[-1][1:] == (404, "EXPIRED"), seen[-3:]  # nginx revalidated, imgsvc said 404
        assert all(started <= BOUND for started, status, _ in seen if status == 200), seen[-3:]
        assert seen[-1][0] <= BOUND + 1, seen[-3:]  # and the 404 came right after it (slack for a slow machine)
        assert {(r.status_code, r.headers["x-cache-status"]) for r in (http.get(uri) for _ in range(3))} == {
            (404, "HIT")
        }


def test_deleting_one_of_two_images_of_a_photo_leaves_the_other_served(
    http: httpx.Client, server: ServerProcess
) -> None:
    kept, gone = upload(http, category="avatar"), upload(http, category="post")  # one blob, two images
    for image_id in (kept, gone):
        assert http.get(f"/img/{image_id}?w=96").headers["x-cache-status"] == "MISS"
    assert http.delete(f"/images/{gone}").status_code == 204
    assert httpx.get(f"{server.url}/img/{gone}?w=96").status_code == 404
    cached = http.get(f"/img/{kept}?w=96")
    assert (cached.status_code, cached.headers["x-cache-status"]) == (200, "HIT")
    fresh = http.get(f"/img/{kept}?w=128")  # a miss goes through to imgsvc, which still renders it
    assert (fresh.status_code, fresh.headers["x-cache-status"]) == (200, "MISS")
    assert fresh.headers["content-type"] == "image/jpeg" and len(fresh.content) > 1000
    assert http.get(f"/images/{kept}").json()["category"] == "avatar"
    assert http.get(f"/images/{kept}/original").content == FLICKR.read_bytes()


def test_stale_copies_are_served_only_while_imgsvc_fails(revalidating: NginxProcess, server: ServerProcess) -> None:
    """The one exception to the bound above: with imgsvc down, nginx keeps answering from what it has."""
    with httpx.Client(base_url=revalidating.url, timeout=30) as http:
        uri = f"/img/{upload(http)}?w=64"
        first = http.get(uri)
        server.stop()
        time.sleep(BOUND + 0.2)
        stale = http.get(uri)
        assert (stale.status_code, stale.headers["x-cache-status"], stale.content) == (200, "STALE", first.content)
        assert http.get(f"{uri}&v=new").status_code == 502  # nothing to fall back on


# ---- the deny-list (production): its feed, and what a node does with a denied id -----------------

FEED_KEY = "feed-key-for-this-test-0123456789"


def test_the_deny_list_feed_takes_ids_only_with_the_key(server: ServerProcess, start_nginx: StartNginx) -> None:
    node = start_nginx(upstream_of(server), DENY_LIST="on", purge_key=FEED_KEY)
    url, key = node.purge_url + nginx_deny.FEED_PATH, {"Authorization": f"Bearer {FEED_KEY}"}
    with httpx.Client(timeout=30) as http:
        for headers in ({}, {"Authorization": "Bearer " + "x" * len(FEED_KEY)}, {"Authorization": FEED_KEY}):
            assert http.post(url, content=b"abc\n", headers=headers).status_code == 403
        for body in (b"a b\n", b"../x\n", b"x" * 65 + b"\n", b"ok\n\xff\n"):
            assert http.post(url, content=body, headers=key).status_code == 400, body
        assert http.put(url, content=b"abc\n", headers=key).status_code == 405
        state = http.get(url, headers=key).json()
        assert state["synced"] is False and state["window"] == 660  # CACHE_VALID 10m + 60 s
        assert http.post(f"{url}?sync=another-epoch", content=b"", headers=key).json()["synced"] is False
        assert http.post(f"{url}?sync={state['epoch']}", content=b"", headers=key).json()["synced"] is True
        assert http.get(node.url + nginx_deny.FEED_PATH).status_code == 404  # not on the public tier (imgsvc's 404)


def test_a_node_nobody_fed_bypasses_its_cache_and_a_denied_id_gets_imgsvcs_answer(
    server: ServerProcess, start_nginx: StartNginx
) -> None:
    """Fail closed: until fed (after every start), no hit; a denied id has keys of its own, where only imgsvc's 4xx
    is stored, so a live image denied by mistake (a re-sent purge) is served fresh, never from a stored copy."""
    node = start_nginx(upstream_of(server), DENY_LIST="on", purge_key=FEED_KEY)
    feed = node.purge_url + nginx_deny.FEED_PATH
    with httpx.Client(base_url=node.url, timeout=30) as http:
        live, deleted = upload(http), upload(http)
        statuses = [http.get(f"/img/{live}?w=64").headers["x-cache-status"] for _ in range(2)]
        assert statuses == ["BYPASS", "BYPASS"]
        epoch = http.get(feed, headers={"Authorization": f"Bearer {FEED_KEY}"}).json()["epoch"]
        body = f"{live}\n{deleted}\n".encode()
        fed = http.post(f"{feed}?sync={epoch}", content=body, headers={"Authorization": f"Bearer {FEED_KEY}"})
        assert fed.json()["synced"] is True
        assert http.delete(f"/images/{deleted}").status_code == 204
        answers = [http.get(f"/img/{live}?w=64") for _ in range(2)]
        assert [(a.status_code, a.headers["x-cache-status"]) for a in answers] == [(200, "MISS")] * 2
        answers = [http.get(f"/img/{deleted}?w=64") for _ in range(2)]
        assert [(a.status_code, a.headers["x-cache-status"]) for a in answers] == [(404, "MISS"), (404, "HIT")]
        assert answers[1].headers["content-type"] == "application/problem+json"
        other = upload(http)  # not denied: cached as usual
        assert [http.get(f"/img/{other}?w=64").headers["x-cache-status"] for _ in range(2)] == ["MISS", "HIT"]


@pytest.mark.parametrize(("cache_tags", "strip"), [("true", "off"), ("true", "on"), ("false", "off")])
def test_cache_tags_pass_to_the_cdn_unless_stripped(
    server_env: dict[str, str], tmp_path: Path, start_nginx: StartNginx, cache_tags: str, strip: str
) -> None:
    """Every variant, fresh or from nginx's cache, 200 or 304, names its image for a CDN's purge by tag."""
    app = ServerProcess(server_env | {"IMGSVC_CACHE_TAGS": cache_tags}, tmp_path / "server.log").start()
    try:
        nginx = start_nginx(upstream_of(app), STRIP_CACHE_TAGS=strip)
        with httpx.Client(base_url=nginx.url, timeout=30) as http:
            image_id = upload(http)
            sent = (f"img-{image_id}",) * 2 if cache_tags == "true" else (None, None)
            for uri in (f"/img/{image_id}?w=64", f"/img/{image_id}?w=96&fmt=auto"):
                answers = [http.get(uri, headers={"Accept": CHROME}) for _ in range(2)]
                assert answers[0].headers["x-cache-status"] == "MISS"
                assert answers[1].headers["x-cache-status"] in ("HIT", "REVALIDATED")
                for answer in answers:
                    tags = (answer.headers.get("surrogate-key"), answer.headers.get("cache-tag"))
                    assert tags == ((None, None) if strip == "on" else sent)
                    assert "x-accel-expires" not in answer.headers  # nginx's own, hidden from clients
                direct = httpx.get(f"{app.url}{uri}", headers={"Accept": CHROME})
                again = httpx.get(
                    f"{app.url}{uri}", headers={"Accept": CHROME, "If-None-Match": direct.headers["etag"]}
                )
                assert again.status_code == 304
                for answer in (direct, again):  # imgsvc sends them whatever nginx does with them
                    assert (answer.headers.get("surrogate-key"), answer.headers.get("cache-tag")) == sent
    finally:
        app.stop()


def test_signed_urls_with_an_expiry_are_not_stretched_by_nginx(server_env: dict[str, str], tmp_path: Path,
                                                               start_nginx: StartNginx) -> None:  # fmt: skip
    """imgsvc bounds `max-age` by `exp`; nginx ignores Cache-Control, so it must not store these at all."""
    secret = "s" * 40
    app = ServerProcess(server_env | {"IMGSVC_SIGNING_KEYS": f"k1:{secret}"}, tmp_path / "server.log").start()
    try:
        nginx = start_nginx(upstream_of(app))
        with httpx.Client(base_url=nginx.url, timeout=30) as http:
            image_id = upload(http)
            signed = RenderUrls(nginx.url, [("k1", secret)]).url(image_id, w=333, expires_in=60)
            exp = int(parse_qs(urlsplit(signed).query)["exp"][0])
            sent = time.time()
            answers = [http.get(signed) for _ in range(2)]
            answered = time.time()
            assert [(r.status_code, r.headers["x-cache-status"]) for r in answers] == [(200, "BYPASS")] * 2
            max_age = re.fullmatch(r"public, max-age=(\d+)", answers[0].headers["cache-control"])
            assert max_age and exp - answered - 1 <= int(max_age[1]) <= exp - sent + 1, (exp, sent, answered, max_age)
            unexpiring = RenderUrls(nginx.url, [("k1", secret)]).url(image_id, w=333)
            assert [http.get(unexpiring).headers["x-cache-status"] for _ in range(2)] == ["MISS", "HIT"]
    finally:
        app.stop()


# ---- uploads -----------------------------------------------------------------------------------

APP_LIMIT = 1_000_000


@pytest.fixture
def small_limit(server_env: dict[str, str], tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(server_env | {"IMGSVC_MAX_UPLOAD_BYTES": str(APP_LIMIT)}, tmp_path / "server.log").start()
    yield proc
    proc.stop()


def jpeg_like(size: int) -> bytes:
    """`size` bytes that start like a JPEG (the limit is checked before the content)."""
    return b"\xff\xd8\xff" + b"\0" * (size - 3)


def chunks_of(data: bytes, size: int = 65_536) -> Iterator[bytes]:
    """A chunked body: httpx sends a generator with Transfer-Encoding: chunked, one chunk per item."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def from_nginx(response: httpx.Response) -> bool:
    return response.headers["content-type"].startswith("text/html")


def test_oversized_uploads_are_refused_by_nginx_and_by_the_app(small_limit: ServerProcess,
                                                               start_nginx: StartNginx) -> None:  # fmt: skip
    """Production: nginx's limit equals the app's (25000000), so nginx refuses first. Here one nginx has the same
    limit as imgsvc, and one a larger limit, so that what passes nginx shows imgsvc refusing it too."""
    equal = start_nginx(upstream_of(small_limit), MAX_BODY=str(APP_LIMIT))
    wide = start_nginx(upstream_of(small_limit), MAX_BODY=str(2 * APP_LIMIT))
    jpeg = {"Content-Type": "image/jpeg"}
    with httpx.Client(timeout=30) as http:
        over = http.post(f"{equal.url}/images", content=jpeg_like(APP_LIMIT + 1), headers=jpeg)
        assert over.status_code == 413 and from_nginx(over)  # Content-Length: before any byte goes upstream
        (logged,) = equal.wait_for_log(lambda e: e["uri"] == "/images", 1)
        assert logged["upstream"] == "" and app_requests(small_limit, "POST", "/images", at_least=0) == []

        streamed = http.post(f"{equal.url}/images", content=chunks_of(jpeg_like(APP_LIMIT + 200_000)), headers=jpeg)
        assert streamed.status_code == 413 and from_nginx(streamed)  # chunked: nginx counts as it streams

        for body in (jpeg_like(APP_LIMIT + 100_000), chunks_of(jpeg_like(APP_LIMIT + 100_000))):
            refused = http.post(f"{wide.url}/images", content=body, headers=jpeg)  # passes nginx, not imgsvc
            assert refused.status_code == 413 and refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["type"].endswith("/payload-too-large")

        # Under the limit, a chunked upload streams through (request buffering off) and is stored.
        assert FLICKR.stat().st_size < APP_LIMIT
        created = http.post(f"{equal.url}/images", content=chunks_of(FLICKR.read_bytes()), headers=jpeg)
        assert created.status_code == 201, created.text
        assert http.get(f"{equal.url}/images/{created.json()['id']}/original").content == FLICKR.read_bytes()
        listed = http.get(f"{equal.url}/images", params={"limit": "100"}).json()["items"]
        assert [item["id"] for item in listed] == [created.json()["id"]]  # no refused upload left a record


# ---- what imgsvc learns about each request -----------------------------------------------------


def test_request_ids_pass_through(http: httpx.Client, origin: NginxProcess) -> None:
    image_id = upload(http)
    meta = http.get(f"/images/{image_id}", headers={"X-Request-ID": "trace-1.a"})
    assert meta.headers["x-request-id"] == "trace-1.a"  # echoed by imgsvc, so it got there
    uri = f"/img/{image_id}?w=64"
    filled = http.get(uri, headers={"X-Request-ID": "fill-2"})
    hit = http.get(uri, headers={"X-Request-ID": "hit-3"})
    assert (filled.headers["x-request-id"], hit.headers["x-request-id"]) == ("fill-2", "hit-3")
    generated = http.get(uri, headers={"X-Request-ID": "not an id; <script>"}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    logged = origin.wait_for_log(lambda e: e["uri"] == uri, 3)
    assert [e["request_id"] for e in logged] == ["fill-2", "hit-3", generated]


def test_imgsvc_sees_the_real_client_address(http: httpx.Client, origin: NginxProcess,
                                             server: ServerProcess) -> None:  # fmt: skip
    """The client connects from 127.0.0.2; uvicorn trusts only 127.0.0.1 (its default FORWARDED_ALLOW_IPS), i.e. nginx,
    and a forged X-Forwarded-For from the client is replaced, not believed."""
    image_id = upload(http)
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=origin.url, transport=transport, timeout=30) as client:
        forged = {"X-Forwarded-For": "203.0.113.9", "X-Real-IP": "203.0.113.9"}
        assert client.get(f"/img/{image_id}?w=64", headers=forged).status_code == 200  # via the render tier
        assert client.get(f"/images/{image_id}", headers=forged).status_code == 200  # straight to imgsvc
    for uri in (f"/img/{image_id}?w=64", f"/images/{image_id}"):
        (entry,) = app_requests(server, "GET", uri)
        assert entry["client"] == "127.0.0.2", entry  # from the trusted proxy's header, not the forged one
    logged = origin.wait_for_log(lambda e: e["uri"].endswith(f"{image_id}?w=64"), 1)
    assert {e["client"] for e in logged} == {"127.0.0.2"}


# ---- limits and routes -------------------------------------------------------------------------


def test_rate_limit_applies_to_misses_only(http: httpx.Client, origin: NginxProcess) -> None:
    image_id = upload(http)
    hot = f"/img/{image_id}?w=64"
    assert http.get(hot).status_code == 200

    def burst(uris: list[str]) -> list[httpx.Response]:
        with concurrent.futures.ThreadPoolExecutor(len(uris)) as pool:
            return list(pool.map(lambda uri: httpx.get(f"{origin.url}{uri}", timeout=30), uris))

    misses = burst([f"/img/{image_id}?w=64&v=burst{i}" for i in range(40)])
    statuses = [r.status_code for r in misses]
    assert statuses.count(429) > 0 and statuses.count(200) >= 21, statuses  # 10 r/s, burst 20, per client
    assert {r.headers["x-cache-status"] for r in misses if r.status_code == 429} == {"MISS"}
    hits = burst([hot] * 40)
    assert {(r.status_code, r.headers["x-cache-status"]) for r in hits} == {(200, "HIT")}
    time.sleep(0.3)  # the per-client bucket refills at 10 r/s
    refused = misses[statuses.index(429)].request.url.raw_path.decode()
    retried = http.get(refused)  # a 429 was not stored
    assert (retried.status_code, retried.headers["x-cache-status"]) == (200, "MISS")


def test_routes_and_methods(http: httpx.Client, origin: NginxProcess) -> None:
    assert http.get("/livez").status_code == 200
    assert http.get("/readyz").status_code == 200
    image_id = upload(http)
    assert http.post(f"/img/{image_id}?w=64").status_code == 403  # GET and HEAD only
    assert http.put("/images", content=b"x").status_code == 403
    assert [item["id"] for item in http.get("/images").json()["items"]] == [image_id]
    original = http.get(f"/images/{image_id}/original")
    assert original.content == FLICKR.read_bytes() and "x-cache-status" not in original.headers
    assert http.delete(f"/images/{image_id}").status_code == 204
    assert http.get(f"/images/{image_id}").status_code == 404


def test_purging_an_image_removes_every_cached_variant(http: httpx.Client, origin: NginxProcess) -> None:
    """The purge command of nginx/README.md, with this nginx's cache dir."""
    image_id, other = upload(http), upload(http, PHOTO)
    uris = [f"/img/{image_id}?w=64", f"/img/{image_id}?w=128&fmt=auto", f"/img/{other}?w=64"]
    assert [http.get(uri).headers["x-cache-status"] for uri in uris] == ["MISS"] * 3
    purge = f'grep -rlF --null -e "KEY: img|/img/$ID?" -e "KEY: img|/img/$ID|" {origin.cache_dir} | xargs -0 -r rm -f'
    subprocess.run(["bash", "-c", purge], env={**os.environ, "ID": image_id}, check=True, timeout=30)
    assert [http.get(uri).headers["x-cache-status"] for uri in uris] == ["MISS", "MISS", "HIT"]
