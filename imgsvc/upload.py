"""Uploads: read the body under a byte cap (raw or multipart), then sniff, probe, store, record.

The blob is durable before its record is committed, so a record never points at
nothing; a failed upload leaves no record behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import unicodedata
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, get_args

from python_multipart.multipart import MultipartParser, parse_options_header

from imgsvc import derivations, pipeline
from imgsvc.catalog import Catalog, ImageRecord, Visibility, new_image_id
from imgsvc.errors import BadRequest, InvalidParameter, PayloadTooLarge, RequestTimeout, UnsupportedFormat
from imgsvc.idempotency import Claim, IdempotencyKeys, KeyScope, Replay
from imgsvc.sniffing import sniff_format
from imgsvc.storage import BlobStore, blob_key
from imgsvc.workers import WorkerPool

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

MAX_FIELD_BYTES = 1024
_CATEGORY = re.compile(r"^[\w .:/-]{0,64}$")


@dataclass(slots=True)
class UploadBody:
    data: bytes = b""
    filename: str | None = None
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UploadOptions:
    category: str = ""
    visibility: Visibility = "public"


async def read_body(
    content_type: str,
    content_length: str | None,
    chunks: AsyncIterator[bytes],
    max_bytes: int,
    idle_timeout: float = 30.0,
    *,
    min_rate: int = 0,
    rate_window: float = 10.0,
) -> UploadBody:
    """The uploaded file (raw `image/*` body or multipart field `file`), refusing past max_bytes as it streams,
    when the client sends nothing for `idle_timeout` seconds, and when a window of `rate_window` seconds brings
    less than `min_rate` bytes per second (0: no rate check)."""
    if content_length is not None and content_length.isdigit() and int(content_length) > max_bytes:
        raise PayloadTooLarge(f"the body of {content_length} bytes exceeds the {max_bytes}-byte upload limit")
    chunks = _paced(chunks, idle_timeout, min_rate, rate_window)
    media_type, options = parse_options_header(content_type)
    if media_type.startswith(b"image/") or media_type == b"application/octet-stream":
        return UploadBody(data=await _read_capped(chunks, max_bytes))
    if media_type == b"multipart/form-data" and options.get(b"boundary"):
        return await _read_multipart(options[b"boundary"], chunks, max_bytes)
    raise UnsupportedFormat(
        "send the image as the raw body with Content-Type image/*, or as the multipart/form-data field 'file'"
    )


async def _paced(
    chunks: AsyncIterator[bytes], idle_timeout: float, min_rate: int, window: float
) -> AsyncIterator[bytes]:
    """The chunks as they come, or 408 (and the connection closed: the rest of the body would follow) when none
    arrives for idle_timeout seconds or a tumbling window of `window` seconds brings fewer than min_rate × window
    bytes. Each wait ends at the first moment the body is certain to fail if nothing more arrives."""
    loop = asyncio.get_running_loop()
    iterator = aiter(chunks)
    needed = min_rate * window
    last = loop.time()
    window_end, received = last + window, 0  # bytes received in the current window
    while True:
        idle_at = last + idle_timeout
        slow_at = (window_end if received < needed else window_end + window) if min_rate else idle_at
        try:
            async with asyncio.timeout_at(min(idle_at, slow_at)):
                chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            if idle_at <= slow_at:
                raise _timeout(f"no upload data arrived for {idle_timeout:g} s") from None
            raise _too_slow(received if slow_at == window_end else 0, min_rate, window) from None
        last = loop.time()
        if min_rate and last >= window_end:
            if received < needed or last >= window_end + window:
                raise _too_slow(received if last < window_end + window else 0, min_rate, window)
            window_end, received = window_end + window, 0
        received += len(chunk)
        yield chunk


def _timeout(detail: str) -> RequestTimeout:
    return RequestTimeout(detail, headers={"Connection": "close"})


def _too_slow(received: int, min_rate: int, window: float) -> RequestTimeout:
    return _timeout(f"the upload sent {received} bytes in {window:g} s; at least {min_rate} bytes/s are required")


async def _read_capped(chunks: AsyncIterator[bytes], max_bytes: int) -> bytes:
    buffer = bytearray()
    async for chunk in chunks:
        buffer += chunk
        if len(buffer) > max_bytes:
            raise PayloadTooLarge(f"the body exceeds the {max_bytes}-byte upload limit")
    return bytes(buffer)


class _MultipartCollector:
    """Collects the `file` part (capped) and small text fields; ignores nothing silently."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.body = UploadBody()
        self._file = bytearray()
        self._header_field = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._value = bytearray()
        self._files_seen = 0

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_header_field": lambda d, s, e: setattr(self, "_header_field", self._header_field + d[s:e]),
            "on_header_value": self._header_value,
            "on_header_end": lambda: setattr(self, "_header_field", b""),
            "on_headers_finished": self._headers_finished,
        }

    def _part_begin(self) -> None:
        self._headers, self._name, self._value = {}, None, bytearray()

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        name = self._header_field.lower()
        self._headers[name] = self._headers.get(name, b"") + data[start:end]

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        if name is None:
            raise BadRequest("a multipart part has no name")
        self._name = name.decode("utf-8", "replace")
        if self._name == "file":
            self._files_seen += 1
            if self._files_seen > 1:
                raise InvalidParameter("send exactly one 'file' part", param="file")
            filename = options.get(b"filename")
            self.body.filename = filename.decode("utf-8", "replace") if filename is not None else None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name == "file":
            self._file += data[start:end]
            if len(self._file) > self.max_bytes:
                raise PayloadTooLarge(f"the file exceeds the {self.max_bytes}-byte upload limit")
        else:
            self._value += data[start:end]
            if len(self._value) > MAX_FIELD_BYTES:
                raise InvalidParameter(f"field is longer than {MAX_FIELD_BYTES} bytes", param=self._name)

    def _part_end(self) -> None:
        if self._name is not None and self._name != "file":
            if self._name in self.body.fields:
                raise InvalidParameter("field given twice", param=self._name)
            self.body.fields[self._name] = self._value.decode("utf-8", "replace")

    def finish(self) -> UploadBody:
        if self._files_seen == 0:
            raise InvalidParameter("the multipart body has no 'file' part", param="file")
        self.body.data = bytes(self._file)
        return self.body


async def _read_multipart(boundary: bytes, chunks: AsyncIterator[bytes], max_bytes: int) -> UploadBody:
    collector = _MultipartCollector(max_bytes)
    parser = MultipartParser(boundary, collector.callbacks())
    received = 0
    async for chunk in chunks:
        received += len(chunk)
        if received > max_bytes + 64 * 1024:  # the file itself is capped exactly; this bounds the framing
            raise PayloadTooLarge(f"the body exceeds the {max_bytes}-byte upload limit")
        try:
            parser.write(chunk)
        except (PayloadTooLarge, InvalidParameter, BadRequest):
            raise
        except Exception as exc:  # python-multipart raises its own errors on malformed framing
            raise BadRequest(f"malformed multipart body: {exc}") from None
    try:
        parser.finalize()
    except Exception as exc:
        raise BadRequest(f"malformed multipart body: {exc}") from None
    return collector.finish()


def upload_options(values: dict[str, str]) -> UploadOptions:
    unknown = set(values) - {"category", "visibility"}
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidParameter(f"unknown upload parameter {name!r}; use category and visibility", param=name)
    category = values.get("category", "")
    if not _CATEGORY.match(category):
        raise InvalidParameter("category: up to 64 letters, digits, spaces or . : / _ -", param="category")
    visibility = values.get("visibility", "public")
    if visibility not in get_args(Visibility):
        raise InvalidParameter("visibility must be public or private", param="visibility")
    return UploadOptions(category=category, visibility=visibility)  # type: ignore[arg-type]


def sanitize_filename(name: str | None) -> str | None:
    """Keep a display name only: no path, no control characters, at most 200 characters."""
    if not name:
        return None
    name = unicodedata.normalize("NFC", name.replace("\\", "/").rsplit("/", 1)[-1])
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C").strip().lstrip(".")
    return name[:200] or None


@dataclass(frozen=True, slots=True)
class Ingested:
    image: ImageRecord
    replayed: bool  # the answer of an earlier request with the same idempotency key: nothing was stored


@dataclass(frozen=True, slots=True)
class RetryKey:
    """What makes a retried upload recognisable: the client's `Idempotency-Key`, or an import's source."""

    scope: KeyScope
    key: str


@dataclass(frozen=True, slots=True)
class Ingest:
    """Everything an upload needs, built once in `app.py`."""

    catalog: Catalog
    store: BlobStore
    pool: WorkerPool
    limits: pipeline.PipelineLimits
    keys: IdempotencyKeys
    wake_deriver: Callable[[], None] | None = None  # wakes the derivation worker once the upload is committed

    async def ingest(
        self, body: UploadBody, owner: str, options: UploadOptions, retry_key: RetryKey | None = None
    ) -> Ingested:
        """Validate and store an upload as a new image. Identical bytes share one blob, written once; a request
        repeating an earlier one's `retry_key` (same owner, bytes and options) gets that request's image."""
        if not body.data:
            raise BadRequest("the upload is empty")
        if sniff_format(body.data[:32]) is None:
            raise UnsupportedFormat("not a JPEG, PNG, WebP, GIF, AVIF/HEIF or TIFF image (checked by its bytes)")
        sha256 = hashlib.sha256(body.data).hexdigest()
        filename = sanitize_filename(body.filename)
        claim = None
        if retry_key is not None:
            fingerprint = hashlib.sha256(
                "\n".join([sha256, options.category, options.visibility, filename or ""]).encode()
            ).hexdigest()
            answer = await self.keys.claim(owner, retry_key.scope, retry_key.key, fingerprint)
            if isinstance(answer, Replay):
                first = await self.catalog.get(answer.image_id, include_deleted=True)
                assert first is not None  # idempotency_keys.image_id references images, which are never removed
                return Ingested(first, replayed=True)
            claim = answer
        try:
            return Ingested(await self._store(body.data, sha256, filename, owner, options, claim), replayed=False)
        except BaseException:
            if claim is not None:
                with contextlib.suppress(Exception):  # else the claim is taken over once stale
                    await self.keys.release(claim)
            raise

    async def _store(
        self, data: bytes, sha256: str, filename: str | None, owner: str, options: UploadOptions, claim: Claim | None
    ) -> ImageRecord:
        probe = await self.pool.submit(pipeline.probe, data, self.limits)
        record = ImageRecord(
            id=new_image_id(),
            sha256=sha256,
            owner=owner,
            category=options.category,
            visibility=options.visibility,
            format=probe.format,
            width=probe.width,
            height=probe.height,
            bytes=len(data),
            frames=probe.frames,
            has_alpha=probe.has_alpha,
            original_filename=filename,
            created_at=datetime.now(UTC),
        )
        async with self.catalog.blob_lock(sha256) as conn:  # garbage collection cannot take the blob meanwhile
            new_blob = not await self.store.exists(blob_key(sha256))
            if new_blob:  # identical bytes are written once
                await self.store.put(blob_key(sha256), data)
            async with conn.transaction():
                stored = await self.catalog.insert(record, conn)
                await derivations.enqueue(conn, sha256, new_blob=new_blob)  # levels and placeholder, off this path
                if claim is not None:
                    await self.keys.complete(conn, claim, stored.id)
        if self.wake_deriver is not None:
            self.wake_deriver()
        return stored
