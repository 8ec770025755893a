"""One contract for every blob store: the same tests run against each backend, each a real one."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from imgsvc.catalog import Catalog
from imgsvc.errors import BlobNotFound, Unavailable
from imgsvc.storage import BlobStore, BlobTooLarge, blob_key, blob_of, derived_key, open_store
from imgsvc.storage.s3 import S3Config

BACKENDS = ["fs", "pg", "s3"]
Opener = Callable[[], Any]


@pytest.fixture(params=BACKENDS)
async def opener(request: pytest.FixtureRequest, tmp_path: Path, database_url: str) -> AsyncIterator[Opener]:
    """A function opening a fresh handle on one and the same store, so tests can close and reopen it."""
    catalogs: list[Catalog] = []
    if request.param == "fs":

        async def open_fs() -> BlobStore:
            return await open_store(f"file://{tmp_path / 'blobs'}")

        yield open_fs
    elif request.param == "s3":
        seaweed = request.getfixturevalue("seaweed")
        config = S3Config(
            bucket="", endpoint_url=seaweed.endpoint_url, region="us-east-1",
            access_key_id=seaweed.access_key, secret_access_key=seaweed.secret_key, path_style=True,
        )  # fmt: skip
        url = f"s3://{seaweed.bucket}/contract-{uuid.uuid4().hex[:8]}"

        async def open_s3() -> BlobStore:
            return await open_store(url, s3=config)

        yield open_s3
    else:

        async def open_pg() -> BlobStore:
            catalog = await Catalog.connect(database_url, max_size=30)
            catalogs.append(catalog)
            await catalog.migrate()
            return await open_store("postgres:", pool=catalog.pool)

        yield open_pg
    for catalog in catalogs:
        with contextlib.suppress(Exception):
            await catalog.close()


@pytest.fixture
async def store(opener: Opener) -> AsyncIterator[BlobStore]:
    handle = await opener()
    yield handle
    await handle.close()


def key_of(data: bytes) -> str:
    return blob_key(hashlib.sha256(data).hexdigest())


async def test_round_trip(store: BlobStore) -> None:
    data = os.urandom(300_000)
    await store.put(key_of(data), data)
    assert await store.get(key_of(data), len(data)) == data
    assert await store.exists(key_of(data))


async def test_missing_blob_is_blob_not_found(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        await store.get(key_of(b"never stored"), 1000)
    assert not await store.exists(key_of(b"never stored"))


async def test_reads_stop_at_the_byte_cap(store: BlobStore) -> None:
    data = os.urandom(10_000)
    await store.put(key_of(data), data)
    with pytest.raises(BlobTooLarge):
        await store.get(key_of(data), 9_999)
    assert await store.get(key_of(data), 10_000) == data


@pytest.mark.parametrize(
    "key", ["../etc/passwd", "sha256/../../x", "/abs/path", "a//b", "a/./b", "", "a\x00b", "a/b/", "é", "a" * 600]
)
async def test_traversal_looking_keys_are_refused(store: BlobStore, key: str) -> None:
    for operation in (store.put(key, b"x"), store.get(key, 10), store.exists(key), store.delete(key)):
        with pytest.raises(ValueError):
            await operation


async def test_concurrent_writers_of_one_key(store: BlobStore) -> None:
    data = os.urandom(200_000)
    await asyncio.gather(*(store.put(key_of(data), data) for _ in range(20)))
    assert await store.get(key_of(data), len(data)) == data


async def test_a_blob_survives_closing_and_reopening_the_store(opener: Opener) -> None:
    data = os.urandom(50_000)
    first = await opener()
    await first.put(key_of(data), data)
    await first.close()
    second = await opener()
    try:
        assert await second.get(key_of(data), len(data)) == data
    finally:
        await second.close()


async def test_delete_is_idempotent(store: BlobStore) -> None:
    data = os.urandom(1000)
    await store.put(key_of(data), data)
    await store.delete(key_of(data))
    await store.delete(key_of(data))
    assert not await store.exists(key_of(data))
    with pytest.raises(BlobNotFound):
        await store.get(key_of(data), 1000)


async def test_check_passes_on_a_working_store(store: BlobStore) -> None:
    await store.check()


async def test_listing_shows_every_blob_with_its_write_time(store: BlobStore) -> None:
    blobs = [os.urandom(100) for _ in range(3)]
    for data in blobs:
        await store.put(key_of(data), data)
    listed = {key: written async for key, written in store.list_blobs()}
    assert set(listed) == {key_of(data) for data in blobs}
    assert all(written.tzinfo is not None for written in listed.values())


async def test_a_failing_filesystem_is_unavailable_and_recovers(tmp_path: Path) -> None:
    """I/O errors other than a missing blob are 503 `Unavailable`, never a raw OSError; a blob that is
    really missing stays `BlobNotFound`; once the directory is back, the same store works again."""
    root = tmp_path / "blobs"
    store = await open_store(f"file://{root}")
    data = os.urandom(1000)
    await store.put(key_of(data), data)
    root.rename(tmp_path / "away")
    root.write_bytes(b"not a directory")  # every path under the root now fails with ENOTDIR
    for operation in (store.get(key_of(data), 1000), store.put(key_of(b"new"), b"new"), store.check()):
        with pytest.raises(Unavailable):
            await operation
    root.unlink()
    (tmp_path / "away").rename(root)
    assert await store.get(key_of(data), 1000) == data
    with pytest.raises(BlobNotFound):
        await store.get(key_of(b"never stored"), 1000)
    await store.close()


async def test_derived_blobs_live_beside_their_blob(store: BlobStore) -> None:
    """A pyramid level is a blob of its own under `derived/`, named after the blob it comes from."""
    data = os.urandom(1000)
    sha256 = hashlib.sha256(data).hexdigest()
    levels = {derived_key(sha256, name): os.urandom(300) for name in ("1-4.jpg", "1-8.jpg")}
    await store.put(key_of(data), data)
    for key, level in levels.items():
        await store.put(key, level)
    assert all(key.startswith(f"derived/{sha256[:2]}/{sha256[2:4]}/{sha256}/") for key in levels)
    listed = {key async for key, _ in store.list_blobs()}
    assert listed == {key_of(data), *levels} and {blob_of(key) for key in listed} == {sha256}
    for key, level in levels.items():
        assert await store.get(key, len(level)) == level
    await store.delete(key_of(data))  # each is removed on its own (gc removes them together)
    assert await store.get(derived_key(sha256, "1-8.jpg"), 300) == levels[derived_key(sha256, "1-8.jpg")]
    for key in levels:
        await store.delete(key)
    assert [key async for key, _ in store.list_blobs()] == []


@pytest.mark.parametrize("key", ["derived/aa/bb/x/1-4.jpg", "other/file", "sha256/aa/bb", f"derived/{'0' * 64}"])
def test_keys_of_no_blob_name_none(key: str) -> None:
    assert blob_of(key) is None
