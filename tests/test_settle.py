"""Fast first, best later (IMGSVC_ENCODE_SETTLE): a WebP/AVIF miss is answered with a fast encode cached briefly,
settled in the background, and the settled bytes are served from then on; ETags, 304s and nginx agree."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import pyvips

from imgsvc.encoding import settled_tag
from imgsvc.headers import render_etag
from imgsvc.pipeline import PIPELINE_VERSION, PipelineLimits, render
from imgsvc.spec import TransformSpec
from tests.conftest import PHOTO, ServerProcess
from tests.nginx_process import NginxProcess
from tests.similarity import ssim

SHORT = "public, max-age=60"
IMMUTABLE = "public, max-age=31536000, immutable"
WIDTH = 1200  # above encoding.SMALL_PIXELS: settled later


StartServer = Callable[..., ServerProcess]


@pytest.fixture
def start_server(server_env: dict[str, str], tmp_path) -> Iterator[StartServer]:  # type: ignore[no-untyped-def]
    """Start imgsvc processes with extra IMGSVC_* values; every one is stopped at teardown."""
    procs: list[ServerProcess] = []

    def start(name: str, **extra: str) -> ServerProcess:
        procs.append(ServerProcess({**server_env, **extra}, tmp_path / f"{name}.log").start())
        return procs[-1]

    yield start
    for proc in procs:
        proc.stop()


@pytest.fixture
def settling(start_server: StartServer) -> ServerProcess:
    return start_server("settling", IMGSVC_ENCODE_SETTLE="true")


def upload(http: httpx.Client) -> str:
    response = http.post("/images", content=PHOTO.read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def until(
    get: Callable[[], httpx.Response], done: Callable[[httpx.Response], bool], timeout: float = 300, every: float = 0.1
) -> httpx.Response:
    """Poll (bounded) until `done` holds for an answer; the last answer either way. Generous: a settle runs at
    nice 19, so other work on a busy machine delays it."""
    deadline = time.monotonic() + timeout
    while True:
        response = get()
        if done(response) or time.monotonic() > deadline:
            return response
        time.sleep(every)


def encoded(fmt: str, effort: str) -> bytes:
    spec = TransformSpec(width=WIDTH, format=fmt)  # type: ignore[arg-type]
    return render(PHOTO.read_bytes(), spec, fmt, PipelineLimits(), None, effort=effort).data  # type: ignore[arg-type]


def etag_of(fmt: str, version: str) -> str:
    """The ETag of the photo at WIDTH: from the blob's name (its sha256), known before rendering."""
    key = TransformSpec(width=WIDTH, format=fmt).render_key()  # type: ignore[arg-type]
    return render_etag(hashlib.sha256(PHOTO.read_bytes()).hexdigest(), key, fmt, version)


def fast_miss(http: httpx.Client, fmt: str) -> tuple[str, httpx.Response]:
    """A new image's URL at WIDTH and its first answer: the fast version, short-lived."""
    url = f"/img/{upload(http)}?w={WIDTH}&fmt={fmt}"
    first = http.get(url)
    assert (first.status_code, first.headers["cache-control"]) == (200, SHORT)
    return url, first


def fast_count(http: httpx.Client) -> float:
    """Fast first encodes this server has made."""
    for line in http.get("/metrics").text.splitlines():
        if line.startswith('imgsvc_encode_settles_total{outcome="fast"}'):
            return float(line.split()[-1])
    return 0.0


def decoded(data: bytes) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(data, "")


@pytest.mark.parametrize("fmt", ["webp", "avif"])
def test_a_miss_is_fast_and_short_lived_then_settled_and_immutable(settling: ServerProcess, fmt: str) -> None:
    with httpx.Client(base_url=settling.url, timeout=60) as http:
        url, first = fast_miss(http, fmt)
        assert first.content == encoded(fmt, "fast")
        fast_etag = first.headers["etag"]

        settled = until(lambda: http.get(url), lambda r: r.headers["cache-control"] == IMMUTABLE)
        assert settled.headers["cache-control"] == IMMUTABLE
        assert settled.headers["etag"] != fast_etag
        assert settled.content == encoded(fmt, "settled")
        assert settled.headers["etag"] == etag_of(fmt, PIPELINE_VERSION + settled_tag(fmt))  # the default's if alike
        assert len(settled.content) < len(first.content)
        assert decoded(settled.content).width == WIDTH
        # As close to the unencoded pixels as the fast version (AVIF q50: both ~0.92), never another picture.
        truth = pyvips.Image.thumbnail(str(PHOTO), WIDTH).pngsave_buffer()
        assert ssim(settled.content, truth) >= max(0.9, ssim(first.content, truth) - 0.005)

        # A cache holding the fast version revalidates and gets the settled one; the settled one is current.
        again = http.get(url, headers={"If-None-Match": fast_etag})
        assert (again.status_code, again.headers["etag"], again.content) == (
            200,
            settled.headers["etag"],
            settled.content,
        )
        assert again.headers["cache-control"] == IMMUTABLE
        current = http.get(url, headers={"If-None-Match": settled.headers["etag"]})
        assert (current.status_code, current.headers["etag"]) == (304, settled.headers["etag"])
        assert http.get(url).headers["x-cache"] == "hit"


def test_the_fast_version_is_current_until_settled_and_a_dropped_settle_is_offered_again(
    start_server: StartServer,
) -> None:
    # No room for pixels: the miss's settle is dropped, so the fast version stays current.
    proc = start_server("dropping", IMGSVC_ENCODE_SETTLE="true", IMGSVC_ENCODE_SETTLE_BYTES="0")
    with httpx.Client(base_url=proc.url, timeout=60) as http:
        url, first = fast_miss(http, "webp")
        fast_etag = first.headers["etag"]
        metrics = http.get("/metrics").text
        assert 'imgsvc_encode_settles_total{outcome="dropped"} 1.0' in metrics

        # The next request (here a revalidation) is the fast version's 304, and offers the settle again:
        # without kept pixels, it renders the variant anew in the background.
        revalidated = http.get(url, headers={"If-None-Match": fast_etag})
        assert (revalidated.status_code, revalidated.headers["etag"]) == (304, fast_etag)
        assert revalidated.headers["cache-control"] == SHORT
        settled = until(lambda: http.get(url), lambda r: r.headers["cache-control"] == IMMUTABLE)
        assert settled.headers["cache-control"] == IMMUTABLE
        assert settled.content == encoded("webp", "settled")
        gone = http.get(url, headers={"If-None-Match": fast_etag})
        assert (gone.status_code, gone.headers["etag"]) == (200, settled.headers["etag"])


@pytest.mark.parametrize("fmt", ["webp", "avif"])
def test_small_variants_are_settled_at_once(settling: ServerProcess, fmt: str) -> None:
    with httpx.Client(base_url=settling.url, timeout=60) as http:
        response = http.get(f"/img/{upload(http)}?w=256&fmt={fmt}")
        assert response.headers["cache-control"] == IMMUTABLE
        spec = TransformSpec(width=256, format=fmt)  # type: ignore[arg-type]
        assert response.content == render(PHOTO.read_bytes(), spec, fmt, PipelineLimits(), None, effort="settled").data  # type: ignore[arg-type]
        assert 'imgsvc_encode_settles_total{outcome="fast"}' not in http.get("/metrics").text


@pytest.mark.parametrize("fmt", ["webp", "avif"])
def test_with_the_setting_off_every_miss_is_settled_at_once_as_before(start_server: StartServer, fmt: str) -> None:
    server = start_server("off", IMGSVC_ENCODE_SETTLE="false")
    check_as_before(server, fmt)


def check_as_before(server: ServerProcess, fmt: str) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        image_id = upload(http)
        url = f"/img/{image_id}?w={WIDTH}&fmt={fmt}"
        first = http.get(url)
        assert (first.status_code, first.headers["cache-control"]) == (200, IMMUTABLE)
        assert first.content == encoded(fmt, "default")
        assert first.headers["etag"] == etag_of(fmt, PIPELINE_VERSION)
        second = http.get(url)
        assert (second.headers["etag"], second.headers["x-cache"], second.content) == (
            first.headers["etag"], "hit", first.content)  # fmt: skip
        assert http.get(url, headers={"If-None-Match": first.headers["etag"]}).status_code == 304
        assert "imgsvc_encode_settles_total{" not in http.get("/metrics").text  # nothing fast, nothing queued


def test_nginx_serves_the_fast_version_briefly_then_the_settled_one(
    settling: ServerProcess, start_nginx: Callable[..., NginxProcess]
) -> None:
    # CACHE_VALID=second: nginx revalidates every second. It ignores Cache-Control, so with a longer CACHE_VALID
    # (production: 10m) it keeps the fast version that long.
    nginx = start_nginx(settling.url.removeprefix("http://"), CACHE_VALID="second")
    with httpx.Client(base_url=nginx.url, timeout=60) as http:
        url, first = fast_miss(http, "webp")
        assert first.content == encoded("webp", "fast")
        settled = until(lambda: http.get(url), lambda r: r.headers["cache-control"] == IMMUTABLE)
        assert settled.headers["cache-control"] == IMMUTABLE
        assert settled.content == encoded("webp", "settled")
        assert settled.headers["etag"] != first.headers["etag"]
        # From then on nginx keeps (and revalidates) the settled entry: a client's fast ETag gets the settled bytes.
        later = http.get(url, headers={"If-None-Match": first.headers["etag"]})
        assert (later.status_code, later.content) == (200, settled.content)
        assert http.get(url, headers={"If-None-Match": settled.headers["etag"]}).status_code == 304


def test_a_settled_variant_is_never_rendered_fast_again_even_without_its_bytes(
    start_server: StartServer,
) -> None:
    # No variant LRU: nothing keeps the bytes, only the memory of what was settled here.
    proc = start_server("no-lru", IMGSVC_ENCODE_SETTLE="true", IMGSVC_CACHE_BYTES="0")
    with httpx.Client(base_url=proc.url, timeout=60) as http:
        url, _ = fast_miss(http, "avif")
        # Each poll renders (no LRU), so poll slowly: a settle waits until no render is running or queued.
        settled = until(lambda: http.get(url), lambda r: r.headers["cache-control"] == IMMUTABLE, every=3)
        assert (settled.headers["cache-control"], settled.headers["x-cache"]) == (IMMUTABLE, "miss")
        assert settled.content == encoded("avif", "settled")
        fast_before = fast_count(http)
        for _ in range(3):
            again = http.get(url)
            assert (again.headers["etag"], again.content) == (settled.headers["etag"], settled.content)
        assert fast_count(http) == fast_before
