"""nginx cache hits with entries fresh for 10 minutes (CACHE_VALID=10m) vs until the second ends (second, production).

Two nginx nodes, one per CACHE_VALID, in front of one imgsvc, measured in one run, rounds alternating the order. Two
workloads: one hot URL (each expiry turns every request in flight into a revalidation) and 200 URLs (200
revalidations a second). CPU per request counts nginx and imgsvc (which answers the 304s). Run: `make bench`.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from harness import IMAGES, REPO, start_imgsvc, stop
from peers import measure

sys.path.insert(0, str(REPO))
from tests.nginx_process import NginxProcess, find_nginx

SOURCE = (IMAGES / "2569067123_aca715a2ee_o.jpg").read_bytes()
WIDTHS = range(100, 300)  # the 200-URL workload: w=100..299
VALIDITIES = ("10m", "second")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    nginx_bin = find_nginx()
    if nginx_bin is None:
        raise SystemExit("nginx is not installed (apt-get install nginx)")
    with tempfile.TemporaryDirectory() as tmp:
        app, app_url = start_imgsvc(Path(tmp) / "app", IMGSVC_UPLOAD_RATE="0", IMGSVC_UNSIGNED_WIDTHS="*")
        nodes = {
            valid: NginxProcess(nginx_bin, Path(tmp) / valid, app_url.removeprefix("http://"), CACHE_VALID=valid)
            for valid in VALIDITIES
        }
        try:
            for node in nodes.values():
                node.start()
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
            workloads = {"1 URL": f"/img/{image_id}?fmt=webp&w=256", "200 URLs": f"/img/{image_id}?fmt=webp&w=100"}
            runs: dict[tuple[str, str], list[measure.Run]] = {}
            for rnd in range(args.rounds):
                order = list(VALIDITIES) if rnd % 2 == 0 else list(reversed(VALIDITIES))
                for workload, path in workloads.items():
                    lua = str(script) if workload == "200 URLs" else None
                    for valid in order:
                        node = nodes[valid]
                        assert node.proc is not None
                        run = measure.wrk(
                            node.url + path, args.connections, args.seconds, lua, [node.proc.pid, app.pid]
                        )
                        runs.setdefault((workload, valid), []).append(run)
                        print(f"round {rnd + 1} {workload} CACHE_VALID={valid}: {run.rps:,.0f} req/s, "
                              f"{run.cpu_ms * 1000:.1f} µs/req, errors {run.errors}, others {run.others:.2f} cores",
                              flush=True)  # fmt: skip
        finally:
            for node in nodes.values():
                node.stop()
            stop(app)
        upstream = {valid: [e for e in node.log() if e["upstream"]] for valid, node in nodes.items()}
    print(f"\nwrk -t2 -c{args.connections} -d{args.seconds:g}s, {args.rounds} rounds, medians")
    for valid, entries in upstream.items():
        times = sorted(float(e["urt"].split(",")[0].split(":")[0]) for e in entries if e["urt"] not in ("", "-"))
        statuses = collections.Counter(e["upstream_status"] for e in entries)
        print(f"CACHE_VALID={valid}: {len(entries)} requests reached imgsvc over the whole run {dict(statuses)}, "
              f"upstream time p50 {times[len(times) // 2] * 1000:.0f} ms, max {times[-1] * 1000:.0f} ms")  # fmt: skip
    print("| workload | CACHE_VALID | req/s | CPU µs/req (nginx + imgsvc) | p99 ms | errors | ÷ 10m, per round |")
    print("|---|---|---|---|---|---|---|")
    for workload in workloads:
        base = statistics.median(r.rps for r in runs[(workload, "10m")])
        for valid in VALIDITIES:
            rs = runs[(workload, valid)]
            rps = statistics.median(r.rps for r in rs)
            ratios = [a.rps / b.rps for a, b in zip(rs, runs[(workload, "10m")], strict=True)]
            print(f"| {workload} | {valid} | {rps:,.0f} | {statistics.median(r.cpu_ms for r in rs) * 1000:.1f} | "
                  f"{statistics.median(r.p99_ms for r in rs):.2f} | {sum(r.errors for r in rs)} | "
                  f"×{statistics.median(ratios):.3f} (of medians ×{rps / base:.3f}) |")  # fmt: skip


if __name__ == "__main__":
    main()
