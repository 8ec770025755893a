"""Render geometry, pure arithmetic on sizes: what a spec resizes to, where it crops or pads, and the JPEG
scale a source is decoded at. `imgsvc.pipeline` turns a `Plan` into pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from imgsvc.spec import Gravity, TransformSpec

Crop = Literal["gravity", "attention", "entropy"]


@dataclass(frozen=True, slots=True)
class Plan:
    """Geometry in oriented pixels: resize to `resize`, then crop (cover) or pad (contain) to `box`."""

    resize: tuple[int, int]
    box: tuple[int, int]
    crop: Crop | None = None
    pad: bool = False


def plan(width: int, height: int, spec: TransformSpec, animate: bool, max_dim: int) -> Plan:
    """Resize and box sizes for `spec` on a `width` x `height` (oriented) source; see `imgsvc.pipeline.render`."""
    w, h = spec.width, spec.height
    fits = min(1.0, max_dim / width, max_dim / height)  # keep-aspect outputs never exceed max_dim
    if w is None or h is None:
        scale = min(fits, w / width if w is not None else h / height if h is not None else 1.0)
        size = (px(width * scale), px(height * scale))
        return Plan(size, size)
    sx, sy = w / width, h / height
    if spec.fit in ("inside", "outside"):
        scale = min(fits, min(sx, sy) if spec.fit == "inside" else max(sx, sy))
        size = (px(width * scale), px(height * scale))
        return Plan(size, size)
    grow = min(sx, sy) if spec.fit == "contain" else max(sx, sy)
    if grow > 1:
        w, h = px(w / grow), px(h / grow)
        sx, sy = w / width, h / height
    if spec.fit == "fill":
        return Plan((w, h), (w, h))
    if spec.fit == "contain":
        scale = min(sx, sy)
        return Plan((min(w, px(width * scale)), min(h, px(height * scale))), (w, h), pad=True)
    scale = max(sx, sy)
    crop: Crop = "gravity"
    if spec.gravity in ("smart", "entropy") and not animate:
        crop = "attention" if spec.gravity == "smart" else "entropy"
    return Plan((max(w, px(width * scale)), max(h, px(height * scale))), (w, h), crop=crop)


def position(gravity: Gravity, free_x: int, free_y: int) -> tuple[int, int]:
    """Offset of the kept (cover) or placed (contain) area, given the free space on each axis."""
    x = 0 if gravity in ("west", "nw", "sw") else free_x if gravity in ("east", "ne", "se") else free_x // 2
    y = 0 if gravity in ("north", "nw", "ne") else free_y if gravity in ("south", "sw", "se") else free_y // 2
    return x, y


def jpeg_shrink(width: int, height: int, plan: Plan) -> int:
    """libvips thumbnail's shrink-on-load for JPEG: a DCT scale that leaves at least 2x for the resize."""
    factor = min(width / plan.resize[0], height / plan.resize[1])
    return 8 if factor >= 16 else 4 if factor >= 8 else 2 if factor >= 4 else 1


def px(value: float) -> int:
    return max(1, int(value + 0.5))
