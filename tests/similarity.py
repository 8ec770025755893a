"""SSIM of two decoded images of one size (luma, on white, 8-bit scale, Gaussian window sigma 1.5: Wang et al.)."""

from __future__ import annotations

import pyvips


def _luma(image: pyvips.Image) -> pyvips.Image:
    if image.interpretation in ("rgb16", "grey16"):  # a 10-bit AVIF decodes to 16 bits
        image = image.colourspace("srgb" if image.interpretation == "rgb16" else "b-w")
    if image.hasalpha():
        image = image.flatten(background=[255] * (image.bands - 1))
    if image.bands >= 3:
        image = image[0] * 0.299 + image[1] * 0.587 + image[2] * 0.114
    return image.cast("float")


def ssim(a: bytes, b: bytes) -> float:
    """Mean SSIM of two encoded images (any format libvips reads); ValueError if their sizes differ."""
    x, y = (_luma(pyvips.Image.new_from_buffer(data, "")) for data in (a, b))
    if (x.width, x.height) != (y.width, y.height):
        raise ValueError(f"{x.width}x{x.height} vs {y.width}x{y.height}")

    def blur(image: pyvips.Image) -> pyvips.Image:
        return image.gaussblur(1.5, precision="float", min_ampl=0.001)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    return float((((mx * my * 2 + c1) * (cxy * 2 + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))).avg())
