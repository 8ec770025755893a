"""Scale-out figures: delete propagation across two imgsvc replicas sharing one Postgres and one store
(a delete on A, then B polled every 5 ms until it answers 404), with B's LRU holding the variant; each
original is uploaded twice (two images, one blob), and the image not deleted must stay a hit on B.

Run: `make bench`.
"""

from __future__ import annotations

import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from harness import IMAGES, print_table, start_imgsvc, stop

ROUNDS = 20
SOURCE = (IMAGES / "2569067123_aca715a2ee_o.jpg").read_bytes()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "shared"  # one embedded Postgres and one blob dir for both replicas
        a, a_url = start_imgsvc(data_dir)
        b, b_url = start_imgsvc(data_dir)
        delays = []
        survivor_hits = 0
        try:
            with httpx.Client(timeout=30) as http:
                for _ in range(ROUNDS):
                    body = SOURCE + secrets.token_bytes(16)  # a new original each round
                    gone, kept = (
                        http.post(f"{a_url}/images", content=body, headers={"Content-Type": "image/jpeg"}).json()["id"]
                        for _ in range(2)
                    )
                    variant, survivor = (f"{b_url}/img/{i}?w=256&fmt=webp" for i in (gone, kept))
                    for url in (variant, survivor):
                        http.get(url).raise_for_status()
                        assert http.get(url).headers["x-cache"] == "hit"
                    http.delete(f"{a_url}/images/{gone}").raise_for_status()
                    deleted = time.perf_counter()
                    while http.get(variant).status_code != 404:
                        if time.perf_counter() - deleted > 5:
                            raise SystemExit("B still serves the deleted image after 5 s")
                        time.sleep(0.005)
                    delays.append(time.perf_counter() - deleted)
                    still = http.get(survivor)
                    survivor_hits += (still.status_code, still.headers["x-cache"]) == (200, "hit")
        finally:
            stop(b)
            stop(a)
    ms = [d * 1000 for d in delays]
    print_table(
        (f"figure ({os.cpu_count()} cores)", "value"),
        [
            (f"delete on A → 404 on B, {ROUNDS} deletes", f"p50 {statistics.median(ms):.1f} ms, max {max(ms):.1f} ms"),
            (
                "the other image of the same blob, on B right after",
                f"{survivor_hits}/{ROUNDS} answered 200 from the LRU",
            ),
        ],
    )


if __name__ == "__main__":
    main()
