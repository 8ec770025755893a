"""Remembered hits: an anonymous request for a public variant, by its exact URL, answered again from the
variant LRU without parsing, lookup or policy, for as long as the record it was rendered from is trusted."""

from __future__ import annotations

import time
from dataclasses import dataclass

from imgsvc import metrics
from imgsvc.cache import ByteLRU
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
    headers: RawHeaders  # those of a 200 but the request id and length
    expires: float  # time.monotonic()


class HitIndex:
    """Request keys -> the variant LRU key and headers to answer with; the bytes stay in (and are bounded by)
    the variant LRU, the entries are counted."""

    def __init__(self, records: RecordCache, variants: ByteLRU[str, bytes], max_entries: int = 10_000) -> None:
        self.records = records
        self.variants = variants
        self._hits: ByteLRU[RequestKey, RememberedHit] = ByteLRU(max_entries, lambda _: 1)

    def __len__(self) -> int:
        return len(self._hits)

    def store(self, key: RequestKey, image_id: str, variant_key: str, stamp: RecordStamp, headers: RawHeaders) -> None:
        """Remember a 200 that every anonymous request for `key` gets, trusted like the record it came from."""
        if self.variants.max_bytes and self.records.still_trusted(stamp, image_id):
            expires = stamp.looked_up + self.records.ttl
            self._hits.put(key, RememberedHit(variant_key, headers, expires), group=image_id)

    def answer(self, key: RequestKey) -> tuple[RawHeaders, bytes] | None:
        """(headers, body) of a remembered request whose variant is still in the LRU, or None."""
        hit = self._hits.get(key) if self.records.trusted else None
        if hit is None or hit.expires < time.monotonic():
            return None
        data = self.variants.get(hit.variant_key)
        if data is None:
            return None
        _VARIANT_HIT.inc()
        return hit.headers, data

    def forget(self, image_id: str) -> None:
        self._hits.evict_group(image_id)

    def clear(self) -> None:
        self._hits.clear()
