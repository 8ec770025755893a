"""Storage figures: upload and miss-render p50 with the originals in SeaweedFS (S3) vs the filesystem,
two imgsvc processes measured in one run (variant LRU and originals LRU off, so every render reads
the original from its store).

Run: `make bench`.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from pathlib import Path

import httpx
from harness import IMAGES, REPO, ms, print_table, start_imgsvc, stop, timed

sys.path.insert(0, str(REPO))
from tests.seaweed import SeaweedS3

ROUNDS = 30
SOURCE = (IMAGES / "photo-4000x3000.jpg").read_bytes()
NO_CACHES = {"IMGSVC_CACHE_BYTES": "0", "IMGSVC_ORIGINALS_CACHE_BYTES": "0", "IMGSVC_UPLOAD_RATE": "0"}


def measure(url: str) -> tuple[list[float], list[float]]:
    with httpx.Client(base_url=url, timeout=60) as http:
        ids: list[str] = []

        def upload() -> None:
            response = http.post("/images", content=SOURCE + secrets.token_bytes(16),
                                 headers={"Content-Type": "image/jpeg"})  # fmt: skip
            response.raise_for_status()
            ids.append(response.json()["id"])

        uploads = timed(upload, ROUNDS)
        renders = timed(lambda: http.get(f"/img/{ids[-1]}", params={"w": "256"}).raise_for_status(), ROUNDS)
    return uploads, renders


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, SeaweedS3(Path(tmp) / "seaweed") as seaweed:
        s3 = {
            "IMGSVC_STORAGE_URL": f"s3://{seaweed.bucket}/bench",
            "IMGSVC_S3_ENDPOINT_URL": seaweed.endpoint_url,
            "IMGSVC_S3_REGION": "us-east-1",
            "IMGSVC_S3_ACCESS_KEY_ID": seaweed.access_key,
            "IMGSVC_S3_SECRET_ACCESS_KEY": seaweed.secret_key,
            "IMGSVC_S3_PATH_STYLE": "true",
        }
        fs_proc, fs_url = start_imgsvc(Path(tmp) / "fs", **NO_CACHES)
        s3_proc, s3_url = start_imgsvc(Path(tmp) / "s3", **NO_CACHES, **s3)
        try:
            fs_uploads, fs_renders = measure(fs_url)
            s3_uploads, s3_renders = measure(s3_url)
        finally:
            stop(fs_proc)
            stop(s3_proc)
    print_table(
        (f"photo-4000x3000.jpg (2.3 MB), {ROUNDS} sequential, {os.cpu_count()} cores", "filesystem", "SeaweedFS (S3)"),
        [
            ("upload", ms(fs_uploads), ms(s3_uploads)),
            ("miss render w=256 (original read from the store)", ms(fs_renders), ms(s3_renders)),
        ],
    )


if __name__ == "__main__":
    main()
