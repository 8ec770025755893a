"""The render flow in one place: lookup -> authorize -> key -> 304 / cache / single-flight -> fetch -> pipeline.

Everything that decides the response bytes is known before any pixel work, so a
matching `If-None-Match` is answered without touching storage or libvips.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

from cachetools import TTLCache

from imgsvc import metrics, pipeline
from imgsvc.auth import Principal, may_view
from imgsvc.cache import ByteLRU, SingleFlight
from imgsvc.catalog import Catalog, ImageRecord
from imgsvc.errors import BlobNotFound, Forbidden, NotFound, OriginalUnavailable, RenderTimeout, Unauthorized
from imgsvc.headers import CacheStatus, etag_matches, render_etag, variant_cache_control
from imgsvc.signing import Grant, UrlPolicy
from imgsvc.spec import OutputFormat, ParsedQuery, accept_token, choose_output_format, varies_on_accept
from imgsvc.storage import BlobStore, BlobTooLarge, blob_key
from imgsvc.workers import WorkerPool

log = logging.getLogger("imgsvc.render")


@dataclass(frozen=True, slots=True)
class Variant:
    image: ImageRecord
    format: OutputFormat
    etag: str
    vary_accept: bool
    cache_control: str
    data: bytes | None = None  # None: the client's copy is current (304)
    cache_status: CacheStatus | None = None

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
        record_ttl: float = 30.0,
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.pool = pool
        self.policy = policy
        self.limits = limits
        self.variants: ByteLRU[str, bytes] = ByteLRU(variant_cache_bytes, len)
        self.originals: ByteLRU[str, bytes] = ByteLRU(original_cache_bytes, len)
        self.records: TTLCache[str, ImageRecord] = TTLCache(maxsize=50_000, ttl=record_ttl)
        # Ids deleted here, remembered as long as a record could be cached, so that a lookup which
        # raced the delete cannot put the record back.
        self.deleted: TTLCache[str, bool] = TTLCache(maxsize=50_000, ttl=record_ttl)
        # Cached records are only trusted while deletes reach this replica (the delete listener is up).
        self.records_trusted = False
        self._renders: SingleFlight[str, bytes] = SingleFlight()
        self._fetches: SingleFlight[str, bytes] = SingleFlight()
        self.renders_started = 0

    async def lookup(self, image_id: str) -> ImageRecord:
        image = self.records.get(image_id) if self.records_trusted else None
        if image is None:
            image = await self.catalog.get(image_id)
            if image is None or image_id in self.deleted:
                raise NotFound(f"no image {image_id!r}")
            if self.records_trusted:
                self.records[image_id] = image
        return image

    def forget(self, image_id: str) -> None:
        """Evict everything held for a deleted image (deleted here, or on another replica)."""
        self.deleted[image_id] = True
        self.records.pop(image_id, None)
        self.variants.evict_group(image_id)
        self.originals.evict_group(image_id)

    def trust_records(self, trusted: bool) -> None:
        """Called by the delete listener: when it comes back, deletes may have been missed, so start afresh."""
        if trusted and not self.records_trusted:
            self.records.clear()
        self.records_trusted = trusted

    async def render(
        self,
        image_id: str,
        query: ParsedQuery,
        *,
        accept: str | None,
        principal: Principal | None,
        if_none_match: str | None,
    ) -> Variant:
        grant = self.policy.grant(image_id, query)  # before any I/O: a bad URL costs no database read
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
        variant = Variant(image, fmt, etag, vary, cache_control)
        if etag_matches(if_none_match, etag):
            return variant
        key = f"{image.sha256}|{spec.render_key()}|{fmt}"
        data = self.variants.get(key)
        metrics.cache_total.labels("variant", "miss" if data is None else "hit").inc()
        if data is not None:
            return replace(variant, data=data, cache_status="hit")

        async def produce() -> bytes:
            with self.pool.admit():  # refuse before reading the original, not after
                fetch_started = time.perf_counter()
                original = await self.fetch_original(image)
                metrics.render_seconds.labels("fetch", fmt).observe(time.perf_counter() - fetch_started)
                self.renders_started += 1
                try:
                    rendered = await self.pool.run(pipeline.render, original, spec, fmt, self.limits)
                except RenderTimeout:
                    metrics.render_rejections.labels("deadline").inc()
                    raise
            metrics.render_seconds.labels("pixels", fmt).observe(rendered.pixel_seconds)
            metrics.render_seconds.labels("encode", fmt).observe(rendered.encode_seconds)
            if image.id not in self.deleted:
                self.variants.put(key, rendered.data, group=image.id)
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
            self.originals.put(image.sha256, original, group=image.id)
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
