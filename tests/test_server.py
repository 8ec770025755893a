"""imgsvc as users run it: a real uvicorn process on loopback, on the embedded defaults, across restarts."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
from pathlib import Path

import httpx
import pyvips

from tests.conftest import FLICKR, IMAGES, PHOTO, ServerProcess


def test_upload_and_render_over_real_http(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        created = http.post("/images", content=PHOTO.read_bytes(), headers={"Content-Type": "image/jpeg"})
        assert created.status_code == 201, created.text
        image_id = created.json()["id"]
        rendered = http.get(f"/img/{image_id}", params={"w": "256"})
        assert rendered.status_code == 200
        out = pyvips.Image.new_from_buffer(rendered.content, "")
        assert (out.width, out.height, out.get("vips-loader")) == (256, 192, "jpegload_buffer")
        assert created.json()["urls"]["render"] == f"{server.url}/img/{image_id}"


def test_concurrent_uploads_of_the_same_bytes_over_http(server: ServerProcess, tmp_path: Path) -> None:
    data = FLICKR.read_bytes()

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{server.url}/images", content=data, headers={"Content-Type": "image/jpeg"}, timeout=30)

    def retry(_: int) -> httpx.Response:
        headers = {"Content-Type": "image/jpeg", "Idempotency-Key": "one-upload"}
        return httpx.post(f"{server.url}/images", content=data, headers=headers, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(post, range(6)))
        retries = list(pool.map(retry, range(6)))
    assert [r.status_code for r in responses + retries] == [201] * 12
    assert len({r.json()["id"] for r in responses}) == 6  # every upload its own image
    assert len({r.json()["id"] for r in retries}) == 1  # ... but a retried one is the same upload
    assert len([p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]) == 1  # and one blob for all


def test_embedded_defaults_keep_every_image_across_restarts(tmp_path: Path) -> None:
    """No database URL, no storage URL: a private Postgres and blob dir in the data dir, reused on restart."""
    env = {"IMGSVC_DATA_DIR": str(tmp_path / "data"), "IMGSVC_WORKERS": "2"}
    first = ServerProcess(env, tmp_path / "first.log").start(timeout=120)
    try:
        uploaded = {}
        for path in sorted(IMAGES.glob("*.*")):
            if path.suffix in {".jpg", ".png", ".gif", ".webp"}:  # every image of the corpus
                response = httpx.post(f"{first.url}/images", content=path.read_bytes(),
                                      headers={"Content-Type": "image/jpeg"}, timeout=30)  # fmt: skip
                assert response.status_code == 201, response.text
                uploaded[response.json()["id"]] = response.json()
        deleted = next(iter(uploaded))
        assert httpx.delete(f"{first.url}/images/{deleted}").status_code == 204
    finally:
        assert first.stop() in (0, -15)  # uvicorn re-raises SIGTERM after a graceful shutdown
    assert (tmp_path / "data" / "postgres" / "PG_VERSION").exists()

    second = ServerProcess(env, tmp_path / "second.log").start(timeout=120)
    try:
        with httpx.Client(base_url=second.url, timeout=30) as http:
            listed = http.get("/images", params={"limit": "100"}).json()["items"]
            assert {item["id"] for item in listed} == set(uploaded) - {deleted}
            for image_id, before in uploaded.items():
                if image_id == deleted:
                    assert http.get(f"/img/{image_id}", params={"w": "64"}).status_code == 404
                    continue
                after = http.get(f"/images/{image_id}").json()
                assert {k: after[k] for k in ("sha256", "width", "height", "format")} == {
                    k: before[k] for k in ("sha256", "width", "height", "format")
                }
                assert http.get(f"/images/{image_id}/original").content == (IMAGES / _name_of(before)).read_bytes()
                assert http.get(f"/img/{image_id}", params={"w": "64"}).status_code == 200
    finally:
        assert second.stop() in (0, -15)


def _name_of(record: dict) -> str:
    for path in IMAGES.iterdir():
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]:
            return path.name
    raise AssertionError("no such image")


def test_an_aborted_upload_leaves_nothing_and_the_server_healthy(server: ServerProcess, tmp_path: Path) -> None:
    import socket

    data = PHOTO.read_bytes()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        head = (f"POST /images HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()  # fmt: skip
        sock.sendall(head + data[: len(data) // 2])  # then hang up mid-body
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for _ in range(50):
            if http.get("/readyz").status_code == 200:
                break
        assert http.get("/images").json()["items"] == []
        assert not [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
        assert http.post("/images", content=data, headers={"Content-Type": "image/jpeg"}).status_code == 201
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_sigterm_drains_then_stops_without_losing_in_flight_work(server_env: dict[str, str], tmp_path: Path) -> None:
    import signal
    import threading
    import time

    server = ServerProcess({**server_env, "IMGSVC_DRAIN_SECONDS": "1.5"}, tmp_path / "drain.log").start()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(server.stop)
        http = cleanup.enter_context(httpx.Client(base_url=server.url, timeout=30))
        image_id = http.post("/images", content=PHOTO.read_bytes(), headers={"Content-Type": "image/jpeg"}).json()["id"]
        in_flight: list[httpx.Response] = []
        slow = threading.Thread(target=lambda: in_flight.append(
            httpx.get(f"{server.url}/img/{image_id}?fmt=avif&w=1920", timeout=60)))  # fmt: skip
        slow.start()
        time.sleep(0.2)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        draining = http.get("/readyz")
        assert draining.status_code == 503 and draining.json()["checks"]["draining"] == "yes"
        assert http.get("/livez").status_code == 200  # still alive and serving during the drain
        slow.join(60)
        assert in_flight and in_flight[0].status_code == 200
        assert server.proc.wait(30) in (0, -15)
    assert "Traceback" not in (tmp_path / "drain.log").read_text()


def test_a_slow_body_times_out_with_408_and_holds_nothing(server_env: dict[str, str], tmp_path: Path) -> None:
    import socket
    import time

    server = ServerProcess({**server_env, "IMGSVC_UPLOAD_IDLE_TIMEOUT": "1"}, tmp_path / "slow.log").start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST /images HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                         b"Content-Length: 100000\r\n\r\n" + PHOTO.read_bytes()[:1000])  # fmt: skip
            began = time.monotonic()
            answer = sock.recv(65536).decode("latin-1")  # then the client goes quiet
            waited = time.monotonic() - began
        assert answer.startswith("HTTP/1.1 408"), answer[:200]
        assert "request-timeout" in answer and 0.9 < waited < 5
        assert httpx.get(f"{server.url}/images").json()["items"] == []
    finally:
        server.stop()


def test_sigkill_mid_upload_leaves_catalog_and_store_consistent(server_env: dict[str, str], tmp_path: Path) -> None:
    import signal
    import socket

    from tests.test_config import run_cli

    server = ServerProcess(server_env, tmp_path / "killed.log").start()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        kept = http.post("/images", content=FLICKR.read_bytes(), headers={"Content-Type": "image/jpeg"}).json()["id"]
    data = PHOTO.read_bytes()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST /images HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}"
                     f"\r\n\r\n".encode() + data[: len(data) // 2])  # fmt: skip
        assert server.proc is not None
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
    restarted = ServerProcess(server_env, tmp_path / "restarted.log").start()
    try:
        with httpx.Client(base_url=restarted.url, timeout=30) as http:
            assert [i["id"] for i in http.get("/images").json()["items"]] == [kept]
            assert http.get(f"/img/{kept}?w=64").status_code == 200
    finally:
        restarted.stop()
    check = run_cli("gc", "--dry-run", "--grace-days", "0", env=server_env)
    assert check.returncode == 0 and "examined 1 blobs: 0 to remove, 1 kept" in check.stdout, check.stdout
