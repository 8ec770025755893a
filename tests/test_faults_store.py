"""Blob-store faults against real processes: SeaweedFS stopped and restarted, or silent, under a bounded
loop of uploads and renders; a filesystem store that fills up (a size-limited tmpfs in a private mount
namespace); nginx in front of a stopped or frozen imgsvc. Each prints the statuses seen during the fault,
the time to recover and the images lost (asserted 0)."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import pyvips

from tests.conftest import REPO, ServerProcess, s3_env, wait_until_ready
from tests.nginx_process import NginxProcess
from tests.seaweed import SeaweedS3

# The allow-list and upload rate limit have their own tests; here traffic varies sizes freely, uploads often.
ANY_SIZE = {"IMGSVC_UNSIGNED_WIDTHS": "*", "IMGSVC_UPLOAD_RATE": "0", "IMGSVC_RENDER_RATE": "0"}
NO_CACHES = {"IMGSVC_CACHE_BYTES": "0", "IMGSVC_ORIGINALS_CACHE_BYTES": "0", "IMGSVC_DECODED_CACHE_BYTES": "0"}
JPEG = {"Content-Type": "image/jpeg"}


def noise_jpeg(seed: int, size: int = 96) -> bytes:
    """A distinct JPEG per seed (distinct sha256, so every upload stores a new blob); noise barely compresses."""
    bands = [pyvips.Image.gaussnoise(size, size, mean=128, sigma=40, seed=seed * 3 + i).cast("uchar") for i in range(3)]
    return bytes(bands[0].bandjoin(bands[1:]).jpegsave_buffer(Q=95))


def upload(http: httpx.Client, data: bytes) -> httpx.Response:
    return http.post("/images", content=data, headers=JPEG)


def is_unavailable(response: httpx.Response) -> bool:
    return (
        response.status_code == 503
        and response.headers["content-type"] == "application/problem+json"
        and response.json()["type"] == "/problems/unavailable"
        and int(response.headers["retry-after"]) > 0
    )


def until(condition: Callable[[], bool], timeout: float, step: float = 0.1) -> float:
    """Poll `condition` until true; the seconds it took. Fails the test past `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(step)
    return time.monotonic() - started


def gc_dry_run(env: dict[str, str]) -> str:
    """`imgsvc gc --dry-run` with no grace: every blob no live image references (an orphan) is listed."""
    result = subprocess.run([sys.executable, "-m", "imgsvc", "gc", "--dry-run", "--grace-days", "0"],
                            env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True, timeout=120,
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def orphans(report: str) -> set[str]:
    return {line.rsplit("/", 1)[-1] for line in report.splitlines() if line.startswith("would remove")}


def nothing_lost(http: httpx.Client, stored: dict[str, bytes]) -> int:
    """Every image answered 201 renders and gives back its exact bytes; the number that do not."""
    lost = 0
    for image_id, data in stored.items():
        rendered = http.get(f"/img/{image_id}?w=33")
        original = http.get(f"/images/{image_id}/original")
        if rendered.status_code != 200 or original.content != data:
            lost += 1
    return lost


def log_lines(server: ServerProcess, needle: str) -> list[str]:
    return [line for line in server.log_path.read_text().splitlines() if needle in line]


class Traffic:
    """Background loops of uploads (each a new image) and renders of known images at new sizes, bounded in
    time, recording (seconds since start, kind, status), which uploads were stored and which refused."""

    def __init__(self, url: str, known: dict[str, bytes], threads: int = 3) -> None:
        self.url = url
        self.known = dict(known)
        self.threads = threads
        self.seen: list[tuple[float, float, str, int]] = []  # (sent, answered, kind, status), seconds
        self.stored: dict[str, bytes] = {}
        self.refused: dict[str, bytes] = {}  # sha256 -> bytes of uploads answered 503
        self.bad: list[str] = []  # any answer a store fault does not allow
        self.started = time.monotonic()
        self._stop = threading.Event()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @contextlib.contextmanager
    def running(self, limit: float = 240.0) -> Iterator[Traffic]:
        with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
            loops = [pool.submit(self._loop, n, limit) for n in range(self.threads)]
            try:
                yield self
            finally:
                self._stop.set()
                for loop in loops:
                    loop.result(timeout=120)

    def _loop(self, n: int, limit: float) -> None:
        rng = random.Random(n)
        with httpx.Client(base_url=self.url, timeout=60) as http:
            for i in itertools.count():
                if self._stop.is_set() or self.elapsed() > limit:
                    return
                data = noise_jpeg(10_000 * (n + 1) + i)
                sent = self.elapsed()
                self._record(sent, "upload", upload(http, data), data)
                image_id = rng.choice(list(self.known))
                sent = self.elapsed()
                self._record(sent, "render", http.get(f"/img/{image_id}?w={rng.randint(16, 95)}"), None)
                time.sleep(0.05)  # a steady load, also while failures are answered at once

    def _record(self, sent: float, kind: str, response: httpx.Response, data: bytes | None) -> None:
        self.seen.append((sent, self.elapsed(), kind, response.status_code))
        if response.status_code in (200, 201) and data is not None:
            self.stored[response.json()["id"]] = data
        elif is_unavailable(response):
            if data is not None:
                self.refused[hashlib.sha256(data).hexdigest()] = data
        elif response.status_code not in (200, 201):
            self.bad.append(f"{kind} {response.status_code} {response.text[:200]}")

    def first_success(self, kind: str, after: float) -> float | None:
        return min((at for _, at, k, status in self.seen if k == kind and at > after and status in (200, 201)),
                   default=None)  # fmt: skip

    def statuses(self, start: float, end: float = float("inf")) -> dict[str, dict[int, int]]:
        """Statuses of the requests sent between `start` and `end`."""
        window: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
        for at, _, kind, status in list(self.seen):
            if start <= at < end:
                window[kind][status] += 1
        return {kind: dict(sorted(counts.items())) for kind, counts in sorted(window.items())}


def upload_all(http: httpx.Client, seeds: range, size: int = 96) -> dict[str, bytes]:
    stored = {}
    for seed in seeds:
        data = noise_jpeg(seed, size)
        response = upload(http, data)
        assert response.status_code == 201, response.text
        stored[response.json()["id"]] = data
    return stored


def assert_quiet_log(server: ServerProcess) -> tuple[int, int]:
    """No traceback, and the outage logged once per state change (not per request): (down, up) warnings."""
    assert not log_lines(server, "Traceback"), log_lines(server, "Traceback")[:1]
    down, up = len(log_lines(server, "unreachable:")), len(log_lines(server, "reachable again"))
    assert 1 <= down <= 3 and up == down, (down, up)  # a store coming back may flap once or twice
    return down, up


# ---- S3 (SeaweedFS) ------------------------------------------------------------------------------


@pytest.fixture
def own_seaweed(tmp_path: Path) -> Iterator[SeaweedS3]:
    """A SeaweedFS of this test's own, since the test stops it."""
    server = SeaweedS3(tmp_path / "seaweed").start()
    yield server
    server.stop()


@pytest.fixture
def s3_server(own_seaweed: SeaweedS3, server_env: dict[str, str], tmp_path: Path) -> Iterator[ServerProcess]:
    """imgsvc on that S3 store, with every cache off so each render reads the store."""
    env = server_env | s3_env(own_seaweed, "faults") | NO_CACHES | ANY_SIZE
    server = ServerProcess(env, tmp_path / "server.log").start()
    yield server
    server.stop()


def test_s3_stopped_and_restarted_under_load(own_seaweed: SeaweedS3, s3_server: ServerProcess) -> None:
    with httpx.Client(base_url=s3_server.url, timeout=60) as http:
        before = upload_all(http, range(6))
        (deleted_id,) = upload_all(http, range(6, 7))  # deleted during the outage
        with Traffic(s3_server.url, before).running() as traffic:
            until(lambda: len(traffic.seen) >= 6, 60)
            stopped = traffic.elapsed()
            own_seaweed.stop(keep=True)
            until(lambda: any(at > stopped and status == 503 for _, at, _, status in traffic.seen), 60)
            ready = http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["storage"].startswith("failing"), ready.text
            assert http.get(f"/images/{next(iter(before))}").status_code == 200  # what needs no blob still works
            assert http.get("/images", params={"owner": "me"}).status_code == 200
            assert http.delete(f"/images/{deleted_id}").status_code == 204
            time.sleep(2)  # the outage lasts a while under traffic
            restarting = traffic.elapsed()
            own_seaweed.restart()
            back = traffic.elapsed()
            until(lambda: traffic.first_success("render", back) and traffic.first_success("upload", back), 60)
            time.sleep(2)  # traffic goes on for a while after the recovery
        until(lambda: http.get("/readyz").status_code == 200, 30)
        during = traffic.statuses(stopped, back)
        assert not traffic.bad, traffic.bad[:3]
        assert any(503 in counts for counts in during.values()), during
        lost = nothing_lost(http, before | traffic.stored)
        assert http.get(f"/img/{deleted_id}?w=20").status_code == 404
    orphaned = orphans(gc_dry_run(s3_server.env)) - {hashlib.sha256(noise_jpeg(6)).hexdigest()}  # the deleted one
    assert orphaned <= set(traffic.refused), "a blob no image references that no refused upload explains"
    down, _ = assert_quiet_log(s3_server)
    render_back = traffic.first_success("render", back) - back  # type: ignore[operator]
    upload_back = traffic.first_success("upload", back) - back  # type: ignore[operator]
    after = traffic.statuses(back + max(render_back, upload_back))
    print(f"\nFAULT s3 stopped {restarting - stopped:.1f} s, restart took {back - restarting:.1f} s; "
          f"statuses while down: {during}; sent after recovery: {after}; first render 200 {render_back:.2f} s "
          f"and upload 201 {upload_back:.2f} s after the store answered again; images lost {lost} of "
          f"{len(before) + len(traffic.stored)}; orphan blobs of refused uploads {len(orphaned)}; "
          f"outage warnings {down}")  # fmt: skip
    assert lost == 0


def test_s3_silent_beyond_its_timeout(own_seaweed: SeaweedS3, s3_server: ServerProcess) -> None:
    """SeaweedFS frozen (SIGSTOP): connections open, nothing answers. Requests already waiting on it get 503
    after the timeouts (3 attempts x 5 s read timeout + backoff, the defaults); once the store is known
    down, one request at a time probes it and the others are answered 503 while that probe still waits."""
    with httpx.Client(base_url=s3_server.url, timeout=60) as http:
        before = upload_all(http, range(4))
        listed = len(http.get("/images", params={"owner": "me", "limit": 100}).json()["items"])
        started = time.monotonic()

        def timed(n: int) -> tuple[float, httpx.Response, bytes | None]:
            """Odd n: an upload of a new image; even n: a new size of a stored one. (end time, answer, bytes)"""
            data = noise_jpeg(500 + n) if n % 2 else None
            with httpx.Client(base_url=s3_server.url, timeout=60) as own:
                if data is not None:
                    response = upload(own, data)
                else:
                    response = own.get(f"/img/{list(before)[n // 2 % len(before)]}?w={40 + n}")
            return time.monotonic() - started, response, data

        own_seaweed.pause()
        try:
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                first = list(pool.map(timed, range(8)))  # in flight when the store froze: they wait it out
                started = time.monotonic()
                burst = [pool.submit(timed, n) for n in range(8, 16)]
                done: set[concurrent.futures.Future[tuple[float, httpx.Response, bytes | None]]] = set()
                pending = set(burst)
                while len(done) < 7 and pending:
                    finished, pending = concurrent.futures.wait(pending, 60, concurrent.futures.FIRST_COMPLETED)
                    if not finished:
                        break
                    done |= finished
                probe_still_waiting = len(pending) == 1
                fast = sorted(f.result()[0] for f in done)
                ready_started = time.monotonic()
                ready = http.get("/readyz")
                ready_seconds = time.monotonic() - ready_started
                second = [f.result() for f in burst]
        finally:
            own_seaweed.resume()
        answers = first + second
        assert all(is_unavailable(response) for _, response, _ in answers), [r.text for _, r, _ in answers]
        assert probe_still_waiting, fast  # 7 of 8 answered while the 8th was still waiting on the frozen store
        assert ready.status_code == 503 and ready.json()["checks"]["storage"].startswith("failing"), ready.text
        recovered = until(lambda: http.get(f"/img/{next(iter(before))}?w=77").status_code == 200, 60)
        stored = upload_all(http, range(900, 902))
        assert len(http.get("/images", params={"owner": "me", "limit": 100}).json()["items"]) == listed + 2
        lost = nothing_lost(http, before | stored)
    refused = {hashlib.sha256(data).hexdigest() for _, _, data in answers if data is not None}
    orphaned = orphans(gc_dry_run(s3_server.env))
    assert orphaned <= refused
    assert_quiet_log(s3_server)
    print(f"\nFAULT s3 silent: 8 concurrent requests in flight at the freeze: 503 after "
          f"{min(a for a, _, _ in first):.1f}-{max(a for a, _, _ in first):.1f} s; the next 8: 7 answered 503 within "
          f"{fast[-1]:.2f} s while the probe waited, the probe 503 after {max(a for a, _, _ in second):.1f} s; "
          f"/readyz 503 in {ready_seconds:.1f} s; first render 200 {recovered:.2f} s after SIGCONT; images lost "
          f"{lost}; orphan blobs of refused uploads {len(orphaned)} (the frozen server kept their requests and "
          f"stored them on waking)")  # fmt: skip
    assert lost == 0


# ---- a full filesystem store ---------------------------------------------------------------------


class NamespacedServer(ServerProcess):
    """imgsvc with its blob directory on a size-limited tmpfs mounted in a private mount namespace (a user
    namespace too when not root), so the test fills a real filesystem without touching the machine's."""

    def __init__(self, env: dict[str, str], log_path: Path, blobs: Path, size: str) -> None:
        super().__init__(env, log_path)
        self.blobs = blobs
        unshare = shutil.which("unshare")
        if unshare is None:
            pytest.fail("unshare (util-linux) is needed to mount a size-limited tmpfs", pytrace=False)
        self.namespaces = ["--mount"] if os.geteuid() == 0 else ["--user", "--map-root-user", "--mount"]
        mount = f'mount -t tmpfs -o size={size},mode=0700 imgsvc-blobs "$0" && exec "$@"'
        self.argv = [unshare, *self.namespaces, "sh", "-c", mount, str(blobs), sys.executable, "-m", "imgsvc", "serve"]

    def start(self, timeout: float = 60.0) -> NamespacedServer:
        self.blobs.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_ready(self.proc, f"{self.url}/readyz", self.log_path, timeout)
        except RuntimeError:
            self.stop()
            raise
        return self

    @property
    def view(self) -> Path:
        """The blob directory as the server sees it (its mount namespace), from outside."""
        assert self.proc is not None
        return Path(f"/proc/{self.proc.pid}/root") / self.blobs.relative_to("/")

    def gc_dry_run(self) -> str:
        assert self.proc is not None
        enter = ["nsenter", f"--target={self.proc.pid}", "--mount"]
        if "--user" in self.namespaces:
            enter[2:2] = ["--user", "--preserve-credentials"]
        argv = [*enter, "--", sys.executable, "-m", "imgsvc", "gc", "--dry-run", "--grace-days", "0"]
        result = subprocess.run(argv, env={**os.environ, **self.env}, cwd=REPO, capture_output=True, text=True,
                                timeout=120, check=False)  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout


def stored_files(root: Path) -> list[Path]:
    return [Path(d) / name for d, _, names in os.walk(root) for name in names]


def test_filesystem_store_full(server_env: dict[str, str], tmp_path: Path) -> None:
    server = NamespacedServer(server_env | ANY_SIZE, tmp_path / "server.log", tmp_path / "blobs", "4m").start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            before = upload_all(http, range(4))
            ballast = server.view / "ballast"
            free = os.statvfs(server.view).f_bavail * os.statvfs(server.view).f_frsize
            ballast.write_bytes(b"\0" * (free - 1_500_000))  # 1.5 MB left: two ~600 KB uploads fit, not three
            answers, seed = [], 100
            while not answers or answers[-1][1].status_code == 201:
                assert seed < 110, "the store never filled up"
                data = noise_jpeg(seed, 600)
                answers.append((data, upload(http, data)))
                seed += 1
            refused_data, refused = answers[-1]
            more = [upload(http, noise_jpeg(seed + n, 600)) for n in range(3)]
            assert [r.status_code for r in more] == [507] * 3
            assert refused.status_code == 507, refused.text
            problem = refused.json()
            assert (
                problem["type"] == "/problems/insufficient-storage" and refused.headers["cache-control"] == "no-store"
            )
            sha = hashlib.sha256(refused_data).hexdigest()
            files = stored_files(server.view)
            assert not [f for f in files if f.name.startswith(".tmp-")], files  # nothing half-written
            assert not (server.view / "sha256" / sha[:2] / sha[2:4] / sha).exists()
            stored = before | {r.json()["id"]: d for d, r in answers if r.status_code == 201}
            listed = http.get("/images", params={"owner": "me", "limit": 100}).json()["items"]
            assert {item["id"] for item in listed} == set(stored)  # nothing recorded for the refused uploads
            assert http.get("/readyz").status_code == 200  # reads still work: a full store stays ready
            lost_while_full = nothing_lost(http, stored)

            ballast.unlink()
            freed = time.monotonic()
            again = upload(http, refused_data)
            recovered = time.monotonic() - freed
            assert again.status_code == 201, again.text
            stored[again.json()["id"]] = refused_data
            lost = nothing_lost(http, stored)
        report = server.gc_dry_run()
        assert f"examined {len(stored)} blobs: 0 to remove" in report, report
        assert not log_lines(server, "Traceback")
        assert len(log_lines(server, "is full")) == 1 and len(log_lines(server, "accepts writes again")) == 1
    finally:
        server.stop()
    codes = [r.status_code for _, r in answers] + [r.status_code for r in more]
    print(f"\nFAULT fs full (4 MiB tmpfs): uploads {codes}; renders and originals of the {len(stored) - 1} "
          f"earlier images while full: lost {lost_while_full}; upload 201 at the first try after freeing space "
          f"({recovered:.2f} s); images lost {lost}; no temp file, no blob, no record for the refused upload; "
          "gc: 0 orphans")  # fmt: skip
    assert lost == 0 and lost_while_full == 0


# ---- nginx in front of a stopped or frozen imgsvc --------------------------------------------------

VALIDITY = 2  # seconds nginx keeps a variant before revalidating


@pytest.fixture
def server(server_env: dict[str, str], tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(server_env | ANY_SIZE, tmp_path / "server.log").start()
    yield proc
    proc.stop()


def test_nginx_in_front_of_a_stopped_or_frozen_imgsvc(server: ServerProcess, start_nginx: Callable[..., NginxProcess]
                                                      ) -> None:  # fmt: skip
    nginx = start_nginx(server.url.removeprefix("http://"), CACHE_VALID=f"{VALIDITY}s")
    with httpx.Client(base_url=nginx.url, timeout=60) as http:
        before = upload_all(http, range(3))
        cached = {image_id: http.get(f"/img/{image_id}?w=64").content for image_id in before}
        some_id = next(iter(before))

        server.stop()
        stopped = time.monotonic()
        seen: collections.Counter[str] = collections.Counter()

        def stale_of_every_image() -> bool:
            for image_id, content in cached.items():
                answer = http.get(f"/img/{image_id}?w=64")
                seen[f"cached variant {answer.status_code} {answer.headers.get('x-cache-status')}"] += 1
                assert answer.status_code == 200 and answer.content == content
            return seen.get("cached variant 200 STALE", 0) >= len(cached)

        until(stale_of_every_image, VALIDITY + 30)
        for label, answer in (
            ("new variant", http.get(f"/img/{some_id}?w=65")),
            ("upload", upload(http, noise_jpeg(50))),
            ("metadata", http.get(f"/images/{some_id}")),
        ):
            seen[f"{label} {answer.status_code}"] += 1
            assert answer.status_code == 502, (label, answer.status_code)
        down_for = time.monotonic() - stopped

        server.start()
        restarted = until(lambda: http.get(f"/img/{some_id}?w=66").status_code == 200, 60) + server.ready_after

        # Frozen: nginx's connections open, no answer; the render tier gives up after its 20 s read timeout.
        fresh = http.get(f"/img/{some_id}?w=67")
        assert fresh.headers["x-cache-status"] == "MISS"
        time.sleep(VALIDITY + 1)  # the entry has expired: only a stale copy can answer it
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            frozen = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                expired = pool.submit(http.get, f"/img/{some_id}?w=67")
                new = pool.submit(http.get, f"/img/{some_id}?w=68")
                expired_answer, new_answer = expired.result(), new.result()
            frozen_for = time.monotonic() - frozen
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert (expired_answer.status_code, expired_answer.headers["x-cache-status"]) == (200, "STALE")
        assert expired_answer.content == fresh.content
        assert new_answer.status_code == 504
        recovered = until(lambda: http.get(f"/img/{some_id}?w=69").status_code == 200, 60)
        lost = sum(http.get(f"/img/{image_id}?w=70").status_code != 200 for image_id in before)
        with httpx.Client(base_url=server.url, timeout=60) as direct:
            lost += nothing_lost(direct, before)
    assert "0 to remove" in gc_dry_run(server.env)
    print(f"\nFAULT nginx, imgsvc stopped {down_for:.1f} s: {dict(seen)}; back: first new variant 200 "
          f"{restarted:.1f} s after the restart began (imgsvc ready after {server.ready_after:.1f} s); frozen "
          f"(SIGSTOP): expired cached variant 200 STALE and new variant 504, both after {frozen_for:.1f} s; "
          f"first 200 {recovered:.2f} s after SIGCONT; images lost {lost}")  # fmt: skip
    assert lost == 0
