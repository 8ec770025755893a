"""Build render URLs and `srcset` strings, signed or not, without a network call.

For the main application: `RenderUrls.from_settings(Settings.from_env())` (the server's keys, presets and
unsigned allow-list) or `RenderUrls(base_url, keys)`; what it signs or leaves unsigned is what the server serves.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from urllib.parse import quote

from imgsvc.config import Settings
from imgsvc.signing import DEFAULT_UNSIGNED, Keyring, UnsignedSpace, signed_query
from imgsvc.spec import DEFAULT_PRESETS, Presets, SpecLimits, parse_query


class RenderUrls:
    def __init__(
        self,
        base_url: str,
        keys: Sequence[tuple[str, str]] = (),
        *,
        max_output_dim: int = 8192,
        presets: Presets = DEFAULT_PRESETS,
        unsigned: UnsignedSpace | None = DEFAULT_UNSIGNED,
    ) -> None:
        """`presets`: the server's (`p=`); `unsigned`: what it serves without a signature (its defaults unless
        told; None: anything), its presets always included."""
        self.base_url = base_url.rstrip("/")
        self.keyring = Keyring.from_pairs(keys)
        self.limits = SpecLimits(max_output_dim=max_output_dim, presets=presets)
        self.unsigned = None if unsigned is None else unsigned.with_presets(presets, self.limits)

    @classmethod
    def from_settings(cls, settings: Settings, base_url: str | None = None) -> RenderUrls:
        """URLs for the server these settings configure; `base_url` defaults to its public URL."""
        return cls(
            base_url or settings.effective_public_url,
            settings.signing_keys,
            max_output_dim=settings.max_output_dim,
            presets=settings.presets,
            unsigned=UnsignedSpace.from_settings(settings),
        )

    def url(self, image_id: str, *, expires_in: int | None = None, sign: bool = True, **params: object) -> str:
        """`url("Xb3...", w=256, fmt="webp")`; signed when keys are configured, with `exp` when asked.

        Raises InvalidParameter for a malformed query, or an unsigned one outside the unsigned space.
        """
        items = [(key, str(value)) for key, value in params.items() if value is not None]
        query = parse_query(items, self.limits)  # raises InvalidParameter exactly as the server would
        path = f"{self.base_url}/img/{quote(image_id, safe='')}"
        if sign and self.keyring is not None:
            exp = int(time.time()) + expires_in if expires_in is not None else None
            return f"{path}?{signed_query(self.keyring, image_id, query.spec, exp)}"
        if expires_in is not None:
            raise ValueError("expires_in needs signing keys")
        if self.unsigned is not None:
            self.unsigned.check(query.spec)  # raises InvalidParameter as the server would answer 400
        canonical = query.spec.canonical_query()
        return f"{path}?{canonical}" if canonical else path

    def srcset(self, image_id: str, widths: Iterable[int], **params: object) -> str:
        """`srcset` candidates `url 256w, url 512w, ...` for the given widths (other params shared)."""
        return ", ".join(f"{self.url(image_id, w=width, **params)} {width}w" for width in sorted(set(widths)))
