"""`python -m mainapp --host 127.0.0.1 --port N [--issuer URL] [--audience imgsvc]`: run the reference main app."""

from __future__ import annotations

import argparse
import ipaddress

import uvicorn

from mainapp.app import create_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mainapp", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="bind address; loopback only (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000, help="port (default 9000)")
    parser.add_argument("--issuer", help="the iss of issued tokens (default http://HOST:PORT)")
    parser.add_argument("--audience", default="imgsvc", help="the default aud of issued tokens (default imgsvc)")
    parser.add_argument("--client-id", help="require HTTP Basic client auth on /introspect and /revoke")
    parser.add_argument("--client-secret", help="the client secret for --client-id")
    args = parser.parse_args(argv)
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        parser.error("the reference main app has unauthenticated admin routes; bind it to loopback only")
    if args.client_secret and not args.client_id:
        parser.error("--client-secret needs --client-id")
    issuer = args.issuer or f"http://{args.host}:{args.port}"
    app = create_app(issuer, args.audience, args.client_id, args.client_secret)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
