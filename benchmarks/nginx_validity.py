"""nginx cache hits under each way of forgetting deleted images: plain 10-minute validity (no bound), the deny-list
(production: 10 minutes + the Lua check on every request), and CACHE_VALID=second (revalidation every second).

Three nginx nodes rendered from the template, one per config, in front of one imgsvc, measured in one run with rounds
rotating the order. Two workloads: one hot URL, and 200 URLs picked at random; wrk with 8 and 32 connections. The
deny-list node holds 10,000 denied ids (none of the hot image). CPU per request counts nginx and imgsvc (which answers
the revalidations of `second`). Run: `make bench`.
"""

from __future__ import annotations

import argparse
import collections
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from harness import IMAGES, REPO, start_imgsvc, stop
from peers import measure

sys.path.insert(0, str(REPO))
from imgsvc.nginx_deny import FEED_PATH
from tests.nginx_process import NginxProcess, find_nginx

SOURCE = (IMAGES / "2569067123_aca715a2ee_o.jpg").read_bytes()
WIDTHS = range(100, 300)  # the 200-URL workload: w=100..299
CONFIGS = {
    "plain 10m": {"CACHE_VALID": "10m"},
    "deny-list 10m": {"CACHE_VALID": "10m", "DENY_LIST": "on"},
    "second": {"CACHE_VALID": "second"},
}
KEY = secrets.token_urlsafe(24)
DENIED = 10_000


def feed(node: NginxProcess) -> None:
    """10,000 random ids denied, and the node marked synced (what imgsvc's sender does after a start)."""
    url, headers = node.purge_url + FEED_PATH, {"Authorization": f"Bearer {KEY}"}
    epoch = httpx.get(url, headers=headers).json()["epoch"]
    ids = "".join(f"{secrets.token_urlsafe(16)}\n" for _ in range(DENIED)).encode()
    state = httpx.post(url, params={"sync": epoch}, content=ids, headers=headers).json()
    assert state["synced"] is True, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    configs = {name: CONFIGS[name] for name in dict.fromkeys(["plain 10m", *args.configs])}
    nginx_bin = find_nginx()
    if nginx_bin is None:
        raise SystemExit("nginx is not installed (apt-get install nginx libnginx-mod-http-lua)")
    with tempfile.TemporaryDirectory() as tmp:
        app, app_url = start_imgsvc(Path(tmp) / "app", IMGSVC_UPLOAD_RATE="0", IMGSVC_UNSIGNED_WIDTHS="*")
        nodes = {
            name: NginxProcess(
                nginx_bin, Path(tmp) / name.split()[0], app_url.removeprefix("http://"), purge_key=KEY, **values
            )
            for name, values in configs.items()
        }
        try:
            for node in nodes.values():
                node.start()
            if "deny-list 10m" in nodes:
                feed(nodes["deny-list 10m"])
            created = httpx.post(f"{app_url}/images", content=SOURCE, headers={"Content-Type": "image/jpeg"})
            image_id = created.json()["id"]
            script = Path(tmp) / "widths.lua"
            script.write_text(
                "request = function()\n"
                f'  return wrk.format("GET", "/img/{image_id}?fmt=webp&w=" .. math.random({WIDTHS[0]}, {WIDTHS[-1]}))\n'
                "end\n"
            )
            with httpx.Client(timeout=60) as http:
                for node in nodes.values():
                    for width in WIDTHS:  # misses: paced by the render tier's 10 r/s per client
                        while (answer := http.get(f"{node.url}/img/{image_id}?fmt=webp&w={width}")).status_code == 429:
                            time.sleep(0.2)
                        answer.raise_for_status()
                    assert http.get(f"{node.url}/img/{image_id}?fmt=webp&w=100").headers["x-cache-status"] in (
                        "HIT", "REVALIDATED", "EXPIRED"
                    )  # fmt: skip
            workloads = {"1 URL": f"/img/{image_id}?fmt=webp&w=256", "200 URLs": f"/img/{image_id}?fmt=webp&w=100"}
            runs: dict[tuple[str, int, str], list[measure.Run]] = {}
            names = list(configs)
            for rnd in range(args.rounds):
                order = names[rnd % len(names) :] + names[: rnd % len(names)]
                for workload, path in workloads.items():
                    lua = str(script) if workload == "200 URLs" else None
                    for connections in args.connections:
                        for name in order:
                            node = nodes[name]
                            assert node.proc is not None
                            run = measure.wrk(node.url + path, connections, args.seconds, lua, [node.proc.pid, app.pid])
                            runs.setdefault((workload, connections, name), []).append(run)
                            print(f"round {rnd + 1} {workload} c={connections} {name}: {run.rps:,.0f} req/s, "
                                  f"{run.cpu_ms * 1000:.1f} µs/req, errors {run.errors}, "
                                  f"others {run.others:.2f} cores", flush=True)  # fmt: skip
        finally:
            for node in nodes.values():
                node.stop()
            stop(app)
        upstream = {name: [e for e in node.log() if e["upstream"]] for name, node in nodes.items()}
    print(f"\nwrk -t2 -d{args.seconds:g}s, {args.rounds} rounds, medians")
    for name, entries in upstream.items():
        statuses = collections.Counter(e["upstream_status"] for e in entries)
        print(f"{name}: {len(entries)} requests reached imgsvc over the whole run {dict(statuses)}")
    print("| workload | connections | config | req/s | CPU µs/req (nginx + imgsvc) | p99 ms | errors | others (cores) "
          "| ÷ plain 10m, median of per-round ratios (ratio of medians) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for workload in workloads:
        for connections in args.connections:
            base = runs[(workload, connections, "plain 10m")]
            for name in configs:
                rs = runs[(workload, connections, name)]
                rps = statistics.median(r.rps for r in rs)
                ratios = [a.rps / b.rps for a, b in zip(rs, base, strict=True)]
                ratio = "" if name == "plain 10m" else (
                    f"×{statistics.median(ratios):.3f} (×{rps / statistics.median(r.rps for r in base):.3f}); "
                    f"rounds {', '.join(f'{x:.2f}' for x in ratios)}"
                )  # fmt: skip
                print(f"| {workload} | {connections} | {name} | {rps:,.0f} | "
                      f"{statistics.median(r.cpu_ms for r in rs) * 1000:.1f} | "
                      f"{statistics.median(r.p99_ms for r in rs):.2f} | {sum(r.errors for r in rs)} | "
                      f"{min(r.others for r in rs):.2f}–{max(r.others for r in rs):.2f} | {ratio} |")  # fmt: skip


if __name__ == "__main__":
    main()
