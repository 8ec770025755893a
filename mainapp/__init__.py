"""A small reference "main app" for tests and local development: it issues Ed25519 JWT access tokens,
publishes their JWKS and answers RFC 7662 introspection, so imgsvc's delegated verification runs against a real server.
"""
