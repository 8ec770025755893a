"""The one place that builds everything: settings -> database, store, pools, caches -> routes and middleware."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from datetime import timedelta

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from imgsvc import endpoints, pipeline
from imgsvc.auth import NoAuth, Verifier
from imgsvc.cache import ByteLRU
from imgsvc.catalog import Catalog
from imgsvc.config import Settings
from imgsvc.console import console_routes
from imgsvc.cors import Cors
from imgsvc.derive import Deriver, DeriveSettings
from imgsvc.embedded import EmbeddedPostgres, supervised
from imgsvc.errors import ImgsvcError, RoutingError
from imgsvc.gc import periodic_collection
from imgsvc.headers import error_cache_control
from imgsvc.hits import HitIndex
from imgsvc.idempotency import IdempotencyKeys
from imgsvc.invalidation import DeleteListener
from imgsvc.middleware import RENDER_PREFIX, RENDER_ROUTE, RequestContext, context_headers
from imgsvc.purge import PurgeSender, RetryPolicy, Target
from imgsvc.ratelimit import RateLimiter
from imgsvc.records import RecordCache
from imgsvc.render import Renderer
from imgsvc.services import Services
from imgsvc.settle import Settler
from imgsvc.signing import Keyring, UnsignedSpace, UrlPolicy
from imgsvc.spec import SpecLimits
from imgsvc.storage import BlobStore, open_store
from imgsvc.storage.s3 import S3Config
from imgsvc.upload import Ingest
from imgsvc.verifiers import IntrospectionConfig, IntrospectionVerifier, JwksConfig, JwksVerifier
from imgsvc.views import ViewCounter, flushing
from imgsvc.workers import WorkerPool

log = logging.getLogger("imgsvc")


def pipeline_limits(settings: Settings) -> pipeline.PipelineLimits:
    return pipeline.PipelineLimits(
        max_pixels=settings.max_pixels,
        max_frames=settings.max_frames,
        timeout_seconds=settings.render_timeout,
        max_output_dim=settings.max_output_dim,
        max_jpeg_scans=settings.max_jpeg_scans,
        max_png_chunks=settings.max_png_chunks,
        max_png_text_bytes=settings.max_png_text_bytes,
        isolate_pixels=settings.isolate_pixels,
    )


def derive_settings(settings: Settings) -> DeriveSettings:
    return DeriveSettings(settings.derive_scales, settings.derive_workers, settings.derive_timeout)


def build_verifier(settings: Settings) -> Verifier:
    if settings.auth == "introspect":
        assert settings.auth_introspect_url is not None  # Settings.check guarantees it
        return IntrospectionVerifier(
            IntrospectionConfig(
                url=settings.auth_introspect_url,
                client_id=settings.auth_client_id,
                client_secret=settings.auth_client_secret,
                audience=settings.auth_audience,
                ttl=settings.auth_cache_ttl,
            )
        )
    if settings.auth == "jwks":
        assert settings.auth_jwks_url and settings.auth_issuer and settings.auth_audience
        return JwksVerifier(
            JwksConfig(
                url=settings.auth_jwks_url,
                issuer=settings.auth_issuer,
                audience=settings.auth_audience,
                algorithms=settings.auth_algorithms,
            )
        )
    return NoAuth()


def url_policy(settings: Settings) -> UrlPolicy:
    space = UnsignedSpace.from_settings(settings)
    return UrlPolicy(Keyring.from_pairs(settings.signing_keys), space, settings.require_signed)


def s3_config(settings: Settings) -> S3Config:
    """Connection settings for an `s3://` store (the URL supplies bucket and prefix)."""
    return S3Config(
        bucket="",
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        access_key_id=settings.s3_access_key_id,
        secret_access_key=settings.s3_secret_access_key,
        path_style=settings.s3_path_style,
        max_attempts=settings.s3_max_attempts,
        connect_timeout=settings.s3_connect_timeout,
        read_timeout=settings.s3_read_timeout,
    )


def purge_targets(settings: Settings) -> list[Target]:
    """The CDN purge APIs every delete is delivered to (the same on every replica)."""
    targets = [Target("webhook", url, secret=settings.purge_webhook_secret or "") for url in settings.purge_webhooks]
    if settings.purge_cloudflare_zone and settings.purge_cloudflare_token:
        targets.append(Target("cloudflare", settings.purge_cloudflare_url, settings.purge_cloudflare_zone,
                              settings.purge_cloudflare_token, settings.purge_cloudflare_prefix))  # fmt: skip
    if settings.purge_fastly_service and settings.purge_fastly_key:
        targets.append(Target("fastly", settings.purge_fastly_url, settings.purge_fastly_service,
                              settings.purge_fastly_key))  # fmt: skip
    targets += [Target("nginx", url, secret=settings.purge_nginx_key or "") for url in settings.purge_nginx]
    return targets


@contextlib.asynccontextmanager
async def open_storage(settings: Settings) -> AsyncIterator[tuple[str, Catalog, BlobStore]]:
    """The catalog (embedded Postgres unless a DSN is set; migrated) and the blob store: (dsn, catalog, store)."""
    async with contextlib.AsyncExitStack() as stack:
        dsn = settings.database_url
        if dsn is None:  # an external database is never started, restarted or stopped by imgsvc
            embedded = EmbeddedPostgres(settings.data_dir)
            dsn = await anyio.to_thread.run_sync(embedded.start)
            stack.push_async_callback(anyio.to_thread.run_sync, embedded.stop)
            await stack.enter_async_context(supervised(embedded))
        catalog = await Catalog.connect(dsn, timeout=settings.database_timeout)
        stack.push_async_callback(catalog.close)
        await catalog.migrate()
        store = await open_store(settings.effective_storage_url, pool=catalog.pool, s3=s3_config(settings))
        stack.push_async_callback(store.close)
        yield dsn, catalog, store


@contextlib.asynccontextmanager
async def build_services(
    settings: Settings, hits: HitIndex, draining: threading.Event, views: ViewCounter | None = None
) -> AsyncIterator[Services]:
    """Start every dependency in order and stop them in reverse, whatever happens in between."""
    version = pipeline.configure_libvips()
    log.info("libvips %s, pipeline %s", version, pipeline.PIPELINE_VERSION)
    async with contextlib.AsyncExitStack() as stack:
        dsn, catalog, store = await stack.enter_async_context(open_storage(settings))
        verifier = build_verifier(settings)
        stack.push_async_callback(verifier.close)
        pool = WorkerPool(settings.workers, settings.render_queue)
        limits = pipeline_limits(settings)
        settler = None
        if settings.encode_settle:
            settler = Settler(pool, settings.encode_settle_queue, settings.encode_settle_bytes)
            settler.start()
            stack.push_async_callback(settler.stop)
        renderer = Renderer(
            catalog=catalog,
            store=store,
            pool=pool,
            policy=url_policy(settings),
            limits=limits,
            records=hits.records,
            hits=hits,
            original_cache_bytes=settings.originals_cache_bytes,
            decoded_cache_bytes=settings.decoded_cache_bytes,
            level_scales=settings.derive_scales,
            settler=settler,
        )
        listener = DeleteListener(dsn, renderer.forget, renderer.trust_records)
        await listener.start()
        stack.push_async_callback(listener.stop)
        retry = RetryPolicy(settings.purge_retry_base, settings.purge_retry_max)
        sender = PurgeSender(dsn, catalog.pool, purge_targets(settings), retry, settings.purge_timeout)
        await sender.start()
        stack.push_async_callback(sender.stop)
        # The caches outlive this lifespan (built in create_app): once it ends, deletes are no longer heard.
        stack.callback(renderer.trust_records, False)
        grace = timedelta(days=settings.gc_grace_days)
        keep = timedelta(days=settings.purge_keep_days)
        await stack.enter_async_context(periodic_collection(catalog, store, grace, settings.gc_interval, keep))
        deriver = await stack.enter_async_context(
            Deriver(catalog.pool, store, derive_settings(settings), pool).running()
        )
        if views is not None:  # the last flush runs at shutdown, before the pool closes
            await stack.enter_async_context(flushing(views, catalog.pool, settings.views_flush_interval))
        yield Services(
            settings=settings,
            catalog=catalog,
            store=store,
            verifier=verifier,
            renderer=renderer,
            hits=hits,
            ingest=Ingest(catalog, store, pool, limits, IdempotencyKeys(catalog.pool), deriver.wake),
            spec_limits=SpecLimits(max_output_dim=settings.max_output_dim, presets=settings.presets),
            upload_limiter=RateLimiter(settings.upload_rate),
            render_limiter=RateLimiter(settings.render_rate, settings.render_burst, what="render misses"),
            draining=draining,
        )


async def handle_error(request: Request, exc: Exception) -> Response:
    render_route = request.url.path.startswith(RENDER_PREFIX)
    if isinstance(exc, ImgsvcError):
        error = exc
    elif isinstance(exc, HTTPException):
        error = RoutingError(exc.status_code, exc.detail, exc.headers)
    else:  # a bug: uvicorn logs the traceback; the client gets a problem without one
        error = ImgsvcError("the server failed to handle this request")
    headers = {**error.headers, "Cache-Control": error_cache_control(error.status, render_route=render_route)}
    response = JSONResponse(error.problem(), error.status, headers=headers, media_type="application/problem+json")
    if not isinstance(exc, (ImgsvcError, HTTPException)):  # sent from outside every middleware: add its context
        state = request.scope.get("state", {})
        response.raw_headers += context_headers(str(state.get("request_id", ""))) + state.get("cors_headers", [])
    return response


def create_app(settings: Settings | None = None, *, draining: threading.Event | None = None) -> Starlette:
    """The application; its services start with the lifespan and reach handlers as `request.state.services`.
    `draining`, set by the server's signal handler, turns `/readyz` 503."""
    settings = settings or Settings.from_env()
    # Built here, before the lifespan, as the outermost middleware answers from the hit index.
    variants: ByteLRU[str, bytes] = ByteLRU(settings.cache_bytes, len)
    hits = HitIndex(RecordCache(settings.record_ttl), variants)
    views = ViewCounter(settings.views_max_pending) if settings.views else None  # counted by RequestContext
    draining = draining or threading.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Services]]:
        async with build_services(settings, hits, draining, views) as svc:
            log.info("imgsvc ready on %s", settings.effective_public_url)
            yield {"services": svc}
            draining.set()

    routes = [
        Route("/images", endpoints.upload_image, methods=["POST"]),
        Route("/images", endpoints.list_images, methods=["GET"]),
        Route("/images/{id}", endpoints.get_image, methods=["GET"]),
        Route("/images/{id}", endpoints.delete_image, methods=["DELETE"]),
        Route("/images/{id}/original", endpoints.get_original, methods=["GET"]),
        Route("/images/{id}/views", endpoints.get_views, methods=["GET"]),
        Route(RENDER_ROUTE, endpoints.render_image, methods=["GET", "HEAD"]),
        Route("/livez", endpoints.livez, methods=["GET"]),
        Route("/readyz", endpoints.readyz, methods=["GET"]),
        Route("/metrics", endpoints.metrics_text, methods=["GET"]),
        Route("/openapi.json", endpoints.openapi_json, methods=["GET"]),
        *(console_routes() if settings.console else []),
    ]
    # Starlette's stack: its 500 handler, then RequestContext, the outermost of ours: a remembered hit is
    # answered there before exception handling, routing, authentication or parsing; then CORS of the API
    # (preflights answered, error answers included); then the error handlers.
    middleware = [Middleware(RequestContext, hits=hits, access_log=settings.access_log, views=views)]
    if settings.cors_origins:
        middleware.append(Middleware(Cors, origins=settings.cors_origins, on_refused=handle_error))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={Exception: handle_error, HTTPException: handle_error, ImgsvcError: handle_error},
    )
    return app
