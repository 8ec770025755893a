"""S3Store against a real S3 server (SeaweedFS on loopback), plus a small loopback proxy that can
answer 503s or drop Content-Length, and endpoints that refuse or never answer."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web

from imgsvc.errors import BlobNotFound, Unavailable
from imgsvc.storage import BlobTooLarge, blob_key, open_store
from imgsvc.storage.s3 import S3Config, S3Store, parse_s3_url
from tests.seaweed import HOST, SeaweedS3


@pytest.fixture
def config(seaweed: SeaweedS3) -> S3Config:
    """The session's bucket, under a prefix of this test's own."""
    return S3Config(
        bucket=seaweed.bucket, prefix=f"t-{uuid.uuid4().hex[:8]}/blobs", endpoint_url=seaweed.endpoint_url,
        region="us-east-1", access_key_id=seaweed.access_key, secret_access_key=seaweed.secret_key, path_style=True,
    )  # fmt: skip


@pytest.fixture
async def store(config: S3Config) -> AsyncIterator[S3Store]:
    s = await S3Store.open(config)
    yield s
    await s.close()


def stored_keys(seaweed: SeaweedS3, prefix: str) -> list[str]:
    listing = seaweed.client().list_objects_v2(Bucket=seaweed.bucket, Prefix=prefix)
    return [item["Key"] for item in listing.get("Contents", [])]


def count_requests(store: S3Store) -> list[str]:
    """The HTTP method of every attempt the store's client sends (retries included)."""
    sent: list[str] = []
    store._client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.method))
    return sent


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://bucket/some/prefix") == ("bucket", "some/prefix")
    assert parse_s3_url("s3://my.bucket-1/") == ("my.bucket-1", "")
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    bad_urls = ["s3://", "s3://Bucket/x", "s3://ab/x", "s3://-bucket", "s3://a..b", "s3://192.168.1.1"]
    bad_urls += ["s3://user:pw@bucket/x", "http://bucket/x", "s3://bucket/../x", "s3://bucket/x?versionId=1"]
    for bad in bad_urls:
        with pytest.raises(ValueError):
            parse_s3_url(bad)


async def test_round_trip_and_layout(store: S3Store, seaweed: SeaweedS3) -> None:
    data = os.urandom(700_000)  # several read chunks
    key = blob_key(hashlib.sha256(data).hexdigest())
    await store.put(key, data)
    assert await store.get(key, max_bytes=len(data)) == data
    assert await store.exists(key)
    assert stored_keys(seaweed, store.prefix) == [f"{store.prefix}/{key}"]
    head = seaweed.client().head_object(Bucket=seaweed.bucket, Key=f"{store.prefix}/{key}", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()  # stored, verified


async def test_empty_prefix_means_bare_keys(config: S3Config, seaweed: SeaweedS3) -> None:
    store = await S3Store.open(replace(config, prefix=""))
    key = f"bare-{uuid.uuid4().hex}"
    try:
        await store.put(key, b"x")
        assert stored_keys(seaweed, key) == [key]
        await store.delete(key)
    finally:
        await store.close()


async def test_missing_blob(store: S3Store) -> None:
    with pytest.raises(BlobNotFound):
        await store.get("sha256/00/00/nothing", max_bytes=100)
    assert not await store.exists("sha256/00/00/nothing")
    await store.delete("sha256/00/00/nothing")  # absent is fine


async def test_exists_and_delete(store: S3Store) -> None:
    await store.put("a/b", b"payload")
    assert await store.exists("a/b")
    await store.delete("a/b")
    assert not await store.exists("a/b")
    with pytest.raises(BlobNotFound):
        await store.get("a/b", max_bytes=100)
    await store.delete("a/b")


async def test_byte_cap_by_content_length(store: S3Store) -> None:
    await store.put("capped", b"z" * 1000)
    with pytest.raises(BlobTooLarge):
        await store.get("capped", max_bytes=999)
    assert await store.get("capped", max_bytes=1000) == b"z" * 1000
    assert await store.get("capped", max_bytes=1000) == b"z" * 1000  # the aborted read left the client usable


@pytest.mark.parametrize("key", ["../x", "a/../../b", "/etc/passwd", "a//b", "./a", "a/.", "", "a\\b", "a\x00", "é"])
async def test_unsafe_keys_rejected_before_any_request(config: S3Config, key: str) -> None:
    store = await S3Store.open(replace(config, endpoint_url=f"http://{HOST}:{refused_port()}", max_attempts=1))
    sent = count_requests(store)
    try:
        for call in (lambda: store.put(key, b"x"), lambda: store.get(key, 10), lambda: store.exists(key),
                     lambda: store.delete(key)):  # fmt: skip
            with pytest.raises(ValueError):
                await call()
    finally:
        await store.close()
    assert sent == []


async def test_concurrent_writers_of_one_key(store: S3Store, seaweed: SeaweedS3) -> None:
    data = os.urandom(300_000)
    key = blob_key(hashlib.sha256(data).hexdigest())
    await asyncio.gather(*(store.put(key, data) for _ in range(20)))
    assert stored_keys(seaweed, store.prefix) == [f"{store.prefix}/{key}"]
    assert await store.get(key, max_bytes=len(data)) == data


async def test_durable_across_reopen(config: S3Config) -> None:
    first = await S3Store.open(config)
    await first.put("kept", b"still here")
    await first.close()
    second = await S3Store.open(config)
    try:
        assert await second.get("kept", max_bytes=100) == b"still here"
    finally:
        await second.close()


async def test_check(store: S3Store, config: S3Config) -> None:
    await store.check()
    other = await S3Store.open(replace(config, bucket="no-such-bucket-here", max_attempts=1))
    try:
        with pytest.raises(Unavailable):
            await other.check()
        with pytest.raises(Unavailable, match="NoSuchBucket"):  # a missing bucket is an error, not a missing blob
            await other.get("k", max_bytes=10)
    finally:
        await other.close()


# --- Failures: a proxy that answers 503 or drops Content-Length; endpoints that refuse or never answer ---


class FaultyProxy:
    """Forwards to SeaweedFS unchanged (Host included, so signatures still match), except that the first
    `fail_next` requests get a 503 SlowDown and, with `chunked`, responses lose their Content-Length."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.fail_next = 0
        self.chunked = False
        self.requests = 0
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.fail_next > 0:
            self.fail_next -= 1
            body = "<Error><Code>SlowDown</Code><Message>try again</Message></Error>"
            return web.Response(status=503, text=body, content_type="application/xml")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in {"connection", "transfer-encoding"}}
        assert self.session is not None
        async with self.session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=await request.read()
        ) as upstream:
            drop = {"connection", "transfer-encoding", "content-length"} if self.chunked else {"connection"}
            response = web.StreamResponse(
                status=upstream.status, headers={k: v for k, v in upstream.headers.items() if k.lower() not in drop}
            )
            if self.chunked:
                response.enable_chunked_encoding()
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(64 * 1024):
                await response.write(chunk)
            await response.write_eof()
            return response

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        async with aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=["User-Agent"]) as self.session:
            try:
                site = web.TCPSite(runner, HOST, 0)
                await site.start()
                host, port = runner.addresses[0][:2]
                yield f"http://{host}:{port}"
            finally:
                await runner.cleanup()


@pytest.fixture
async def proxy(seaweed: SeaweedS3) -> AsyncIterator[tuple[FaultyProxy, str]]:
    faulty = FaultyProxy(seaweed.endpoint_url)
    async with faulty.serve() as url:
        yield faulty, url


async def test_byte_cap_mid_stream(config: S3Config, proxy: tuple[FaultyProxy, str]) -> None:
    faulty, url = proxy
    store = await S3Store.open(replace(config, endpoint_url=url))
    try:
        data = os.urandom(600_000)
        await store.put("big", data)
        faulty.chunked = True  # no Content-Length: only counting the streamed bytes can stop the read
        with pytest.raises(BlobTooLarge):
            await store.get("big", max_bytes=300_000)
        assert await store.get("big", max_bytes=len(data)) == data
    finally:
        await store.close()


async def test_transient_errors_are_retried(config: S3Config, proxy: tuple[FaultyProxy, str]) -> None:
    faulty, url = proxy
    store = await S3Store.open(replace(config, endpoint_url=url, max_attempts=3))
    try:
        faulty.fail_next = 2
        await store.put("retried", b"through two 503s")
        assert faulty.requests == 3
        assert await store.get("retried", max_bytes=100) == b"through two 503s"
        faulty.fail_next = 3
        with pytest.raises(Unavailable, match="SlowDown"):  # out of attempts: the store is unavailable
            await store.get("retried", max_bytes=100)
        assert faulty.requests == 7
    finally:
        await store.close()


def refused_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def silent_endpoint() -> Iterator[str]:
    """Accepts TCP connections (the kernel's backlog) but never answers a byte."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        sock.listen(64)
        yield f"http://{HOST}:{sock.getsockname()[1]}"


@pytest.mark.parametrize("endpoint", ["refused", "silent"])
async def test_unreachable_endpoint_fails_in_bounded_time(config: S3Config, endpoint: str) -> None:
    with contextlib.ExitStack() as stack:
        url = f"http://{HOST}:{refused_port()}" if endpoint == "refused" else stack.enter_context(silent_endpoint())
        fast = replace(config, endpoint_url=url, max_attempts=2, connect_timeout=0.3, read_timeout=0.3)
        store = await S3Store.open(fast)
        sent = count_requests(store)
        try:
            calls = (store.check, lambda: store.get("k", 10), lambda: store.put("k", b"x"), lambda: store.exists("k"))
            for call in calls:
                started = time.monotonic()
                with pytest.raises(Unavailable):
                    async with asyncio.timeout(15):
                        await call()
                assert time.monotonic() - started < 5  # 2 attempts x 0.3 s timeouts + at most 1 s of backoff
        finally:
            await store.close()
    assert len(sent) == 8  # every call made its two attempts


async def test_an_outage_is_one_warning_each_way_and_fails_fast_while_probed(
    config: S3Config, proxy: tuple[FaultyProxy, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Through `open_store` (the guard the service uses): every failure is a 503 `Unavailable`; while one
    request probes the failing store the others are answered at once, without a request to it; the outage
    logs one warning when it starts and one when it ends, however many requests failed in between."""
    faulty, url = proxy
    store = await open_store(f"s3://{config.bucket}/{config.prefix}", s3=replace(config, endpoint_url=url))
    try:
        await store.put("kept", b"written before the outage")
        caplog.set_level(logging.INFO, logger="imgsvc.storage")
        faulty.fail_next = 10_000
        for _ in range(3):
            with pytest.raises(Unavailable, match="SlowDown") as failed:
                await store.get("kept", max_bytes=100)
            assert failed.value.status == 503 and failed.value.headers["Retry-After"] == "2"
        before = faulty.requests
        probe = asyncio.create_task(store.get("kept", max_bytes=100))
        await asyncio.sleep(0)  # the probe is on its way
        for _ in range(20):
            with pytest.raises(Unavailable):
                await store.get("kept", max_bytes=100)
        with pytest.raises(Unavailable):
            await probe
        assert faulty.requests - before == config.max_attempts  # only the probe reached the store
        faulty.fail_next = 0
        assert await store.get("kept", max_bytes=100) == b"written before the outage"
        await store.check()
        warnings = [r.getMessage() for r in caplog.records if r.name == "imgsvc.storage"]
        assert len(warnings) == 2, warnings
        assert "unreachable" in warnings[0] and "reachable again" in warnings[1]
    finally:
        await store.close()
