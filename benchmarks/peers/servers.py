"""Start every server on loopback, each in its own process group, timing its start-up.

Renderers (every request renders): imgsvc with its variant LRU off, thumbor (file loader, no storage, no
result storage, one process per core), ipx (reads the file per request, has no result cache).
Hits and ceilings: imgsvc LRU hits (H1), nginx cache hits in front of imgsvc with the shipped config (H2),
nginx serving W1's variant as a static file, and a bare Starlette endpoint returning the same bytes.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from harness import IMAGES, REPO, free_port, kill, launch

from peers.install import IPX_BIN, THUMBOR_BIN
from peers.workloads import WORKLOADS, Workload

sys.path.insert(0, str(REPO))
from tests.nginx_process import NginxProcess, find_nginx

BENCH = Path(__file__).resolve().parents[1]
LOGS = BENCH / ".peers" / "logs"  # the servers' output, kept after the run
CORES = os.cpu_count() or 1
DECODE_EVERY_TIME = "imgsvc, decoded cache off"
NGINX_STATIC_FILE_CACHE = "nginx static file + open_file_cache (ceiling)"


@dataclass
class Server:
    name: str
    url: str
    command: str  # what started it, for the results
    startup: float  # seconds until it answered
    pids: list[int]  # roots of its process tree(s)
    stop: Callable[[], None]
    templates: dict[str, str] = field(default_factory=dict)  # workload key -> path template (renderers)
    hit_path: str = ""  # the one warmed URL path (hits and ceilings)
    metrics: bool = False  # imgsvc: /metrics counts renders
    note: str = ""  # shown after the command
    log: Path | None = None  # its output
    proc: subprocess.Popen | None = None  # the root process, for its exit status
    ids: dict[str, str] = field(default_factory=dict)  # imgsvc: uploaded file name -> image id

    def alive(self) -> bool:
        try:
            return all(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in self.pids)
        except psutil.NoSuchProcess:
            return False

    def template(self, wl: Workload) -> str:
        return self.templates[wl.key]


def _shown(root: Path) -> str:
    """`root` as the results show it: relative to the repository."""
    return str(root.relative_to(REPO)) if root.is_relative_to(REPO) else root.name


def upload(url: str, path: Path) -> str:
    kind = "png" if path.suffix == ".png" else "jpeg"
    response = httpx.post(
        f"{url}/images", content=path.read_bytes(), headers={"Content-Type": f"image/{kind}"}, timeout=60
    )
    response.raise_for_status()
    return str(response.json()["id"])


def start_imgsvc(tmp: Path, name: str, sources: list[Path] | None = None, **env: str) -> Server:
    """imgsvc with `env` over the benchmark settings, `sources` uploaded (default: the workloads' files)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = {
        "IMGSVC_DATA_DIR": str(tmp / name),
        "IMGSVC_PORT": str(port),
        "IMGSVC_LOG_LEVEL": "warning",
        "IMGSVC_UNSIGNED_WIDTHS": "*",
        "IMGSVC_UPLOAD_RATE": "0",
        "IMGSVC_RENDER_RATE": "0",
        **env,
    }
    command = [sys.executable, "-m", "imgsvc", "serve"]
    proc, startup = launch(command, settings, f"{url}/readyz", LOGS / f"{name}.log")
    try:
        ids = {path.name: upload(url, path) for path in sources or [wl.source for wl in WORKLOADS]}
    except BaseException:
        kill(proc)
        raise
    templates = {
        wl.key: f"/img/{ids[wl.file]}?w={{w}}&h={{h}}&fmt={{fmt}}&q={{q}}" for wl in WORKLOADS if wl.file in ids
    }
    shown = " ".join(f"{k}={v}" for k, v in settings.items() if k not in ("IMGSVC_DATA_DIR", "IMGSVC_PORT"))
    return Server(
        name,
        url,
        f"{shown} IMGSVC_PORT=PORT IMGSVC_DATA_DIR=TMP python -m imgsvc serve",
        startup,
        [proc.pid],
        lambda: kill(proc),
        templates,
        metrics=True,
        log=LOGS / f"{name}.log",
        proc=proc,
        ids=ids,
    )


def start_thumbor(tmp: Path, root: Path = IMAGES) -> Server:
    port = free_port()
    conf = tmp / "thumbor.conf"
    conf.write_text(
        "LOADER = 'thumbor.loaders.file_loader'\n"
        f"FILE_LOADER_ROOT_PATH = '{root}'\n"
        "STORAGE = 'thumbor.storages.no_storage'\n"  # no copy of originals
        "RESULT_STORAGE = 'thumbor.result_storages.no_storage'\n"  # no result cache: every request renders
    )
    command = [str(THUMBOR_BIN), *f"-i 127.0.0.1 -p {port} -l warning -c {conf} --processes {CORES}".split()]
    url = f"http://127.0.0.1:{port}"
    proc, startup = launch(command, {}, f"{url}/healthcheck", LOGS / "thumbor.log")
    template = "/unsafe/{w}x0/filters:format({fmt}):quality({q})/{file}?v={b}"
    shown = f"thumbor -i 127.0.0.1 -p PORT -l warning -c thumbor.conf --processes {CORES}"
    settings = conf.read_text().replace(str(root), _shown(root)).strip().replace("\n", "; ")
    return Server(
        "thumbor",
        url,
        shown,
        startup,
        [proc.pid],
        lambda: kill(proc),
        {wl.key: template for wl in WORKLOADS},
        note=f"thumbor.conf: `{settings}`",
        log=LOGS / "thumbor.log",
        proc=proc,
    )


def start_ipx(tmp: Path, root: Path = IMAGES) -> Server:
    port = free_port()
    # what `npx ipx serve` execs, without npm's own launcher process in the measured tree
    command = [str(IPX_BIN), "serve", "--dir", str(root), "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    proc, startup = launch(command, {}, f"{url}/", LOGS / "ipx.log", cwd=IPX_BIN.parents[2])  # `/`: a 400
    template = "/w_{w},f_{fmt},q_{q},v_{b}/{file}"
    shown = f"benchmarks/.peers/ipx/node_modules/.bin/ipx serve --dir {_shown(root)} --host 127.0.0.1 --port PORT"
    note = "what `npx ipx serve` runs, without npm's launcher process in the measured tree"
    templates = {wl.key: template for wl in WORKLOADS}
    return Server(
        "ipx",
        url,
        shown,
        startup,
        [proc.pid],
        lambda: kill(proc),
        templates,
        note=note,
        log=LOGS / "ipx.log",
        proc=proc,
    )


def start_nginx_cache(tmp: Path, upstream: Server, path: str) -> Server:
    """H2: the shipped nginx config (tests/nginx_process.py renders it for loopback) in front of `upstream`."""
    binary = find_nginx()
    if binary is None:
        raise RuntimeError("nginx is not installed")
    began = time.monotonic()
    nginx = NginxProcess(binary, tmp / "nginx-cache", upstream.url.removeprefix("http://")).start()
    startup = time.monotonic() - began
    for _ in range(2):
        httpx.get(nginx.url + path, timeout=60).raise_for_status()
    status = httpx.get(nginx.url + path).headers.get("x-cache-status")
    if status != "HIT":
        raise RuntimeError(f"nginx cache did not hit (X-Cache-Status {status})")
    assert nginx.proc is not None
    return Server(
        "imgsvc behind nginx (H2 cache hits)",
        nginx.url,
        "nginx -p TMP -c nginx.conf -e stderr -g 'daemon off;'",
        startup,
        [nginx.proc.pid, *upstream.pids],
        nginx.stop,
        hit_path=path,
        log=nginx.stderr_path,
        proc=nginx.proc,
        note="nginx/imgsvc.conf.template rendered for loopback (tests/nginx_process.py), upstream imgsvc H1",
    )


def start_nginx_static(tmp: Path, body: bytes, *, file_cache: bool = False) -> Server:
    """nginx serving W1's variant as a file: plain, or with the open_file_cache the shipped config has."""
    binary = find_nginx()
    if binary is None:
        raise RuntimeError("nginx is not installed")
    work = tmp / ("nginx-static-fc" if file_cache else "nginx-static")
    (work / "root").mkdir(parents=True)
    (work / "root" / "variant.webp").write_bytes(body)
    port = free_port()
    cache_line = "    open_file_cache max=10000 inactive=60s; open_file_cache_valid 30s;" if file_cache else ""
    (work / "nginx.conf").write_text(f"""worker_processes auto;
user {pwd.getpwuid(os.geteuid()).pw_name};
pid {work}/nginx.pid;
error_log {work}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
{cache_line}
    types {{ image/webp webp; }}
    client_body_temp_path {work}; proxy_temp_path {work}; fastcgi_temp_path {work};
    uwsgi_temp_path {work}; scgi_temp_path {work};
    server {{ listen 127.0.0.1:{port}; root {work}/root; }}
}}
""")
    command = [binary, "-p", str(work), "-c", str(work / "nginx.conf"), "-g", "daemon off;"]
    url = f"http://127.0.0.1:{port}"
    proc, startup = launch(command, {}, f"{url}/variant.webp", LOGS / f"{work.name}.log")
    return Server(
        NGINX_STATIC_FILE_CACHE if file_cache else "nginx static file (ceiling)",
        url,
        "nginx -p TMP -c nginx.conf -g 'daemon off;'",
        startup,
        [proc.pid],
        lambda: kill(proc),
        hit_path="/variant.webp",
        log=LOGS / f"{work.name}.log",
        proc=proc,
        note="worker_processes auto, sendfile on, access_log off"
        + (", open_file_cache as in nginx/imgsvc.conf.template" if file_cache else "")
        + "; the file is W1's variant as imgsvc renders it",
    )


def start_fixed(tmp: Path, body: bytes) -> Server:
    (tmp / "fixed.webp").write_bytes(body)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "peers.fixed_app:app",
        "--app-dir",
        str(BENCH),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-server-header",
    ]
    url = f"http://127.0.0.1:{port}"
    proc, startup = launch(command, {"FIXED_BODY": str(tmp / "fixed.webp")}, f"{url}/", LOGS / "fixed.log")
    return Server(
        "Starlette fixed bytes (ceiling)",
        url,
        "python " + " ".join(command[1:]).replace(str(BENCH), "benchmarks").replace(str(port), "PORT"),
        startup,
        [proc.pid],
        lambda: kill(proc),
        hit_path="/",
        log=LOGS / "fixed.log",
        proc=proc,
        note="returns W1's variant bytes; one uvicorn process, like imgsvc",
    )
