"""The `imgsvc` command: serve, migrate, config --check, sign, gc, import, purge, derive, views, healthcheck."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

import asyncpg

from imgsvc import logs
from imgsvc.config import ConfigError, Settings
from imgsvc.errors import ImgsvcError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imgsvc", description="imgsvc: store originals once, render any variant.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser(
        "serve", help="run the HTTP service (embedded Postgres unless IMGSVC_DATABASE_URL is set)"
    )
    serve_cmd.add_argument("--reuse-port", action="store_true",
                           help="bind the port with SO_REUSEPORT, sharing it with other imgsvc processes")  # fmt: skip
    commands.add_parser("migrate", help="apply pending database migrations and exit")
    config = commands.add_parser("config", help="show the effective settings")
    config.add_argument("--check", action="store_true", help="validate every setting; exit 1 on any error")
    sign = commands.add_parser("sign", help="print a signed render URL (uses IMGSVC_SIGNING_KEYS and IMGSVC_PRESETS)")
    sign.add_argument("image_id")
    sign.add_argument("query", nargs="?", default="", help="render query, e.g. 'w=256&fmt=webp'")
    sign.add_argument("--expires-in", type=int, metavar="SECONDS", help="add exp, now + SECONDS")
    sign.add_argument("--base-url", help="default: IMGSVC_PUBLIC_URL or http://host:port")
    gc = commands.add_parser("gc", help="remove blobs no live image has referenced for longer than the grace period")
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    gc.add_argument("--grace-days", type=float, help="override IMGSVC_GC_GRACE_DAYS")
    importer = commands.add_parser("import", help="bulk-import a folder tree, or the image column of a SQL table")
    importer.add_argument("paths", nargs="*", type=Path, help="files or folders to import")
    importer.add_argument("--owner", default="anonymous", help="owner of folder imports (default: anonymous)")
    importer.add_argument("--category", default="", help="category of every imported image")
    importer.add_argument("--visibility", default="public", choices=["public", "private"])
    importer.add_argument("--sql", help="a query returning the columns id, owner, data (bytea or base64 text)")
    importer.add_argument("--dsn", help="the database the --sql query runs against")
    importer.add_argument("--mapping", type=Path, help="write old id,new id,status CSV here (default: stdout)")
    purge = commands.add_parser("purge", help="CDN purge outbox: list undelivered purges, or re-send one image's")
    purge.add_argument("image_id", nargs="?", help="queue the purge of this image again for every target")
    purge.add_argument("--pending", action="store_true", help="list undelivered purges with attempts and last error")
    derive = commands.add_parser("derive", help="derive queued pyramid levels and placeholders now, in this process")
    derive.add_argument("--backfill", action="store_true", help="first queue every live image not derived yet")
    derive.add_argument("--retry-failed", action="store_true", help="queue the derivations that failed again")
    views = commands.add_parser("views", help="view counts kept outside imgsvc")
    ingest = views.add_subparsers(dest="views_command", required=True).add_parser(
        "ingest", help="count the views a cache in front answered itself (nginx's hits), from its JSON access log"
    )
    ingest.add_argument("log", type=Path, help="the access log (nginx's imgsvc_json format, or the minimal one)")
    mode = ingest.add_mutually_exclusive_group(required=True)
    mode.add_argument("--once", action="store_true", help="read to the end of the log, commit, exit")
    mode.add_argument("--follow", action="store_true", help="keep reading as the log grows (until SIGTERM)")
    ingest.add_argument("--source", help="name of the saved offset (default: the log's absolute path)")
    ingest.add_argument("--interval", type=float, default=1.0, help="seconds between reads with --follow")
    health = commands.add_parser("healthcheck", help="exit 0 if the local service's /readyz answers 200 (containers)")
    health.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.command == "config":
            return show_config(settings)
        if args.command == "healthcheck":
            return healthcheck(settings, args.timeout)
        if args.command == "sign":
            return print_signed_url(settings, args.image_id, args.query, args.expires_in, args.base_url)
        if args.command == "serve":
            from imgsvc.server import tune_malloc

            tune_malloc()  # before any thread starts, the log writer's included
        logs.configure(settings.log_level, settings.log_format)
        if args.command == "migrate":
            return asyncio.run(migrate(settings))
        if args.command == "import":
            if bool(args.sql) == bool(args.paths) or bool(args.sql) != bool(args.dsn):
                parser.error("import takes PATH... or --sql with --dsn")
            try:
                return asyncio.run(import_images(settings, args))
            except asyncpg.PostgresError as exc:
                print(f"imgsvc: the --sql query failed: {exc}", file=sys.stderr)
                return 2
        if args.command == "purge":
            if bool(args.pending) == bool(args.image_id):
                parser.error("purge takes --pending or an image id")
            return asyncio.run(purge_command(settings, args.image_id))
        if args.command == "derive":
            return asyncio.run(derive_command(settings, args.backfill, args.retry_failed))
        if args.command == "views":
            try:
                return asyncio.run(ingest_views(settings, args.log, args.source, args.follow, args.interval))
            except OSError as exc:  # --once: the log cannot be read (--follow waits for it)
                print(f"imgsvc: {args.log}: {exc.strerror or exc}", file=sys.stderr)
                return 1
        if args.command == "gc":
            grace = args.grace_days if args.grace_days is not None else settings.gc_grace_days
            return asyncio.run(collect(settings, grace, args.dry_run))
        if settings.processes > 1 and not args.reuse_port:
            return serve_processes(settings)
        return serve(settings, args.reuse_port)
    except ConfigError as exc:
        print(f"imgsvc: {exc}", file=sys.stderr)
        return 2
    except ImgsvcError as exc:  # the database or the blob store is unavailable (migrate, gc, import)
        print(f"imgsvc: {exc.detail}", file=sys.stderr)
        return 1


def healthcheck(settings: Settings, timeout: float) -> int:
    """Ask the service on this host for /readyz; stdlib only, so it starts fast in a container."""
    import urllib.error
    import urllib.request

    host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else "[::1]" if settings.host == "::" else settings.host
    url = f"http://{host if ':' not in host or host.startswith('[') else f'[{host}]'}:{settings.port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            ready = response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"imgsvc: not ready: {exc}", file=sys.stderr)
        return 1
    print("ready" if ready else "not ready")
    return 0 if ready else 1


def show_config(settings: Settings) -> int:
    rows = settings.describe()
    width = max(len(name) for _, name, _, _ in rows)
    shown = None
    for group, name, value, help_text in rows:
        if group != shown:
            print(("\n" if shown else "") + f"[{group}]")
            shown = group
        print(f"{name:<{width}}  {value}\n{'':<{width}}  # {help_text}")
    return 0


def print_signed_url(settings: Settings, image_id: str, query: str, expires_in: int | None, base: str | None) -> int:
    from urllib.parse import parse_qsl

    from imgsvc.client import RenderUrls
    from imgsvc.errors import InvalidParameter

    if not settings.signing_keys:
        print("imgsvc: IMGSVC_SIGNING_KEYS is not set", file=sys.stderr)
        return 2
    urls = RenderUrls.from_settings(settings, base)
    try:
        print(urls.url(image_id, expires_in=expires_in, **dict(parse_qsl(query, keep_blank_values=True))))
    except InvalidParameter as exc:
        print(f"imgsvc: {exc.param}: {exc.detail}", file=sys.stderr)
        return 2
    return 0


async def migrate(settings: Settings) -> int:
    from imgsvc.app import open_storage

    async with open_storage(settings) as (_, catalog, _store):  # opening applies the migrations
        print(f"database at schema {await catalog.pool.fetchval('SELECT max(version) FROM schema_migrations')}")
    return 0


async def import_images(settings: Settings, args: argparse.Namespace) -> int:
    from imgsvc.app import open_storage, pipeline_limits
    from imgsvc.idempotency import IdempotencyKeys
    from imgsvc.importer import files_under, folder_items, run_import, sql_items
    from imgsvc.pipeline import configure_libvips
    from imgsvc.upload import Ingest, upload_options
    from imgsvc.workers import WorkerPool

    configure_libvips()
    options = upload_options({"category": args.category, "visibility": args.visibility})
    async with open_storage(settings) as (_, catalog, store):
        pool = WorkerPool(settings.workers, 1_000_000)
        ingest = Ingest(catalog, store, pool, pipeline_limits(settings), IdempotencyKeys(catalog.pool))
        if args.sql:
            items, total = sql_items(args.dsn, args.sql), None
        else:
            files = files_under(args.paths)
            items, total = folder_items(files, args.owner), len(files)
        with contextlib.ExitStack() as stack:
            mapping = stack.enter_context(args.mapping.open("w", newline="")) if args.mapping else sys.stdout
            report = await run_import(ingest, items, options, total=total, mapping=mapping,
                                      concurrency=settings.workers)  # fmt: skip
    print(f"imported {report.imported}, skipped {report.skipped} (imported before), failed {len(report.failures)}",
          file=sys.stderr)  # fmt: skip
    return 1 if report.failures else 0


async def collect(settings: Settings, grace_days: float, dry_run: bool) -> int:
    from datetime import timedelta

    from imgsvc.app import open_storage
    from imgsvc.gc import collect_garbage

    async with open_storage(settings) as (_, catalog, store):
        report = await collect_garbage(catalog, store, timedelta(days=grace_days), dry_run=dry_run)
    for key in report.removed:
        print(f"{'would remove' if dry_run else 'removed'} {key}")
    print(f"examined {report.examined} blobs: {len(report.removed)} {'to remove' if dry_run else 'removed'}, "
          f"{report.kept} kept (grace {grace_days:g} days)")  # fmt: skip
    if not dry_run:
        print(f"expired {report.expired_keys} idempotency keys older than 24 h")
        print(f"expired {report.expired_purge_jobs} delivered CDN purge jobs")
    return 0


async def purge_command(settings: Settings, image_id: str | None) -> int:
    from imgsvc.app import open_storage
    from imgsvc.purge import enqueue, pending

    async with open_storage(settings) as (_, catalog, _store):
        if image_id is None:
            rows = await pending(catalog.pool)
            for row in rows:
                print(f"job {row.job} image {row.image_id} target {row.target} attempts {row.attempts} "
                      f"next {row.next_attempt_at.isoformat()} error {row.last_error or '-'}")  # fmt: skip
            print(f"{len(rows)} undelivered purges")
            return 0
        if await catalog.get(image_id, include_deleted=True) is None:
            print(f"imgsvc: no image {image_id}", file=sys.stderr)
            return 1
        async with catalog.pool.acquire() as conn, conn.transaction():
            job = await enqueue(conn, image_id, "resend")
            targets = await conn.fetchval("SELECT count(*) FROM purge_deliveries WHERE job_id = $1", job)
    print(f"queued purge job {job} of {image_id} for {targets} targets")
    return 0


async def derive_command(settings: Settings, backfill: bool, retry_failed: bool) -> int:
    from imgsvc import derivations
    from imgsvc.app import derive_settings, open_storage
    from imgsvc.derive import Deriver

    async with open_storage(settings) as (_, catalog, store):
        if backfill or retry_failed:
            queued = await derivations.backfill(catalog.pool, retry_failed=retry_failed)
            print(f"queued {queued} blobs of live images not derived yet", file=sys.stderr)
        deriver = Deriver(catalog.pool, store, derive_settings(settings))
        taken = sum(await asyncio.gather(*(deriver.drain() for _ in range(max(1, settings.derive_workers)))))
        states = await derivations.counts(catalog.pool)
    print(f"derived {taken} blobs; now " + ", ".join(f"{n} {state}" for state, n in sorted(states.items())))
    return 1 if states.get("failed") else 0


def serve_processes(settings: Settings) -> int:
    """`IMGSVC_PROCESSES` copies of `imgsvc serve --reuse-port` on one port, with one embedded Postgres (started
    here, unless IMGSVC_DATABASE_URL is set) for all of them."""
    import os

    from imgsvc.embedded import EmbeddedPostgres
    from imgsvc.server import supervise

    print(f"imgsvc: starting {settings.processes} processes on {settings.effective_public_url} "
          f"(data in {settings.data_dir.resolve()})", flush=True)  # fmt: skip
    env = {**os.environ, "IMGSVC_PROCESSES": "1"}
    embedded = None
    if settings.database_url is None:
        embedded = EmbeddedPostgres(settings.data_dir)
        env["IMGSVC_DATABASE_URL"] = embedded.start()
    try:
        return supervise([sys.executable, "-m", "imgsvc", "serve", "--reuse-port"], env, settings.processes)
    finally:
        if embedded is not None:
            embedded.stop()
            logs.flush()


async def ingest_views(settings: Settings, path: Path, source: str | None, follow: bool, interval: float) -> int:
    import signal

    from imgsvc.app import open_storage
    from imgsvc.viewlog import LogIngest

    async with open_storage(settings) as (_, catalog, _store):
        ingest = LogIngest(catalog.pool, path, source or str(path.resolve()))
        task = asyncio.create_task(ingest.run(follow=follow, interval=interval))
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):  # the offset saved is the last committed: nothing lost
            await task
    print(f"read {ingest.report.lines} lines of {path}, counted {ingest.report.views} views", file=sys.stderr)
    return 0


def serve(settings: Settings, reuse_port: bool = False) -> int:
    import threading

    import uvicorn

    from imgsvc.app import create_app
    from imgsvc.server import (
        ClientLimits,
        DrainingServer,
        fit_connections,
        guarded_protocol,
        shared_socket,
    )

    settings = with_local_console(settings)
    max_connections = fit_connections(settings.max_connections)
    if not reuse_port:
        print(
            f"imgsvc: starting on {settings.effective_public_url} (data in {settings.data_dir.resolve()})", flush=True
        )
        if settings.console:
            print(f"imgsvc: console on {settings.effective_public_url}/console", flush=True)
    draining = threading.Event()  # set by the server on SIGTERM, read by /readyz
    app = create_app(settings, draining=draining)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # imgsvc.logs: JSON lines with the request id
        access_log=False,  # the RequestContext middleware writes the access log
        server_header=False,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        timeout_graceful_shutdown=settings.shutdown_timeout,
        http=guarded_protocol(ClientLimits(settings.header_timeout, max_connections)),
        backlog=settings.backlog,
    )
    sockets = [shared_socket(settings.host, settings.port)] if reuse_port else None
    try:
        DrainingServer(config, draining, settings.drain_seconds).run(sockets=sockets)
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down gracefully, then re-raised SIGINT
        return 130
    return 0


def with_local_console(settings: Settings) -> Settings:
    """`make run`'s setup (a loopback bind, the embedded database and blob store) gets the console unless
    IMGSVC_CONSOLE says otherwise; any other setup only with IMGSVC_CONSOLE=true."""
    from dataclasses import replace

    from imgsvc.config_values import is_loopback

    if settings.console is not None:
        return settings
    local = is_loopback(settings.host) and settings.database_url is None and settings.storage_url is None
    return replace(settings, console=local)
