"""The render flow in one place: grant -> lookup -> negotiate -> cache -> produce (single-flight, pool, pipeline).

Everything that decides the response is known before any pixel work: a matching `If-None-Match` needs no
storage or libvips. With a `Settler`, a miss is first answered with a fast encode, settled later (see `provisional`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import pyvips

from imgsvc import derivations, encoding, metrics, pipeline, pyramid
from imgsvc.auth import Principal, may_view
from imgsvc.cache import ByteLRU, SharedByteLRU, SingleFlight
from imgsvc.catalog import Catalog, DeleteNotice, ImageRecord
from imgsvc.client_hints import NO_HINTS, ClientHints, resolve_hints, save_data_quality
from imgsvc.config import DEFAULT_WIDTHS
from imgsvc.derivations import Source
from imgsvc.errors import (
    BlobNotFound,
    Forbidden,
    ImgsvcError,
    OriginalUnavailable,
    RenderTimeout,
    Unauthorized,
    UndecodableImage,
)
from imgsvc.headers import etag_matches, render_etag
from imgsvc.hits import HitIndex
from imgsvc.records import RecordCache, RecordStamp
from imgsvc.settle import Settler
from imgsvc.signing import Grant, UrlPolicy
from imgsvc.spec import OutputFormat, ParsedQuery, TransformSpec, accept_token, choose_output_format, varies_on_accept
from imgsvc.storage import BlobStore, BlobTooLarge, blob_key
from imgsvc.workers import WorkerPool

log = logging.getLogger("imgsvc.render")

Outcome = Literal["not-modified", "hit", "miss"]  # the client's copy is current / from the variant LRU / rendered


@dataclass(frozen=True, slots=True)
class RenderResult:
    """What a render request is answered with; `data` is empty when the outcome is not-modified."""

    image: ImageRecord
    format: OutputFormat
    etag: str
    vary_accept: bool
    expires: int | None  # a signed URL's exp, which bounds every cache
    variant_key: str  # in the variant LRU
    stamp: RecordStamp  # when the record was read: what it rendered is trusted no longer
    spec: TransformSpec  # what is rendered: the URL's, or what its client hints made of it
    vary_hints: tuple[str, ...] = ()  # the client-hint headers the answer depends on (`w=auto`, `dpr=auto`)
    outcome: Outcome = "not-modified"
    data: bytes = b""
    settled: bool = True  # False: a fast first encode, cached briefly (headers.PROVISIONAL_MAX_AGE)

    @property
    def not_modified(self) -> bool:
        return self.outcome == "not-modified"

    @property
    def public(self) -> bool:
        return self.image.visibility == "public"

    @property
    def image_id(self) -> str:
        return self.image.id

    @property
    def rememberable(self) -> bool:
        """Whether every anonymous request for the same URL gets these very bytes and headers (a fast version is
        not remembered: each request for it goes through `Renderer.render`, which offers it to settle again)."""
        return self.public and self.expires is None and not self.not_modified and not self.vary_hints and self.settled

    @property
    def filename(self) -> str:
        return f"{self.image.id}.{'jpg' if self.format == 'jpeg' else self.format}"


class Renderer:
    """Turns (image id, parsed query, request headers) into a `RenderResult`: checks the URL's grant, looks the
    record up, authorizes, negotiates the format and ETag, then answers from the variant LRU or renders once
    (single-flight) in the worker pool. It also drops what a delete or a listener outage makes untrustworthy."""

    def __init__(
        self,
        *,
        catalog: Catalog,
        store: BlobStore,
        pool: WorkerPool,
        policy: UrlPolicy,
        limits: pipeline.PipelineLimits,
        records: RecordCache,
        hits: HitIndex,
        original_cache_bytes: int,
        decoded_cache_bytes: int = 0,
        level_scales: tuple[int, ...] = (),
        settler: Settler | None = None,
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.pool = pool
        self.policy = policy
        self.limits = limits
        self.records = records
        self.hits = hits
        self.level_scales = level_scales  # the pyramid's levels (imgsvc.pyramid); empty: every render from the original
        self.variants = hits.variants
        self.originals: ByteLRU[str, bytes] = ByteLRU(original_cache_bytes, len)
        sizes = policy.unsigned.sizes if policy.unsigned is not None else None
        self.hint_widths = tuple(sorted(sizes)) if sizes else DEFAULT_WIDTHS  # what w=auto snaps up to
        self.decoded: SharedByteLRU[tuple[str, int], pyvips.Image] = SharedByteLRU(
            decoded_cache_bytes, pipeline.decoded_bytes
        )
        self.settler = settler
        # Variants settled here, so that a miss for one (its bytes evicted) renders it settled at once.
        self.settled: ByteLRU[str, bool] = ByteLRU(50_000 if settler is not None else 0, lambda _: 1)
        self._renders: SingleFlight[str, tuple[bytes, bool]] = SingleFlight()
        self._fetches: SingleFlight[str, bytes] = SingleFlight()

    def forget(self, notice: DeleteNotice) -> None:
        """A delete (here, or on another replica): the image is gone at once; what is cached by content (variants,
        originals, decoded pixels, shared by every image of the same bytes) goes with the blob's last live image."""
        sha256 = self.records.forget(notice)
        self.hits.forget(notice.image_id)
        if sha256 is not None:
            self.variants.evict_group(sha256)
            self.originals.evict_group(sha256)
            self.decoded.evict_group(sha256)
            self.settled.evict_group(sha256)

    def trust_records(self, trusted: bool) -> None:
        """Called by the delete listener: when it comes back, deletes may have been missed, so start afresh."""
        if self.records.trust(trusted):
            self.hits.clear()

    async def render(
        self,
        image_id: str,
        query: ParsedQuery,
        *,
        accept: str | None,
        principal: Principal | None,
        if_none_match: str | None,
        charge: Callable[[], None] | None = None,
        hints: ClientHints = NO_HINTS,
    ) -> RenderResult:
        """The answer; `charge` is called (and may raise RateLimited) only when the variant must be rendered."""
        grant = self.policy.grant(image_id, query)  # before any I/O: a bad URL costs no database read
        stamp = self.records.stamp()
        image = await self.records.lookup(self.catalog, image_id)
        authorize_view(image, principal, grant)
        spec, used = resolve_hints(query.spec, hints, self.hint_widths, image.width, self.limits.max_output_dim)
        result = negotiate(image, spec, accept, grant, stamp, used, hints.save_data)
        settling = self.settler is not None and encoding.may_settle(result.format, image.frames)
        if settling:  # the settled bytes may differ from a miss's one encode with settling off: so does the ETag
            etag = variant_etag(image, result.spec, result.format, encoding.settled_tag(result.format))
            result = replace(result, etag=etag)
        if etag_matches(if_none_match, result.etag):
            return result
        data = self.variants.get(result.variant_key)
        fast = self._provisional(image, result.spec, result) if settling and data is None else None
        if fast is not None:  # the fast version is current: it answers until the settled one exists
            if etag_matches(if_none_match, fast.etag):
                self._offer(image, result.spec, result, None)
                return fast
            data = self.variants.get(fast.variant_key)
            if data is not None:
                self._offer(image, result.spec, result, None)
                metrics.cache_total.labels("variant", "hit").inc()
                return replace(fast, outcome="hit", data=data)
        metrics.cache_total.labels("variant", "miss" if data is None else "hit").inc()
        if data is not None:
            return replace(result, outcome="hit", data=data)
        if charge is not None:  # per request, outside the single flight: a 429 never reaches others waiting on it
            charge()
        target = fast or result
        data, final = await self._renders.run(target.variant_key, lambda: self._produce(image, result.spec, target))
        return replace(result if final else target, outcome="miss", data=data)

    def _provisional(self, image: ImageRecord, spec: TransformSpec, result: RenderResult) -> RenderResult | None:
        """The fast version of `result` while it is not settled here, or None.

        Its own ETag and LRU key: a client or cache holding it revalidates and gets the settled bytes."""
        if self.settled.get(result.variant_key):
            return None
        etag = variant_etag(image, spec, result.format, "|fast")
        return replace(result, etag=etag, variant_key=result.variant_key + "|fast", settled=False)

    def _offer(
        self, image: ImageRecord, spec: TransformSpec, result: RenderResult, pixels: encoding.Pixels | None
    ) -> None:
        """Queue the settled encode of `result` (from `pixels`, else rendered again); dropped when busy."""
        settler, key, fmt = self.settler, result.variant_key, result.format
        assert settler is not None

        async def settle() -> None:
            if pixels is not None:
                data = await settler.run(pixels.encode, "settled")
            else:
                original = await self.fetch_original(image)
                decoded = pipeline.DecodedSource(self.decoded, image.sha256, image.sha256)
                # From the original (the variant's ETag is the same from a level, README: Pyramid).
                args = (original, spec, fmt, self.limits, decoded, None, "settled")
                rendered = await settler.run(pipeline.render, *args)
                data = rendered.data
            if image.id not in self.records.deleted:
                self.variants.put(key, data, group=image.sha256)
                self.settled.put(key, True, group=image.sha256)
                self.variants.pop(key + "|fast")

        settler.offer(key, settle, pixels.nbytes if pixels is not None else 0)

    async def _produce(self, image: ImageRecord, spec: TransformSpec, result: RenderResult) -> tuple[bytes, bool]:
        """Render `result` (fast when it is not settled): its bytes and whether they are final."""
        fmt, fast = result.format, not result.settled
        with self.pool.admit():  # refuse before reading the original, not after
            try:
                effort: encoding.Effort = "fast" if fast else "settled" if self.settler is not None else "default"
                rendered = await self._render_level(image, spec, fmt, effort, fast)
                if rendered is None:
                    rendered = await self._render_original(image, spec, fmt, effort, fast)
            except RenderTimeout:
                metrics.render_rejections.labels("deadline").inc()
                raise
            finally:
                if self.records.orphaned_by_delete(image):
                    self.decoded.evict_group(image.sha256)  # the blob's last image went while decoding
        metrics.render_seconds.labels("pixels", fmt).observe(rendered.pixel_seconds)
        metrics.render_seconds.labels("encode", fmt).observe(rendered.encode_seconds)
        if image.id not in self.records.deleted:  # a live image of these bytes: cached for all of them
            key = result.variant_key.removesuffix("|fast")
            if rendered.final:
                self.variants.put(key, rendered.data, group=image.sha256)
                if self.settler is not None:
                    self.settled.put(key, True, group=image.sha256)
            else:
                self.variants.put(result.variant_key, rendered.data, group=image.sha256)
                metrics.settles_total.labels("fast").inc()
                self._offer(image, spec, replace(result, variant_key=key), rendered.pixels)
        return rendered.data, rendered.final

    async def _render_original(
        self, image: ImageRecord, spec: TransformSpec, fmt: OutputFormat, effort: encoding.Effort, keep_pixels: bool
    ) -> pipeline.Rendered:
        fetch_started = time.perf_counter()
        original = await self.fetch_original(image)
        metrics.render_seconds.labels("fetch", fmt).observe(time.perf_counter() - fetch_started)
        decoded = pipeline.DecodedSource(self.decoded, image.sha256, image.sha256)
        args = (original, spec, fmt, self.limits, decoded, None, effort, keep_pixels)
        rendered = await self.pool.run(pipeline.render, *args)
        metrics.render_sources.labels("original").inc()
        return rendered

    async def _render_level(
        self, image: ImageRecord, spec: TransformSpec, fmt: OutputFormat, effort: encoding.Effort, keep_pixels: bool
    ) -> pipeline.Rendered | None:
        """From the smallest pyramid level that serves this render; None (start from the original) when there is
        none, or it is not stored yet, or it is unusable: a level is never the reason a render fails."""
        source = Source(image.sha256, image.format, image.width, image.height, image.bytes, image.frames,
                        image.has_alpha)  # fmt: skip
        levels = pyramid.levels_for(source, self.level_scales)
        level = pyramid.choose(levels, image.width, image.height, spec, fmt, image.frames > 1, self.limits)
        if level is None:
            return None
        key = level.key(image.sha256)
        try:
            fetch_started = time.perf_counter()
            data = await self._fetch(key, image.bytes, image)
            metrics.render_seconds.labels("fetch", fmt).observe(time.perf_counter() - fetch_started)
            decoded = pipeline.DecodedSource(self.decoded, key, image.sha256)
            size = (image.width, image.height)
            args = (data, level, spec, fmt, self.limits, decoded, size, effort, keep_pixels)
            rendered = await self.pool.run(pyramid.render_level, *args)
        except (BlobNotFound, BlobTooLarge):
            return None  # not derived yet (or gone with an outage of the store): the original is the source
        except RenderTimeout:
            raise
        except ImgsvcError as exc:  # corrupt or foreign bytes under the level's key, or the store failing
            log.warning("level %s of image %s unusable (%s); rendering from the original", key, image.id, exc)
            self.originals.evict_group(image.sha256)
            metrics.render_sources.labels("fallback").inc()
            if isinstance(exc, UndecodableImage):  # damaged: removed, and the blob derived again
                with contextlib.suppress(ImgsvcError):
                    await self.store.delete(key)
                    await derivations.enqueue(self.catalog.pool, image.sha256, new_blob=True)
            return None
        metrics.render_sources.labels("level").inc()
        return rendered

    async def fetch_original(self, image: ImageRecord) -> bytes:
        try:  # the record knows the blob's exact size: nothing larger can be the original
            return await self._fetch(blob_key(image.sha256), image.bytes, image)
        except (BlobNotFound, BlobTooLarge) as exc:
            log.error("original of image %s unreadable: %s", image.id, type(exc).__name__)
            raise OriginalUnavailable(f"the original of image {image.id!r} cannot be read") from None

    async def _fetch(self, key: str, max_bytes: int, image: ImageRecord) -> bytes:
        """A blob (an original, or a level no larger than it) through the originals' LRU and one fetch at a time."""
        data = self.originals.get(key)
        metrics.cache_total.labels("original", "miss" if data is None else "hit").inc()
        if data is not None:
            return data

        async def produce() -> bytes:
            blob = await self.store.get(key, max_bytes)
            if image.id not in self.records.deleted:
                self.originals.put(key, blob, group=image.sha256)
            return blob

        return await self._fetches.run(key, produce)


def negotiate(
    image: ImageRecord,
    spec: TransformSpec,
    accept: str | None,
    grant: Grant,
    stamp: RecordStamp,
    hints_used: tuple[str, ...] = (),
    save_data: bool = False,
) -> RenderResult:
    """Output format, ETag and variant key, all known before any pixel work (outcome: not-modified).
    `Save-Data: on` lowers the quality only of URLs that opted in to client hints (`hints_used`)."""
    vary = varies_on_accept(spec)
    token = accept_token(accept) if vary else "legacy"
    fmt = choose_output_format(spec.format, token, image.format, image.has_alpha, image.frames > 1)  # type: ignore[arg-type]
    if hints_used and save_data:
        spec = save_data_quality(spec, fmt)
    key = f"{image.sha256}|{spec.render_key()}|{fmt}"
    etag = variant_etag(image, spec, fmt)
    return RenderResult(image, fmt, etag, vary, grant.expires, key, stamp, spec, hints_used)


def variant_etag(image: ImageRecord, spec: TransformSpec, fmt: OutputFormat, tag: str = "") -> str:
    """The ETag of a variant's bytes; `tag` names encoder settings other than the default ones."""
    return render_etag(image.sha256, spec.render_key(), fmt, pipeline.PIPELINE_VERSION + tag)


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
