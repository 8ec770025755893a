"""Auth figures: the latency an authenticated upload adds with a cold and a warm token cache
(introspection and JWKS, against auth=none), and LRU-hit requests/s of signed vs unsigned URLs.

Run: `make bench`. Needs the reference main app (`python -m mainapp`), started here on loopback.
"""

from __future__ import annotations

import os
import secrets
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
from harness import IMAGES, free_port, ms, print_table, start, start_imgsvc, stop, timed, wrk

from imgsvc.client import RenderUrls

ROUNDS = 40
SOURCE = (IMAGES / "2569067123_aca715a2ee_o.jpg").read_bytes()
KEY = ("k1", "bench-secret-0123456789abcdef0123456789")


def uploads(url: str, token: str | None, fresh_token) -> list[float]:  # type: ignore[no-untyped-def]
    def once() -> None:
        auth = {"Authorization": f"Bearer {fresh_token() if fresh_token else token}"} if token else {}
        body = SOURCE + secrets.token_bytes(16)  # distinct bytes: every upload is stored, none deduplicated
        httpx.post(f"{url}/images", content=body, headers={"Content-Type": "image/jpeg", **auth}).raise_for_status()

    return timed(once, ROUNDS)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        main_url = f"http://127.0.0.1:{port}"
        mainapp, _ = start([sys.executable, "-m", "mainapp", "--host", "127.0.0.1", "--port", str(port),
                            "--audience", "imgsvc"], {}, main_url, Path(tmp) / "mainapp.log", "/healthz")  # fmt: skip

        def token(sub: str = "alice") -> str:
            response = httpx.post(f"{main_url}/token", json={"sub": sub, "scope": "images:read images:write"})
            return str(response.json()["access_token"])

        common = {"IMGSVC_UPLOAD_RATE": "0", "IMGSVC_SIGNING_KEYS": f"{KEY[0]}:{KEY[1]}"}
        servers = {
            "none": start_imgsvc(Path(tmp) / "none", **common),
            "introspect": start_imgsvc(Path(tmp) / "introspect", IMGSVC_AUTH="introspect",
                                       IMGSVC_AUTH_INTROSPECT_URL=f"{main_url}/introspect", **common),
            "jwks": start_imgsvc(Path(tmp) / "jwks", IMGSVC_AUTH="jwks", IMGSVC_AUTH_AUDIENCE="imgsvc",
                                 IMGSVC_AUTH_JWKS_URL=f"{main_url}/.well-known/jwks.json",
                                 IMGSVC_AUTH_ISSUER=main_url, **common),
        }  # fmt: skip
        try:
            baseline = uploads(servers["none"][1], None, None)
            rows.append(("upload, auth=none", ms(baseline), "—"))
            for mode in ("introspect", "jwks"):
                url = servers[mode][1]
                warm_token = token()
                uploads(url, warm_token, None)  # warm-up: the token's answer (or the JWKS) is now cached
                fresh = iter([token(f"user-{i}") for i in range(ROUNDS)])  # issued before the clock starts
                cold = uploads(url, "x", lambda fresh=fresh: next(fresh))
                warm = uploads(url, warm_token, None)
                for name, samples in (("cold token cache", cold), ("warm token cache", warm)):
                    added = (statistics.median(samples) - statistics.median(baseline)) * 1000
                    rows.append((f"upload, auth={mode}, {name}", ms(samples), f"{added:+.1f} ms"))
            url = servers["none"][1]
            image_id = httpx.post(f"{url}/images", content=SOURCE, headers={"Content-Type": "image/jpeg"}).json()["id"]
            unsigned = f"{url}/img/{image_id}?fmt=webp&w=256"
            signed = RenderUrls(url, [KEY]).url(image_id, w=256, fmt="webp")
            for name, target in (("unsigned", unsigned), ("signed", signed)):
                httpx.get(target).raise_for_status()
                rps, latency = wrk(target, 32)
                rows.append((f"LRU hits, {name} URL, wrk 32 connections", f"{rps:,.0f} req/s", latency))
        finally:
            for proc, _ in servers.values():
                stop(proc)
            stop(mainapp)
    print_table((f"figure ({os.cpu_count()} cores)", "p50 (p90) or rate", "added / latency"), rows)


if __name__ == "__main__":
    main()
