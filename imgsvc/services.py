"""`Services`: everything `app.py` builds once, handed to the handlers as lifespan state (`request.state`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from imgsvc.auth import Verifier
from imgsvc.catalog import Catalog
from imgsvc.config import Settings
from imgsvc.hits import HitIndex
from imgsvc.ratelimit import RateLimiter
from imgsvc.render import Renderer
from imgsvc.spec import SpecLimits
from imgsvc.storage import BlobStore
from imgsvc.upload import Ingest


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    catalog: Catalog
    store: BlobStore
    verifier: Verifier
    renderer: Renderer
    hits: HitIndex
    ingest: Ingest
    spec_limits: SpecLimits
    upload_limiter: RateLimiter
    render_limiter: RateLimiter  # render misses per client address
    draining: threading.Event  # set by the server's signal handler (and at shutdown): /readyz answers 503
