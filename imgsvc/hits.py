"""Remembered hits: an anonymous request for a public variant, by its exact URL, answered again from the
variant LRU without parsing, lookup or policy (or with a 304 when it names the ETag: how nginx revalidates),
for as long as the record it was rendered from is trusted."""

from __future__ import annotations

import time
from dataclasses import dataclass

from imgsvc import metrics
from imgsvc.cache import ByteLRU
from imgsvc.headers import etag_matches
from imgsvc.records import RecordCache, RecordStamp
from imgsvc.spec import accept_token

_VARIANT_HIT = metrics.cache_total.labels("variant", "hit")

RawHeaders = list[tuple[bytes, bytes]]
# A request as the hit index knows it: path, raw query string, Accept reduced to avif / webp / legacy.
RequestKey = tuple[str, bytes, str]


def request_key(path: str, query_string: bytes, accept: str | None) -> RequestKey:
    """The one definition of "the same request"; `accept` is the first Accept header, as Starlette reads it."""
    return (path, query_string, accept_token(accept))


@dataclass(frozen=True, slots=True)
class RememberedHit:
    variant_key: str
    etag: str
    headers: RawHeaders  # those of a 200 but the request id and length
    not_modified_headers: RawHeaders  # those of its 304
    expires: float  # time.monotonic()


@dataclass(frozen=True, slots=True)
class Answer:
    status: int  # 200, or 304 when the request's If-None-Match names the variant's ETag
    headers: RawHeaders
    body: bytes


class HitIndex:
    """Request keys -> the variant LRU key and headers to answer with; the bytes stay in (and are bounded by)
    the variant LRU, the entries are counted."""

    def __init__(self, records: RecordCache, variants: ByteLRU[str, bytes], max_entries: int = 10_000) -> None:
        self.records = records
        self.variants = variants
        self._hits: ByteLRU[RequestKey, RememberedHit] = ByteLRU(max_entries, lambda _: 1)

    def __len__(self) -> int:
        return len(self._hits)

    def store(
        self,
        key: RequestKey,
        image_id: str,
        variant_key: str,
        stamp: RecordStamp,
        etag: str,
        headers: RawHeaders,
        not_modified_headers: RawHeaders,
    ) -> None:
        """Remember the 200 (and its 304) that every anonymous request for `key` gets, trusted like the record
        it came from."""
        if self.variants.max_bytes and self.records.still_trusted(stamp, image_id):
            expires = stamp.looked_up + self.records.ttl
            hit = RememberedHit(variant_key, etag, headers, not_modified_headers, expires)
            self._hits.put(key, hit, group=image_id)

    def answer(self, key: RequestKey, if_none_match: str | None = None) -> Answer | None:
        """The answer of a remembered request: a 304 if `if_none_match` names its ETag (no bytes needed, as on
        the full path), else the 200 while its variant is still in the LRU; None otherwise."""
        hit = self._hits.get(key) if self.records.trusted else None
        if hit is None or hit.expires < time.monotonic():
            return None
        if if_none_match is not None and etag_matches(if_none_match, hit.etag):
            return Answer(304, hit.not_modified_headers, b"")
        data = self.variants.get(hit.variant_key)
        if data is None:
            return None
        _VARIANT_HIT.inc()
        return Answer(200, hit.headers, data)

    def forget(self, image_id: str) -> None:
        self._hits.evict_group(image_id)

    def clear(self) -> None:
        self._hits.clear()
