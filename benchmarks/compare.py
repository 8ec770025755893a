"""Peer benchmark: imgsvc against thumbor and ipx on W1-W5 (every request renders), next to a plain pyvips
reference with no server around it, plus imgsvc's hits (H1 LRU, H2 nginx cache) next to their ceilings.

Installs the peers from PyPI and npm into benchmarks/.peers/, starts everything on loopback, checks one
response per server and workload (format and size decoded by pyvips; bytes; SSIM), then runs wrk at 8 and
32 connections, servers interleaved, for `--rounds` rounds. Writes results/peers.md.
Run: `make bench`, or `cd benchmarks && ../.venv/bin/python compare.py [--rounds 3] [--seconds 10]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pyvips
from peers import install, measure, report, servers
from peers.reference import SUFFIX
from peers.workloads import HIT, WORKLOADS, Workload

RESULTS = Path(__file__).resolve().parent / "results" / "peers.md"


def start_all(tmp: Path, found: dict) -> tuple[list[servers.Server], list[servers.Server]]:
    """(renderers, hit servers and ceilings); a server that cannot start is recorded in found['failures']."""
    renderers, hits = [], []

    def attempt(name: str, start, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return start(*args, **kwargs)
        except (RuntimeError, httpx.HTTPError, OSError) as exc:
            found["failures"][name] = f"did not start: {exc}"
            return None

    miss = attempt("imgsvc", servers.start_imgsvc, tmp, "imgsvc", IMGSVC_CACHE_BYTES="0")
    cold = attempt(
        servers.DECODE_EVERY_TIME,
        servers.start_imgsvc,
        tmp,
        "imgsvc-cold",
        IMGSVC_CACHE_BYTES="0",
        IMGSVC_DECODED_CACHE_BYTES="0",
    )
    if cold:
        cold.name = servers.DECODE_EVERY_TIME
    lru = attempt("imgsvc LRU", servers.start_imgsvc, tmp, "imgsvc-lru")
    renderers += [s for s in (miss, cold) if s]
    for name, start in (("thumbor", servers.start_thumbor), ("ipx", servers.start_ipx)):
        if "error" in found["versions"].get(name, {}):
            found["failures"][name] = f"not installed: {found['versions'][name]['error'][:300]}"
        elif server := attempt(name, start, tmp):
            renderers.append(server)
    if lru:
        lru.name, lru.hit_path = "imgsvc LRU hits (H1)", HIT.path(lru.template(HIT))
        body = httpx.get(lru.url + lru.hit_path, timeout=60).raise_for_status().content
        hits.append(lru)
        for server in (
            attempt("imgsvc behind nginx (H2)", servers.start_nginx_cache, tmp, lru, lru.hit_path),
            attempt("nginx static", servers.start_nginx_static, tmp, body),
            attempt(servers.NGINX_STATIC_FILE_CACHE, servers.start_nginx_static, tmp, body, file_cache=True),
            attempt("Starlette fixed bytes", servers.start_fixed, tmp, body),
        ):
            if server:
                hits.append(server)
    return renderers, hits


def check(renderers: list[servers.Server], hits: list[servers.Server], workloads: list[Workload], found: dict) -> None:
    """One response per server and workload: format and size, bytes, SSIM against a Lanczos render."""
    with httpx.Client(timeout=120) as http:
        for wl in workloads:
            data = pyvips.Image.thumbnail_buffer(wl.source.read_bytes(), wl.width).write_to_buffer(
                SUFFIX[wl.fmt], Q=wl.quality
            )
            found["outputs"][wl.key]["reference"] = (len(data), measure.ssim(data, wl.source), "")
            for server in renderers:
                response = http.get(server.url + wl.path(server.template(wl)))
                problem = f"HTTP {response.status_code}" if response.status_code != 200 else ""
                problem = problem or measure.check_output(response.content, wl)
                score = measure.ssim(response.content, wl.source) if not problem else float("nan")
                found["outputs"][wl.key][server.name] = (len(response.content), score, problem)
        for server in hits:
            response = http.get(server.url + server.hit_path)
            problem = measure.check_output(response.content, HIT) if response.status_code == 200 else "not 200"
            found["outputs"]["hits"][server.name] = (len(response.content), float("nan"), problem)


def reference(wl: Workload, seconds: float) -> dict:
    command = [sys.executable, "-m", "peers.reference", wl.key, f"{seconds:g}", str(servers.CORES)]
    busy, child, began = measure.machine_busy(), measure.wrk_seconds(), time.monotonic()
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    others = measure.machine_busy() - busy - (measure.wrk_seconds() - child)
    return result | {"others": max(others / (time.monotonic() - began), 0.0)}


def imgsvc_counts(server: servers.Server) -> tuple[float, float]:
    """(variant-cache misses, renders) from imgsvc's /metrics; equal when single-flight merged nothing."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    misses = renders = 0.0
    for line in text.splitlines():
        if line.startswith("imgsvc_cache_requests_total{") and 'tier="variant"' in line and 'result="miss"' in line:
            misses += float(line.rsplit(" ", 1)[1])
        if line.startswith("imgsvc_render_stage_seconds_count{") and 'stage="pixels"' in line:
            renders += float(line.rsplit(" ", 1)[1])
    return misses, renders


def run_one(server: servers.Server, found: dict, key: tuple, url: str, seconds: float, script: str | None) -> None:
    """One measured wrk run into found["runs"][key]; a server that died is recorded and skipped from then on."""
    if server.name in found["failures"]:
        return
    c = key[2]
    try:
        before = imgsvc_counts(server) if server.metrics else None
        run = measure.wrk(url, c, seconds, script, server.pids)
        if before and server.alive():
            measure.quiesce(server.pids)
            after = imgsvc_counts(server)
            found["merged"][0] += (after[0] - before[0]) - (after[1] - before[1])
            found["merged"][1] += after[0] - before[0]
    except (httpx.HTTPError, subprocess.CalledProcessError):
        if server.alive():
            raise
    if not server.alive():
        log = server.log
        tail = " / ".join(log.read_text().splitlines()[-3:]) if log and log.exists() else ""
        code = server.proc.poll() if server.proc else None
        found["failures"][server.name] = f"exited ({code}) during {key[1]} c={c}; later runs missing; log: {tail}"
        return
    found["runs"][key].append(run)
    print(f"  {key[1]} c={c} {server.name}: {run.rps:,.1f} req/s", flush=True)


def load(renderers, hits, workloads, args, found, tmp: Path) -> None:  # type: ignore[no-untyped-def]
    scripts = {}
    for server in renderers:
        for wl in workloads:
            if not found["outputs"][wl.key][server.name][2]:
                path = tmp / f"{server.name}-{wl.key}.lua"
                path.write_text(wl.lua_script(server.template(wl)))
                scripts[server.name, wl.key] = str(path)
    for server in renderers:  # warm-up, once per server and workload
        for wl in workloads:
            if (server.name, wl.key) in scripts:
                measure.wrk(server.url, 8, 3, scripts[server.name, wl.key], server.pids)
    for server in hits:
        measure.wrk(server.url + server.hit_path, 8, 2, None, server.pids)
    for rnd in range(args.rounds):
        print(f"round {rnd + 1}/{args.rounds}", flush=True)
        order = renderers[rnd % len(renderers) :] + renderers[: rnd % len(renderers)] if renderers else []
        for wl in workloads:
            found["reference"][wl.key].append(reference(wl, args.seconds))
            for c in args.connections:
                for server in order:
                    if (server.name, wl.key) in scripts:
                        script = scripts[server.name, wl.key]
                        run_one(server, found, (server.name, wl.key, c), server.url, args.seconds, script)
        for c in args.connections:
            for server in hits[rnd % max(len(hits), 1) :] + hits[: rnd % max(len(hits), 1)]:
                run_one(server, found, (server.name, "hits", c), server.url + server.hit_path, args.hit_seconds, None)


def soak(server: servers.Server, wl: Workload, seconds: float, tmp: Path, found: dict) -> None:
    """imgsvc's memory under `seconds` of wl at 32 connections: the tree's RSS every 5 s, and the requests."""
    script = tmp / f"soak-{wl.key}.lua"
    script.write_text(wl.lua_script(server.template(wl)))
    measure.quiesce(server.pids)
    samples: list[tuple[float, int]] = []
    began = time.monotonic()
    with measure.RssSeries(server.pids, 5.0, samples):
        run = measure.wrk(server.url, 32, seconds, str(script), server.pids)
    found["soak"] = {"workload": wl, "seconds": seconds, "samples": samples, "run": run, "began": began}
    print(f"  soak {wl.key} c=32 {seconds:g}s: {run.rps:,.1f} req/s, peak {max(r for _, r in samples) / 2**20:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10, help="each measured render run (and reference run)")
    parser.add_argument("--hit-seconds", type=float, default=5, help="each measured hit/ceiling run")
    parser.add_argument("--connections", type=lambda s: [int(c) for c in s.split(",")], default=[8, 32])
    parser.add_argument("--workloads", default=",".join(wl.key for wl in WORKLOADS))
    parser.add_argument("--soak-seconds", type=float, default=300, help="imgsvc W4 c=32 memory run; 0 skips it")
    parser.add_argument("--check-only", action="store_true", help="start, check one response each, stop")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    workloads = [wl for wl in WORKLOADS if wl.key in args.workloads.split(",")]
    found: dict = {
        "versions": install.install(),
        "failures": {},
        "outputs": defaultdict(dict),
        "reference": defaultdict(list),
        "runs": defaultdict(list),
        "merged": [0.0, 0.0],
    }
    found["began"] = time.monotonic()
    shutil.rmtree(servers.LOGS, ignore_errors=True)
    servers.LOGS.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        renderers, hits = start_all(tmp, found)
        try:
            check(renderers, hits, workloads, found)
            print(report.outputs_table(found, renderers, workloads), flush=True)
            if not args.check_only:
                load(renderers, hits, workloads, args, found, tmp)
                imgsvc = next((r for r in renderers if r.name == "imgsvc"), None)
                if args.soak_seconds and imgsvc and "imgsvc" not in found["failures"]:
                    soak(imgsvc, next(wl for wl in WORKLOADS if wl.key == "W4"), args.soak_seconds, tmp, found)
        finally:
            for server in reversed(renderers + hits):  # H2's nginx before its upstream, imgsvc LRU
                server.stop()
    found["minutes"] = (time.monotonic() - found["began"]) / 60
    text = report.markdown(found, renderers, hits, workloads, args)
    print(text)
    if not args.check_only:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
