"""Bulk import: a folder tree, or the rows of an existing app's table (bytea or base64 image columns).

Every item goes through the same validation as an upload, keyed by its source (the file's absolute path, or
the row's id), so a re-run skips what an earlier run imported: an interrupted import is resumed by running it again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import csv
import hashlib
import sys
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import asyncpg

from imgsvc.errors import ImgsvcError
from imgsvc.idempotency import MAX_KEY_LENGTH
from imgsvc.upload import Ingest, RetryKey, UploadBody, UploadOptions

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".avif", ".heic", ".heif", ".tif", ".tiff"}


@dataclass(slots=True)
class ImportReport:
    imported: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)

    @property
    def done(self) -> int:
        return self.imported + self.skipped + len(self.failures)


@dataclass(frozen=True, slots=True)
class Item:
    source: str  # a path, or the old id of a row
    owner: str
    data: bytes | None  # None when it could not be read; `error` says why
    error: str | None = None
    filename: str | None = None
    key: str = ""  # what a re-run recognises the item by (`retry_key`)

    @property
    def retry_key(self) -> RetryKey:
        key = self.key or f"source:{self.source}"
        if len(key) > MAX_KEY_LENGTH:
            key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
        return RetryKey("import", key)


def files_under(paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(path)
    return found


async def folder_items(files: list[Path], owner: str) -> AsyncIterator[Item]:
    for path in files:
        try:
            yield Item(str(path), owner, path.read_bytes(), filename=path.name, key=f"file:{path.resolve()}")
        except OSError as exc:
            yield Item(str(path), owner, None, f"cannot read: {exc.strerror}")


def decode_column(value: object) -> bytes:
    """bytea as is; text as base64, with or without a `data:image/...;base64,` prefix."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("data:"):
            header, sep, text = text.partition(",")
            if not sep or not header.endswith(";base64"):
                raise ValueError("a data: URI that is not base64")
        return base64.b64decode(text, validate=True)
    raise ValueError(f"unsupported column type {type(value).__name__}")


async def sql_items(dsn: str, query: str) -> AsyncIterator[Item]:
    """Rows of `query`, which must return the columns id, owner, data."""
    query_key = hashlib.sha256(query.encode()).hexdigest()[:16]
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction(readonly=True):
            async for row in conn.cursor(query):
                old_id, owner = str(row["id"]), str(row["owner"])
                key = f"sql:{query_key}:{old_id}"  # ids of two queries (tables) may coincide
                try:
                    yield Item(old_id, owner, decode_column(row["data"]), key=key)
                except (ValueError, binascii.Error) as exc:
                    yield Item(old_id, owner, None, f"undecodable data column: {exc}", key=key)
    finally:
        await conn.close()


async def run_import(
    ingest: Ingest,
    items: AsyncIterator[Item],
    options: UploadOptions,
    *,
    total: int | None = None,
    mapping: TextIO | None = None,
    progress: TextIO = sys.stderr,
    concurrency: int = 2,
) -> ImportReport:
    """Ingest every item, `concurrency` at a time; failures are reported, never fatal."""
    report = ImportReport()
    writer = csv.writer(mapping) if mapping is not None else None
    if writer is not None:
        writer.writerow(["old_id", "new_id", "status"])
    slots = asyncio.Semaphore(concurrency)

    async def one(item: Item) -> None:
        try:
            status, new_id = "failed", ""
            if item.data is None:
                report.failures.append((item.source, item.error or "unreadable"))
            else:
                try:
                    result = await ingest.ingest(
                        UploadBody(item.data, item.filename), item.owner, options, item.retry_key
                    )
                    status, new_id = ("skipped" if result.replayed else "imported"), result.image.id
                    report.imported += not result.replayed
                    report.skipped += result.replayed
                except ImgsvcError as exc:
                    report.failures.append((item.source, f"{exc.status} {exc.slug}: {exc.detail}"))
            if writer is not None:
                writer.writerow([item.source, new_id, status])
            shown = f"{report.done}/{total}" if total is not None else str(report.done)
            progress.write(f"\r[{shown}] imported {report.imported}, skipped {report.skipped}, "
                           f"failed {len(report.failures)}")  # fmt: skip
            progress.flush()
        finally:
            slots.release()

    tasks = []
    async for item in items:  # at most `concurrency` items (and their bytes) in flight
        await slots.acquire()
        tasks.append(asyncio.create_task(one(item)))
    await asyncio.gather(*tasks)
    progress.write("\n")
    for source, reason in report.failures:
        progress.write(f"failed: {source}: {reason}\n")
    return report
