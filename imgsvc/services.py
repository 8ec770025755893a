"""`Services`: everything `app.py` builds once, as the handlers reach it (`request.app.state.services`)."""

from __future__ import annotations

from dataclasses import dataclass

from imgsvc.auth import Verifier
from imgsvc.catalog import Catalog
from imgsvc.config import Settings
from imgsvc.invalidation import DeleteListener
from imgsvc.ratelimit import RateLimiter
from imgsvc.render import Renderer
from imgsvc.spec import SpecLimits
from imgsvc.storage import BlobStore
from imgsvc.upload import Ingest


@dataclass(slots=True)
class Services:
    settings: Settings
    catalog: Catalog
    store: BlobStore
    verifier: Verifier
    renderer: Renderer
    ingest: Ingest
    spec_limits: SpecLimits
    upload_limiter: RateLimiter
    render_limiter: RateLimiter  # render misses per client address
    listener: DeleteListener
    draining: bool = False
