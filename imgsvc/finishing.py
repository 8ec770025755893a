"""After the resize, per frame: crop (gravity or smart), blur, pad onto the background; 8-bit output."""

from __future__ import annotations

from collections.abc import Callable

import pyvips

from imgsvc import geometry
from imgsvc.deadline import Deadline
from imgsvc.spec import TransformSpec


def to_8bit(image: pyvips.Image) -> pyvips.Image:
    """8-bit sRGB, or 8-bit grey (which browsers decode fine in JPEG and PNG); thumbnail does most of it."""
    if image.interpretation not in ("srgb", "b-w"):
        image = image.colourspace("b-w" if image.interpretation == "grey16" else "srgb")
    return image if image.format == "uchar" else image.cast("uchar")


def per_frame(image: pyvips.Image, frames: int, op: Callable[[pyvips.Image], pyvips.Image]) -> pyvips.Image:
    """Apply `op` to each frame of an animation strip (or to the single image) and rebuild the strip."""
    if frames == 1:
        return op(image)
    page = image.height // frames
    parts = [op(image.crop(0, i * page, image.width, page)) for i in range(frames)]
    strip = pyvips.Image.arrayjoin(parts, across=1).copy()  # delay and loop come along from the first frame
    strip.set_type(pyvips.GValue.gint_type, "page-height", parts[0].height)
    return strip


def finish_frame(
    image: pyvips.Image, plan: geometry.Plan, spec: TransformSpec, rgb: tuple[int, int, int], deadline: Deadline
) -> pyvips.Image:
    box_w, box_h = plan.box
    if plan.crop in ("attention", "entropy"):
        # smartcrop needs random access: materialise the (already resized) image, still under the deadline,
        # and watch the memory copy too, since a new image does not inherit the progress signal.
        image = deadline.watch(image.copy_memory()).smartcrop(box_w, box_h, interesting=plan.crop)
    elif plan.crop == "gravity":
        x, y = geometry.position(spec.gravity, image.width - box_w, image.height - box_h)
        image = image.crop(x, y, box_w, box_h)
    if spec.blur is not None:
        image = blur(image, spec.blur)
    if plan.pad:
        x, y = geometry.position(spec.gravity, box_w - image.width, box_h - image.height)
        image, colour = match_background(image, rgb)
        opaque = [*colour, 255] if image.hasalpha() else colour
        image = image.embed(x, y, box_w, box_h, extend="background", background=opaque)
    return image


def blur(image: pyvips.Image, sigma: float) -> pyvips.Image:
    if not image.hasalpha():
        return image.gaussblur(sigma)
    # Blur premultiplied, or transparent pixels' colours bleed into the visible edge.
    return image.premultiply().gaussblur(sigma).unpremultiply().cast("uchar")


def parse_rgb(background: str) -> tuple[int, int, int]:
    return int(background[0:2], 16), int(background[2:4], 16), int(background[4:6], 16)


def match_background(image: pyvips.Image, rgb: tuple[int, int, int]) -> tuple[pyvips.Image, list[int]]:
    """The background as band values for `image`; a grey image becomes sRGB unless the colour is a grey."""
    if image.bands - int(image.hasalpha()) == 1:
        if rgb[0] == rgb[1] == rgb[2]:
            return image, [rgb[0]]
        image = image.colourspace("srgb")
    return image, list(rgb)
