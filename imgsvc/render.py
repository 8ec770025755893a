"""The render flow in one place: lookup -> authorize -> key -> 304 / cache / single-flight -> fetch -> pipeline.

Everything that decides the response is known before any pixel work: a matching `If-None-Match` needs no
storage or libvips, and a repeated anonymous request for a public LRU variant is `remembered()` whole.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import pyvips
from cachetools import TTLCache

from imgsvc import metrics, pipeline
from imgsvc.auth import Principal, may_view
from imgsvc.cache import ByteLRU, SharedByteLRU, SingleFlight
from imgsvc.catalog import Catalog, DeleteNotice, ImageRecord
from imgsvc.errors import (
    BlobNotFound,
    Forbidden,
    NotFound,
    OriginalUnavailable,
    RenderTimeout,
    Unauthorized,
    Unavailable,
)
from imgsvc.headers import CacheStatus, etag_matches, render_etag, variant_cache_control
from imgsvc.signing import Grant, UrlPolicy
from imgsvc.spec import OutputFormat, ParsedQuery, accept_token, choose_output_format, varies_on_accept
from imgsvc.storage import BlobStore, BlobTooLarge, blob_key
from imgsvc.workers import WorkerPool

log = logging.getLogger("imgsvc.render")
_VARIANT_HIT = metrics.cache_total.labels("variant", "hit")


# A request as the hit index knows it: path, raw query string, Accept reduced to avif / webp / legacy.
RequestKey = tuple[str, bytes, str]


@dataclass(frozen=True, slots=True)
class RememberedHit:
    variant_key: str
    headers: list[tuple[bytes, bytes]]  # the response headers of a 200, but the request id and length
    expires: float  # time.monotonic(): like a cached record, trusted for record_ttl only


@dataclass(frozen=True, slots=True)
class Variant:
    image: ImageRecord
    format: OutputFormat
    etag: str
    vary_accept: bool
    cache_control: str
    data: bytes | None = None  # None: the client's copy is current (304)
    cache_status: CacheStatus | None = None
    expires: int | None = None  # a signed URL's exp
    key: str = ""  # in the variant LRU
    looked_up: float = 0.0  # time.monotonic() of the record lookup
    trust_epoch: int = 0  # Renderer.trust_epoch at the lookup

    @property
    def rememberable(self) -> bool:
        """Whether every anonymous request for the same URL gets these very bytes and headers."""
        return self.public and self.expires is None and self.data is not None

    @property
    def public(self) -> bool:
        return self.image.visibility == "public"

    @property
    def filename(self) -> str:
        return f"{self.image.id}.{'jpg' if self.format == 'jpeg' else self.format}"


class Renderer:
    def __init__(
        self,
        *,
        catalog: Catalog,
        store: BlobStore,
        pool: WorkerPool,
        policy: UrlPolicy,
        limits: pipeline.PipelineLimits,
        variant_cache_bytes: int,
        original_cache_bytes: int,
        decoded_cache_bytes: int = 0,
        record_ttl: float = 30.0,
        remembered_requests: int = 10_000,
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.pool = pool
        self.policy = policy
        self.limits = limits
        self.variants: ByteLRU[str, bytes] = ByteLRU(variant_cache_bytes, len)
        self.originals: ByteLRU[str, bytes] = ByteLRU(original_cache_bytes, len)
        self.decoded: SharedByteLRU[tuple[str, int], pyvips.Image] = SharedByteLRU(
            decoded_cache_bytes, pipeline.decoded_bytes
        )
        self.records: TTLCache[str, ImageRecord] = TTLCache(maxsize=50_000, ttl=record_ttl)
        # Ids deleted here, remembered as long as a record could be cached, so that a lookup which
        # raced the delete cannot put the record back.
        self.deleted: TTLCache[str, bool] = TTLCache(maxsize=50_000, ttl=record_ttl)
        # Blobs whose last live image was deleted, so that a render of them in flight keeps no decoded pixels.
        self.orphaned: TTLCache[str, bool] = TTLCache(maxsize=50_000, ttl=record_ttl)
        # Cached records are only trusted while deletes reach this replica (the delete listener is up).
        self.records_trusted = False
        self.trust_epoch = 0  # bumped whenever records become trusted again (deletes may have been missed)
        self.record_ttl = record_ttl
        # Anonymous requests for public variants, by their exact URL, so a repeat skips parsing, lookup and
        # policy; the bytes stay in (and are bounded by) the variant LRU. Counted in entries.
        self.hits: ByteLRU[RequestKey, RememberedHit] = ByteLRU(remembered_requests, lambda _: 1)
        self._renders: SingleFlight[str, bytes] = SingleFlight()
        self._fetches: SingleFlight[str, bytes] = SingleFlight()
        self.renders_started = 0

    async def lookup(self, image_id: str) -> ImageRecord:
        image = self.records.get(image_id) if self.records_trusted else None
        if image is None:
            if not self.catalog.available and image_id in self.records:  # known down: no wait for its timeout
                return self._outage_record(image_id)
            try:
                image = await self.catalog.get(image_id)
            except Unavailable:
                return self._outage_record(image_id)
            if image is None or image_id in self.deleted:
                self.records.pop(image_id, None)
                raise NotFound(f"no image {image_id!r}")
            if self.records_trusted:
                self.records[image_id] = image
        return image

    def _outage_record(self, image_id: str) -> ImageRecord:
        """While the database is unreachable: the record read less than `record_ttl` ago, else 503.

        No delete can commit here meanwhile; one committed elsewhere whose notification never arrived (just
        before the outage, or across a partition) is served at most until `record_ttl` after that last read.
        """
        image = self.records.get(image_id)
        if image is None or image_id in self.deleted:
            raise Unavailable("the database is unavailable and this image was not read recently; retry later")
        return image

    def forget(self, notice: DeleteNotice) -> None:
        """A delete (here, or on another replica): the image is gone at once; what is cached by content (variants,
        originals, decoded pixels, shared by every image of the same bytes) goes with the blob's last live image."""
        self.deleted[notice.image_id] = True
        record = self.records.pop(notice.image_id, None)
        self.hits.evict_group(notice.image_id)
        sha256 = notice.sha256 or (record.sha256 if record is not None else None)
        if sha256 is not None and notice.blob_orphaned:
            self.orphaned[sha256] = True
            self.variants.evict_group(sha256)
            self.originals.evict_group(sha256)
            self.decoded.evict_group(sha256)

    def trust_records(self, trusted: bool) -> None:
        """Called by the delete listener: when it comes back, deletes may have been missed, so start afresh."""
        if trusted and not self.records_trusted:
            self.records.clear()
            self.hits.clear()
            self.trust_epoch += 1
        self.records_trusted = trusted

    def remember(self, request: RequestKey, variant: Variant, headers: list[tuple[bytes, bytes]]) -> None:
        """Answer the same anonymous request from the variant LRU next time (see `remembered`)."""
        # Trusted like the record it was rendered from: for record_ttl after its lookup, and only if no delete
        # since (deleted ids are remembered that long) and the delete listener has not been down meanwhile.
        expires = variant.looked_up + self.record_ttl
        if not (variant.rememberable and self.variants.max_bytes and self.records_trusted):
            return
        if variant.trust_epoch != self.trust_epoch or expires <= time.monotonic() or variant.image.id in self.deleted:
            return
        self.hits.put(request, RememberedHit(variant.key, headers, expires), group=variant.image.id)

    def remembered(self, request: RequestKey) -> tuple[list[tuple[bytes, bytes]], bytes] | None:
        """(headers, body) of a remembered request whose variant is still in the LRU, or None.

        Only while deletes reach this replica, and for `record_ttl` after the full path last ran.
        """
        hit = self.hits.get(request) if self.records_trusted else None
        if hit is None or hit.expires < time.monotonic():
            return None
        data = self.variants.get(hit.variant_key)
        if data is None:
            return None
        _VARIANT_HIT.inc()
        return hit.headers, data

    async def render(
        self,
        image_id: str,
        query: ParsedQuery,
        *,
        accept: str | None,
        principal: Principal | None,
        if_none_match: str | None,
        charge: Callable[[], None] | None = None,
    ) -> Variant:
        """The variant to answer with; `charge` is called (and may raise RateLimited) only when it must be rendered."""
        grant = self.policy.grant(image_id, query)  # before any I/O: a bad URL costs no database read
        looked_up, trust_epoch = time.monotonic(), self.trust_epoch
        image = await self.lookup(image_id)
        authorize_view(image, principal, grant)
        spec = query.spec
        vary = varies_on_accept(spec)
        fmt = choose_output_format(
            spec.format, accept_token(accept) if vary else "legacy", image.format, image.has_alpha, image.frames > 1
        )  # type: ignore[arg-type]
        etag = render_etag(image.sha256, spec.render_key(), fmt, pipeline.PIPELINE_VERSION)
        public = image.visibility == "public"
        cache_control = variant_cache_control(public=public, expires=grant.expires, now=time.time())
        key = f"{image.sha256}|{spec.render_key()}|{fmt}"
        variant = Variant(
            image, fmt, etag, vary, cache_control, expires=grant.expires, key=key, looked_up=looked_up,
            trust_epoch=trust_epoch,
        )  # fmt: skip
        if etag_matches(if_none_match, etag):
            return variant
        data = self.variants.get(key)
        metrics.cache_total.labels("variant", "miss" if data is None else "hit").inc()
        if data is not None:
            return replace(variant, data=data, cache_status="hit")
        if charge is not None:  # per request, outside the single flight: a 429 never reaches others waiting on it
            charge()

        async def produce() -> bytes:
            with self.pool.admit():  # refuse before reading the original, not after
                fetch_started = time.perf_counter()
                original = await self.fetch_original(image)
                metrics.render_seconds.labels("fetch", fmt).observe(time.perf_counter() - fetch_started)
                self.renders_started += 1
                decoded = pipeline.DecodedSource(self.decoded, image.sha256, image.sha256)
                try:
                    rendered = await self.pool.run(pipeline.render, original, spec, fmt, self.limits, decoded)
                except RenderTimeout:
                    metrics.render_rejections.labels("deadline").inc()
                    raise
                finally:
                    if image.id in self.deleted and image.sha256 in self.orphaned:
                        self.decoded.evict_group(image.sha256)  # the blob's last image went while decoding
            metrics.render_seconds.labels("pixels", fmt).observe(rendered.pixel_seconds)
            metrics.render_seconds.labels("encode", fmt).observe(rendered.encode_seconds)
            if image.id not in self.deleted:  # a live image of these bytes: cached for all of them
                self.variants.put(key, rendered.data, group=image.sha256)
            return rendered.data

        data = await self._renders.run(key, produce)
        return replace(variant, data=data, cache_status="miss")

    async def fetch_original(self, image: ImageRecord) -> bytes:
        data = self.originals.get(image.sha256)
        metrics.cache_total.labels("original", "miss" if data is None else "hit").inc()
        if data is not None:
            return data

        async def produce() -> bytes:
            try:  # the record knows the blob's exact size: nothing larger can be the original
                original = await self.store.get(blob_key(image.sha256), image.bytes)
            except (BlobNotFound, BlobTooLarge) as exc:
                log.error("original of image %s unreadable: %s", image.id, type(exc).__name__)
                raise OriginalUnavailable(f"the original of image {image.id!r} cannot be read") from None
            if image.id not in self.deleted:
                self.originals.put(image.sha256, original, group=image.sha256)
            return original

        data = await self._fetches.run(image.sha256, produce)
        return data


def authorize_view(image: ImageRecord, principal: Principal | None, grant: Grant) -> None:
    """Public images render for anyone; private ones for the owner's token or a signed URL with `exp`."""
    if may_view(principal, image) or (grant.signed and grant.expires is not None):
        return
    if principal is None:
        raise Unauthorized(
            "this image is private: use the owner's token or a signed URL with exp",
            headers={"WWW-Authenticate": 'Bearer realm="imgsvc"'},
        )
    raise Forbidden("this image is private")
