"""Origin-tier figures at 32 connections (wrk): nginx cache hits vs imgsvc LRU hits vs misses.

Misses: imgsvc with its variant LRU off, each request a different width (a wrk Lua script), so
single-flight cannot merge them; hits: one URL, warmed. Run: `make bench`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import httpx
from harness import IMAGES, REPO, print_table, start_imgsvc, stop, wrk

sys.path.insert(0, str(REPO))
from tests.nginx_process import NginxProcess, find_nginx

SOURCE = (IMAGES / "2569067123_aca715a2ee_o.jpg").read_bytes()
QUERY = "w=256&fmt=webp"


def upload(url: str) -> str:
    return str(httpx.post(f"{url}/images", content=SOURCE, headers={"Content-Type": "image/jpeg"}).json()["id"])


def main() -> None:
    nginx_bin = find_nginx()
    if nginx_bin is None:
        raise SystemExit("nginx is not installed (apt-get install nginx)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        app, app_url = start_imgsvc(Path(tmp) / "app", IMGSVC_UPLOAD_RATE="0")
        cold, cold_url = start_imgsvc(Path(tmp) / "cold", IMGSVC_CACHE_BYTES="0", IMGSVC_UNSIGNED_WIDTHS="*")
        nginx = NginxProcess(nginx_bin, Path(tmp) / "nginx", app_url.removeprefix("http://")).start()
        try:
            image_id, cold_id = upload(app_url), upload(cold_url)
            hit = f"{nginx.url}/img/{image_id}?{QUERY}"
            for _ in range(2):
                httpx.get(hit).raise_for_status()
            assert httpx.get(hit).headers["x-cache-status"] == "HIT"
            script = Path(tmp) / "widths.lua"
            script.write_text(
                "request = function()\n"
                f'  return wrk.format("GET", "/img/{cold_id}?fmt=webp&w=" .. math.random(200, 2000))\n'
                "end\n"
            )
            for name, url, extra in (
                ("nginx cache hits", hit, ()),
                ("imgsvc LRU hits (no nginx)", f"{app_url}/img/{image_id}?{QUERY}", ()),
                ("misses: imgsvc renders (256-2000 px WebP)", cold_url, ("-s", str(script))),
            ):
                rps, latency = wrk(url, 32, extra=extra)
                rows.append((name, f"{rps:,.1f} req/s", latency))
        finally:
            nginx.stop()
            stop(app)
            stop(cold)
    print_table((f"2725x2225 JPEG source, wrk -c32, {os.cpu_count()} cores", "rate", "latency"), rows)


if __name__ == "__main__":
    main()
