"""ThumbHash (Evan Wallace's reference algorithm, encoder only): an RGBA image of at most 100x100 pixels
-> about 25 bytes that a page decodes into a blurred placeholder with the image's colours and aspect ratio.
"""

from __future__ import annotations

import math


def _round(value: float) -> int:
    return math.floor(value + 0.5)  # JavaScript's Math.round, which the reference uses


def encode(width: int, height: int, rgba: bytes) -> bytes:
    """The ThumbHash of `rgba` (row by row, not premultiplied, 4 bytes a pixel)."""
    if not (0 < width <= 100 and 0 < height <= 100) or len(rgba) != width * height * 4:
        raise ValueError(f"{width}x{height} with {len(rgba)} bytes is not an RGBA image within 100x100")
    count = width * height
    alphas = [rgba[i + 3] / 255 for i in range(0, count * 4, 4)]
    avg, total_alpha = [0.0, 0.0, 0.0], 0.0
    for i, alpha in enumerate(alphas):  # plain running sums, as the reference adds (not math.fsum)
        for band in range(3):
            avg[band] += alpha / 255 * rgba[i * 4 + band]
        total_alpha += alpha
    if total_alpha:
        avg = [value / total_alpha for value in avg]
    has_alpha = total_alpha < count
    l_limit = 5 if has_alpha else 7
    longest = max(width, height)
    lx, ly = max(1, _round(l_limit * width / longest)), max(1, _round(l_limit * height / longest))
    lum, yb, rg = [0.0] * count, [0.0] * count, [0.0] * count
    for i in range(count):  # composite atop the average colour, then RGB -> LPQ
        alpha = alphas[i]
        r, g, b = (avg[band] * (1 - alpha) + alpha / 255 * rgba[i * 4 + band] for band in range(3))
        lum[i], yb[i], rg[i] = (r + g + b) / 3, (r + g) / 2 - b, r - g

    def channel(values: list[float], nx: int, ny: int) -> tuple[float, list[float], float]:
        dc, ac, scale = 0.0, [], 0.0
        for cy in range(ny):
            fy = [math.cos(math.pi / height * cy * (y + 0.5)) for y in range(height)]
            cx = 0
            while cx * ny < nx * (ny - cy):
                fx = [math.cos(math.pi / width * cx * (x + 0.5)) for x in range(width)]
                f = 0.0
                for y in range(height):  # the reference's order of operations, so the rounding agrees
                    row, cos_y = y * width, fy[y]
                    for x in range(width):
                        f += values[row + x] * fx[x] * cos_y
                f /= count
                if cx or cy:
                    ac.append(f)
                    scale = max(scale, abs(f))
                else:
                    dc = f
                cx += 1
        if scale:
            ac = [0.5 + 0.5 / scale * f for f in ac]
        return dc, ac, scale

    l_dc, l_ac, l_scale = channel(lum, max(3, lx), max(3, ly))
    p_dc, p_ac, p_scale = channel(yb, 3, 3)
    q_dc, q_ac, q_scale = channel(rg, 3, 3)
    acs = [l_ac, p_ac, q_ac]
    landscape = width > height
    header24 = (
        _round(63 * l_dc)
        | _round(31.5 + 31.5 * p_dc) << 6
        | _round(31.5 + 31.5 * q_dc) << 12
        | _round(31 * l_scale) << 18
        | int(has_alpha) << 23
    )
    header16 = (ly if landscape else lx) | _round(63 * p_scale) << 3 | _round(63 * q_scale) << 9 | int(landscape) << 15
    out = [header24 & 255, (header24 >> 8) & 255, header24 >> 16, header16 & 255, header16 >> 8]
    if has_alpha:
        a_dc, a_ac, a_scale = channel(alphas, 5, 5)
        out.append(_round(15 * a_dc) | _round(15 * a_scale) << 4)
        acs.append(a_ac)
    factors = [f for ac in acs for f in ac]
    start = len(out)
    out.extend([0] * ((len(factors) + 1) // 2))
    for index, f in enumerate(factors):
        out[start + (index >> 1)] |= _round(15 * f) << ((index & 1) << 2)
    return bytes(out)
