"""Per-subject token buckets (uploads per token subject, render misses per client address): a flood from one
caller meets 429 + Retry-After, the others never notice."""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable

from cachetools import TTLCache

from imgsvc.errors import RateLimited


def client_key(host: str) -> str:
    """The bucket of a client address: IPv4 as is, IPv6 by its /64 (one host usually holds a whole /64)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        return str(mapped) if mapped else str(ipaddress.ip_network(f"{address}/64", strict=False))
    return host


class RateLimiter:
    """`per_minute` events per subject on average, with bursts of up to `burst`; 0 disables it."""

    def __init__(
        self,
        per_minute: int,
        burst: int | None = None,
        *,
        what: str = "uploads",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.rate = per_minute / 60.0
        self.burst = float(burst if burst is not None else per_minute)
        self._clock = clock
        # Idle buckets refill to full in burst/rate seconds; forgetting them after that changes nothing.
        ttl = self.burst / self.rate if self.rate else 1.0
        self._buckets: TTLCache[str, tuple[float, float]] = TTLCache(maxsize=100_000, ttl=ttl, timer=clock)

    def hit(self, subject: str) -> None:
        if self.rate == 0:
            return
        now = self._clock()
        tokens, last = self._buckets.get(subject, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            retry_after = math.ceil((1.0 - tokens) / self.rate)
            raise RateLimited(
                f"too many {self.what}: at most {self.rate * 60:g} a minute in bursts of up to {self.burst:g}",
                headers={"Retry-After": str(retry_after)},
            )
        self._buckets[subject] = (tokens - 1.0, now)
