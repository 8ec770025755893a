"""Client hints, opt-in per URL: `w=auto` takes Sec-CH-Width, `dpr=auto` Sec-CH-DPR, and `Save-Data: on` lowers
the quality of such URLs; a template spec becomes the spec that is rendered. Pure: no I/O."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import ROUND_HALF_UP, Decimal

from imgsvc.spec import DEFAULT_QUALITY, OutputFormat, TransformSpec

HINT_FALLBACK_WIDTH = 1080  # w=auto without a usable Sec-CH-Width
HINT_DPRS = (Decimal(1), Decimal("1.5"), Decimal(2), Decimal(3), Decimal(4))  # Sec-CH-DPR is snapped up to one
SAVE_DATA_STEP, SAVE_DATA_FLOOR = 20, 30  # `Save-Data: on` on an auto URL: quality - 20, never below 30
ACCEPT_CH = "Sec-CH-Width, Sec-CH-DPR, Save-Data"
_HINT_INT = re.compile(r"[0-9]{1,6}")
_HINT_DECIMAL = re.compile(r"[0-9]{1,3}(\.[0-9]{1,3})?")


@dataclass(frozen=True, slots=True)
class ClientHints:
    """The request's hint headers, parsed leniently: a malformed one counts as absent."""

    width: int | None = None  # Sec-CH-Width: the image's layout width in device pixels
    dpr: Decimal | None = None  # Sec-CH-DPR
    save_data: bool = False  # Save-Data: on


NO_HINTS = ClientHints()


def client_hints(width: str | None, dpr: str | None, save_data: str | None) -> ClientHints:
    """Parse the three headers (structured-field integer, decimal, token); never raises."""
    parsed_width = int(width.strip()) if width and _HINT_INT.fullmatch(width.strip()) else None
    parsed_dpr = Decimal(dpr.strip()) if dpr and _HINT_DECIMAL.fullmatch(dpr.strip()) else None
    return ClientHints(
        parsed_width or None,
        parsed_dpr if parsed_dpr else None,
        (save_data or "").strip().lower() == "on",
    )


def resolve_hints(
    spec: TransformSpec, hints: ClientHints, widths: Sequence[int], original_width: int, top: int
) -> tuple[TransformSpec, tuple[str, ...]]:
    """The spec an `auto` template stands for with these hints, and the hint headers it used (its `Vary`).

    `w=auto`: Sec-CH-Width (HINT_FALLBACK_WIDTH without one) snapped up to the next of `widths` (the largest
    above them all), and, without `h`, at most the original's width; `dpr=auto`: w and h times Sec-CH-DPR (1
    without one) snapped up to HINT_DPRS. A spec without `auto` is returned as it is, using no hint."""
    if spec.auto is None:
        return spec, ()
    if spec.auto == "w":
        wanted = hints.width or HINT_FALLBACK_WIDTH
        width = next((w for w in sorted(widths) if w >= wanted), max(widths))
        if spec.height is None:
            width = min(width, original_width)
        return replace(spec, width=min(width, top), auto=None), ("Sec-CH-Width", "Save-Data")
    dpr = next((d for d in HINT_DPRS if d >= (hints.dpr or 1)), HINT_DPRS[-1])
    width, height = (
        None if size is None else min(int((size * dpr).quantize(Decimal(1), rounding=ROUND_HALF_UP)), top)
        for size in (spec.width, spec.height)
    )
    return replace(spec, width=width, height=height, auto=None), ("Sec-CH-DPR", "Save-Data")


def save_data_quality(spec: TransformSpec, fmt: OutputFormat) -> TransformSpec:
    """The spec with its quality lowered by SAVE_DATA_STEP (lossy formats only), in canonical form."""
    if fmt not in ("jpeg", "webp", "avif"):
        return spec
    quality = max(SAVE_DATA_FLOOR, (spec.quality or DEFAULT_QUALITY[fmt]) - SAVE_DATA_STEP)
    return replace(spec, quality=None if quality == DEFAULT_QUALITY[fmt] else quality)
