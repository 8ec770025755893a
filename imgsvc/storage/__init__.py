"""Blob storage: the small interface every backend implements, and `open_store` by URL.

Keys are content addresses (`sha256/<aa>/<bb>/<hex>`), and what is derived from one lives under
`derived/<aa>/<bb>/<hex>/<name>`; a blob never changes once written.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import asyncpg

    from imgsvc.storage.s3 import S3Config

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$")


class BlobStore(Protocol):
    async def put(self, key: str, data: bytes) -> None:
        """Store durably; idempotent, since equal keys always mean equal bytes."""

    async def get(self, key: str, max_bytes: int) -> bytes:
        """The blob's bytes; BlobNotFound if absent, BlobTooLarge past max_bytes."""

    async def exists(self, key: str) -> bool: ...

    async def delete(self, key: str) -> None:
        """Remove the blob; absent blobs are not an error."""

    def list_blobs(self) -> AsyncIterator[tuple[str, datetime]]:
        """Every stored key with the time it was written (for garbage collection)."""

    async def check(self) -> None:
        """Raise if the store cannot be reached (readiness)."""

    async def close(self) -> None: ...


def blob_key(sha256_hex: str) -> str:
    if not _SHA256.match(sha256_hex):
        raise ValueError("not a sha256 hex digest")
    return f"sha256/{sha256_hex[:2]}/{sha256_hex[2:4]}/{sha256_hex}"


def derived_key(sha256_hex: str, name: str) -> str:
    """Where something derived from a blob (e.g. a reduced copy, `name` "1024.jpg") is kept, beside it."""
    return validate_key(f"derived/{blob_key(sha256_hex).removeprefix('sha256/')}/{name}")


def blob_of(key: str) -> str | None:
    """The sha256 of the blob a key holds or is derived from; None for keys that are neither."""
    parts = key.split("/")
    if (len(parts) == 4 and parts[0] == "sha256") or (len(parts) == 5 and parts[0] == "derived"):
        return parts[3] if _SHA256.match(parts[3]) else None
    return None


def validate_key(key: str) -> str:
    """Reject anything that could step outside a store's namespace (`..`, absolute paths, odd characters)."""
    if len(key) > 512 or not _SAFE_KEY.match(key) or any(part in {".", ".."} for part in key.split("/")):
        raise ValueError(f"unsafe blob key: {key!r}")
    return key


class BlobTooLarge(Exception):
    """A stored blob is larger than the reader's cap (a corrupt or foreign object)."""


def check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise BlobTooLarge(f"blob of {size} bytes exceeds the {max_bytes}-byte cap")


async def open_store(url: str, *, pool: asyncpg.Pool | None = None, s3: S3Config | None = None) -> BlobStore:
    """The store a URL names: `file:///path`, `postgres:` (the catalog database, through `pool`), or
    `s3://bucket/prefix` (connection settings from `s3`, whose bucket and prefix the URL replaces); guarded."""
    from imgsvc.storage.guard import GuardedStore

    return GuardedStore(await _open_backend(url, pool, s3), url)


async def _open_backend(url: str, pool: asyncpg.Pool | None, s3: S3Config | None) -> BlobStore:
    if url.startswith("file://"):
        from imgsvc.storage.fs import FilesystemStore

        return FilesystemStore(url.removeprefix("file://"))
    if url == "postgres:":
        from imgsvc.storage.pg import PostgresStore

        if pool is None:
            raise ValueError("the postgres: store needs the catalog's connection pool")
        return PostgresStore(pool)
    if url.startswith("s3://"):
        from dataclasses import replace

        from imgsvc.storage.s3 import S3Config, S3Store, parse_s3_url

        bucket, prefix = parse_s3_url(url)
        return await S3Store.open(replace(s3 or S3Config(bucket=bucket), bucket=bucket, prefix=prefix))
    raise ValueError(f"unsupported storage URL: {url!r}")
