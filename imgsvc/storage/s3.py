"""S3 blob store: AWS S3 or any S3-compatible server, through one long-lived aiobotocore client.

Bounded connect and read timeouts, botocore's standard retries; what still fails is `Unavailable`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anyio
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from imgsvc.errors import BlobNotFound, Unavailable
from imgsvc.storage import check_size, validate_key

_BUCKET = re.compile(r"^(?!\d+\.\d+\.\d+\.\d+$)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})  # not NoSuchBucket: a missing bucket is an error
_CHUNK = 256 * 1024
_HASH_OFF_LOOP = 1024 * 1024  # hash larger bodies in a worker thread (hashlib releases the GIL)
_CHECK_SECONDS = 3.0  # readiness: one HeadBucket, however many attempts the client would make
_DOWN = (BotoCoreError, ClientError, aiohttp.ClientError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class S3Config:
    bucket: str
    prefix: str = ""  # key prefix inside the bucket, without slashes at either end
    endpoint_url: str | None = None  # None = AWS
    region: str | None = None  # None = AWS_REGION / AWS_DEFAULT_REGION / the AWS config file
    access_key_id: str | None = None  # None (with the secret) = the usual AWS credential chain
    secret_access_key: str | None = None
    path_style: bool = False  # http://host/bucket/key rather than http://bucket.host/key
    max_attempts: int = 3  # attempts per request, the first included (botocore standard retry mode)
    connect_timeout: float = 2.0
    read_timeout: float = 5.0  # seconds without a byte from the server, per attempt


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> `("bucket", "some/prefix")`; ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or parts.query or parts.fragment:
        raise ValueError(f"not an s3://bucket/prefix URL: {url!r}")
    if not _BUCKET.match(parts.netloc) or ".." in parts.netloc:
        raise ValueError(f"invalid S3 bucket name: {parts.netloc!r}")
    prefix = parts.path.strip("/")
    if prefix:
        validate_key(prefix)
    return parts.netloc, prefix


def _missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code", "")) in _MISSING


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    """Whatever is left after the client's retries: the store is unreachable, slow or refusing."""
    try:
        yield
    except _DOWN as exc:
        reason = exc.response.get("Error", {}).get("Code", "error") if isinstance(exc, ClientError) else None
        raise Unavailable(f"the blob store failed to {action} ({reason or type(exc).__name__})") from None


def _no_expect_continue(request: Any, **_: Any) -> None:
    """botocore asks for `Expect: 100-continue` on PUT; aiohttp then waits for the 100 with no timeout at all."""
    if "Expect" in request.headers:
        del request.headers["Expect"]


def _digests(data: bytes) -> tuple[str, str]:
    md5 = hashlib.md5(data, usedforsecurity=False).digest()
    return base64.b64encode(md5).decode(), base64.b64encode(hashlib.sha256(data).digest()).decode()


class S3Store:
    """Blobs as objects `<prefix>/<key>` in one bucket."""

    def __init__(self, config: S3Config, client: Any, stack: AsyncExitStack) -> None:
        self.config = config
        self.bucket = config.bucket
        self.prefix = config.prefix.strip("/")
        self._client = client
        self._stack = stack

    @classmethod
    async def open(cls, config: S3Config) -> S3Store:
        """Create the client (no request is made: `check` is the readiness probe)."""
        options: dict[str, Any] = {
            "retries": {"total_max_attempts": max(1, config.max_attempts), "mode": "standard"},
            "connect_timeout": config.connect_timeout,
            "read_timeout": config.read_timeout,
            "signature_version": "s3v4",
            # put() sends its own checksums; no SDK-chosen ones (some S3-compatible stores reject them).
            "request_checksum_calculation": "when_required",
        }
        if config.path_style:
            options["s3"] = {"addressing_style": "path"}
        stack = AsyncExitStack()
        client = await stack.enter_async_context(
            get_session().create_client(
                "s3",
                endpoint_url=config.endpoint_url,
                region_name=config.region,
                aws_access_key_id=config.access_key_id,
                aws_secret_access_key=config.secret_access_key,
                config=AioConfig(**options),
            )
        )
        client.meta.events.register("before-send.s3", _no_expect_continue)
        return cls(config, client, stack)

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    async def put(self, key: str, data: bytes) -> None:
        """PutObject with Content-MD5 and x-amz-checksum-sha256: the server rejects a body that arrives damaged."""
        name = self._key(key)
        if len(data) > _HASH_OFF_LOOP:
            md5, sha256 = await anyio.to_thread.run_sync(_digests, data)
        else:
            md5, sha256 = _digests(data)
        with _translated("write"):
            await self._client.put_object(
                Bucket=self.bucket,
                Key=name,
                Body=data,
                ContentLength=len(data),
                ContentMD5=md5,
                ChecksumSHA256=sha256,
                ContentType="application/octet-stream",
            )

    async def get(self, key: str, max_bytes: int) -> bytes:
        name = self._key(key)
        with _translated("read"):
            return await self._get(key, name, max_bytes)

    async def _get(self, key: str, name: str, max_bytes: int) -> bytes:
        try:
            response = await self._client.get_object(Bucket=self.bucket, Key=name)
        except ClientError as exc:
            if _missing(exc):
                raise BlobNotFound(key) from None
            raise
        async with response["Body"] as body:
            size = response.get("ContentLength")
            if size is not None:
                check_size(size, max_bytes)
            chunks: list[bytes] = []
            total = 0
            while chunk := await body.read(_CHUNK):
                total += len(chunk)
                check_size(total, max_bytes)  # a length-less or lying response stops here, unread
                chunks.append(chunk)
        return b"".join(chunks)

    async def exists(self, key: str) -> bool:
        name = self._key(key)
        with _translated("read"):
            try:
                await self._client.head_object(Bucket=self.bucket, Key=name)
            except ClientError as exc:
                if _missing(exc):
                    return False
                raise
        return True

    async def delete(self, key: str) -> None:
        name = self._key(key)
        with _translated("delete"):
            try:
                await self._client.delete_object(Bucket=self.bucket, Key=name)
            except ClientError as exc:
                if not _missing(exc):
                    raise

    async def list_blobs(self) -> AsyncIterator[tuple[str, datetime]]:
        start = f"{self.prefix}/" if self.prefix else ""
        paginator = self._client.get_paginator("list_objects_v2")
        with _translated("list"):
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
                for item in page.get("Contents", []):
                    yield item["Key"].removeprefix(start), item["LastModified"]

    async def check(self) -> None:
        with _translated("answer"):
            async with asyncio.timeout(_CHECK_SECONDS):
                await self._client.head_bucket(Bucket=self.bucket)

    async def close(self) -> None:
        await self._stack.aclose()
