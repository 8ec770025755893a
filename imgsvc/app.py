"""The one place that builds everything: settings -> database, store, pools, caches -> routes and middleware."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from imgsvc import endpoints, pipeline
from imgsvc.auth import NoAuth, Verifier
from imgsvc.catalog import Catalog
from imgsvc.config import Settings
from imgsvc.embedded import EmbeddedPostgres, supervised
from imgsvc.errors import ImgsvcError, RoutingError
from imgsvc.gc import periodic_collection
from imgsvc.headers import error_cache_control
from imgsvc.idempotency import IdempotencyKeys
from imgsvc.invalidation import DeleteListener
from imgsvc.middleware import RequestContext
from imgsvc.ratelimit import RateLimiter
from imgsvc.render import Renderer
from imgsvc.services import Services
from imgsvc.signing import Keyring, UnsignedSpace, UrlPolicy
from imgsvc.spec import SpecLimits
from imgsvc.storage import BlobStore, open_store
from imgsvc.storage.s3 import S3Config
from imgsvc.upload import Ingest
from imgsvc.verifiers import IntrospectionConfig, IntrospectionVerifier, JwksConfig, JwksVerifier
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
async def build_services(settings: Settings) -> AsyncIterator[Services]:
    """Start every dependency in order and stop them in reverse, whatever happens in between."""
    version = pipeline.configure_libvips()
    log.info("libvips %s, pipeline %s", version, pipeline.PIPELINE_VERSION)
    async with contextlib.AsyncExitStack() as stack:
        dsn, catalog, store = await stack.enter_async_context(open_storage(settings))
        verifier = build_verifier(settings)
        stack.push_async_callback(verifier.close)
        pool = WorkerPool(settings.workers, settings.render_queue)
        limits = pipeline_limits(settings)
        renderer = Renderer(
            catalog=catalog,
            store=store,
            pool=pool,
            policy=url_policy(settings),
            limits=limits,
            variant_cache_bytes=settings.cache_bytes,
            original_cache_bytes=settings.originals_cache_bytes,
            decoded_cache_bytes=settings.decoded_cache_bytes,
            record_ttl=settings.record_ttl,
        )
        listener = DeleteListener(dsn, renderer.forget, renderer.trust_records)
        await listener.start()
        stack.push_async_callback(listener.stop)
        grace = timedelta(days=settings.gc_grace_days)
        await stack.enter_async_context(periodic_collection(catalog, store, grace, settings.gc_interval))
        yield Services(
            settings=settings,
            catalog=catalog,
            store=store,
            verifier=verifier,
            renderer=renderer,
            ingest=Ingest(catalog, store, pool, limits, IdempotencyKeys(catalog.pool)),
            spec_limits=SpecLimits(max_output_dim=settings.max_output_dim, presets=settings.presets),
            upload_limiter=RateLimiter(settings.upload_rate),
            render_limiter=RateLimiter(settings.render_rate, settings.render_burst, what="render misses"),
            listener=listener,
        )


async def handle_error(request: Request, exc: Exception) -> Response:
    render_route = request.url.path.startswith("/img/")
    if isinstance(exc, ImgsvcError):
        error = exc
    elif isinstance(exc, HTTPException):
        error = RoutingError(exc.status_code, exc.detail, exc.headers)
    else:  # a bug: uvicorn logs the traceback; the client gets a problem without one
        error = ImgsvcError("the server failed to handle this request")
    headers = {**error.headers, "Cache-Control": error_cache_control(error.status, render_route=render_route)}
    # A 500 is sent from outside every middleware, so it gets the request context here.
    headers.update({"X-Content-Type-Options": "nosniff", "X-Request-ID": _request_id(request)})
    return JSONResponse(error.problem(), error.status, headers=headers, media_type="application/problem+json")


def _request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with build_services(settings) as svc:
            app.state.services = svc
            log.info("imgsvc ready on %s", settings.effective_public_url)
            yield
            svc.draining = True

    routes = [
        Route("/images", endpoints.upload_image, methods=["POST"]),
        Route("/images", endpoints.list_images, methods=["GET"]),
        Route("/images/{id}", endpoints.get_image, methods=["GET"]),
        Route("/images/{id}", endpoints.delete_image, methods=["DELETE"]),
        Route("/images/{id}/original", endpoints.get_original, methods=["GET"]),
        Route("/img/{id}", endpoints.render_image, methods=["GET", "HEAD"]),
        Route("/livez", endpoints.livez, methods=["GET"]),
        Route("/readyz", endpoints.readyz, methods=["GET"]),
        Route("/metrics", endpoints.metrics_text, methods=["GET"]),
        Route("/openapi.json", endpoints.openapi_json, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={Exception: handle_error, HTTPException: handle_error, ImgsvcError: handle_error},
    )
    app.add_middleware(RequestContext, access_log=settings.access_log)
    return app
