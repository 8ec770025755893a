"""The cache of decoded originals: renders that start from it give the very bytes a fresh decode gives."""

from __future__ import annotations

import pytest
import pyvips

from imgsvc import errors
from imgsvc.cache import SharedByteLRU
from imgsvc.pipeline import DecodedSource, PipelineLimits, decoded_bytes, render
from imgsvc.spec import OutputFormat, TransformSpec
from tests.test_pipeline import ALPHA_PNG, ANIMATED_GIF, LIMITS, PHOTO, SHARP_JPEG, _quadrants, _read, _with_fields

MiB = 2**20


def _cache(max_bytes: int = 256 * MiB) -> SharedByteLRU[tuple[str, int], pyvips.Image]:
    return SharedByteLRU(max_bytes, decoded_bytes)


def _sources() -> dict[str, bytes]:
    quadrants = _quadrants(640, 480)
    tagged = quadrants.icc_transform("cmyk").icc_transform("srgb", embedded=True)  # carries an ICC profile
    cmyk = _quadrants(320, 240).icc_transform("cmyk").jpegsave_buffer()
    sources = {
        "photo": _read(PHOTO),
        "sharp": _read(SHARP_JPEG),
        "rgba-png": _read(ALPHA_PNG),
        "icc-jpeg": tagged.jpegsave_buffer(Q=90),
        "cmyk-jpeg": cmyk,
        "grey-png": quadrants.colourspace("b-w").pngsave_buffer(),
        "16-bit-png": (quadrants.cast("ushort") * 257).copy(interpretation="rgb16").pngsave_buffer(),
        "palette-png": quadrants.pngsave_buffer(palette=True),
    }
    for orientation in range(1, 9):
        sources[f"orientation-{orientation}"] = _with_fields(quadrants, orientation=orientation).jpegsave_buffer(
            keep="exif"
        )
    return sources


SOURCES = _sources()
# Widths either side of each JPEG shrink-on-load step (source / output = 4, 8, 16), and boxes with fits.
SPECS = [
    TransformSpec(width=100),
    TransformSpec(width=256),
    TransformSpec(width=250, height=250, fit="cover"),
    TransformSpec(width=500, height=375, fit="fill"),  # photo: exactly 8x on both axes
    TransformSpec(width=160, height=160, fit="contain", background="00ff00"),
    TransformSpec(width=1000),
]


@pytest.mark.parametrize("name", sorted(SOURCES))
@pytest.mark.parametrize("fmt", ["webp", "jpeg", "png"])
def test_cached_renders_are_identical_to_fresh_ones(name: str, fmt: OutputFormat) -> None:
    data, cache = SOURCES[name], _cache()
    for spec in SPECS:
        fresh = render(data, spec, fmt, LIMITS)
        cold = render(data, spec, fmt, LIMITS, DecodedSource(cache, name))
        warm = render(data, spec, fmt, LIMITS, DecodedSource(cache, name))
        assert cold.data == fresh.data, (name, spec)
        assert warm.data == fresh.data, (name, spec)
    assert len(cache) >= 1


def test_a_warm_render_decodes_nothing() -> None:
    cache = _cache()
    render(_read(PHOTO), TransformSpec(width=256), "png", LIMITS, DecodedSource(cache, "photo"))
    assert len(cache) == 1
    key = ("photo", 4)
    pixels = cache.get(key)
    assert pixels is not None and (pixels.width, pixels.height) == (1000, 750)  # 4000x3000 at 1/4
    # Swap the cached pixels for a red field: the next render of any size in that band shows red.
    red = pyvips.Image.black(1000, 750, bands=3).new_from_image([255, 0, 0]).cast("uchar").copy(interpretation="srgb")
    cache.put(key, red.copy_memory())
    out = pyvips.Image.new_from_buffer(
        render(_read(PHOTO), TransformSpec(width=300), "png", LIMITS, DecodedSource(cache, "photo")).data, ""
    )
    assert (out.width, out.height) == (300, 225)
    assert [round(v) for v in out(150, 110)] == [255, 0, 0]


def test_each_jpeg_scale_is_its_own_entry_and_sizes_share_it() -> None:
    cache = _cache()
    for width in (100, 110, 256, 300, 1200, 1400):
        render(_read(PHOTO), TransformSpec(width=width), "jpeg", LIMITS, DecodedSource(cache, "photo"))
    assert [cache.get(("photo", s)) is not None for s in (8, 4, 2, 1)] == [True, True, False, True]
    assert len(cache) == 3


def test_decodes_over_a_quarter_of_the_budget_are_not_kept() -> None:
    cache = _cache(4 * 1000 * 750 * 3 - 1)  # the photo at 1/4 (1000x750 RGB) is just over a quarter
    rendered = render(_read(PHOTO), TransformSpec(width=256), "jpeg", LIMITS, DecodedSource(cache, "photo"))
    assert (rendered.width, rendered.height) == (256, 192)
    assert len(cache) == 0
    render(_read(PHOTO), TransformSpec(width=100), "jpeg", LIMITS, DecodedSource(cache, "photo"))
    assert len(cache) == 1  # 1/8 is small enough
    assert cache.current_bytes == 500 * 375 * 3


def test_animations_and_other_formats_are_not_cached() -> None:
    cache = _cache()
    webp = pyvips.Image.new_from_buffer(_read(PHOTO), "").webpsave_buffer()
    for data in (_read(ANIMATED_GIF), webp):
        render(data, TransformSpec(width=64), "webp", LIMITS, DecodedSource(cache, "x"))
    assert len(cache) == 0


def test_a_deleted_image_leaves_no_pixels() -> None:
    cache = _cache()
    render(_read(PHOTO), TransformSpec(width=256), "jpeg", LIMITS, DecodedSource(cache, "sha", "image-1"))
    render(_read(SHARP_JPEG), TransformSpec(width=256), "jpeg", LIMITS, DecodedSource(cache, "sha2", "image-2"))
    assert cache.evict_group("image-1") == 1
    assert len(cache) == 1


def test_the_deadline_covers_the_decode() -> None:
    cache = _cache()
    with pytest.raises(errors.RenderTimeout):
        render(
            _read(PHOTO), TransformSpec(width=1000), "jpeg", PipelineLimits(timeout_seconds=0.0001),
            DecodedSource(cache, "photo"),
        )  # fmt: skip
    assert len(cache) == 0


def test_truncated_jpeg_is_refused_not_cached() -> None:
    cache = _cache()
    data = _read(SHARP_JPEG)
    with pytest.raises(errors.UndecodableImage):
        render(data[: len(data) // 2], TransformSpec(width=256), "jpeg", LIMITS, DecodedSource(cache, "half"))
    assert len(cache) == 0
