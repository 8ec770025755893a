"""Placeholders: the ThumbHash encoder against the reference implementation's output, the placeholder fields of
the image JSON (null until derived, then shared by every image of the same bytes), and the `p=placeholder` render."""

from __future__ import annotations

import base64
import re

import pytest
import pyvips

from imgsvc import thumbhash
from tests.conftest import PHOTO, PNG_ALPHA, app_client, with_settings
from tests.test_derive import upload, wait_derived

COLOUR = re.compile(r"^#[0-9a-f]{6}$")


def pattern(width: int, height: int, alpha: bool) -> bytes:
    """Gradients in R and G, a repeating pattern in B, and a horizontal alpha ramp (or opaque)."""
    out = bytearray()
    for y in range(height):
        for x in range(width):
            out += bytes([x * 255 // (width - 1), y * 255 // (height - 1), (x * 7 + y * 13) % 256,
                          x * 255 // (width - 1) if alpha else 255])  # fmt: skip
    return bytes(out)


# Computed with the reference implementation (evanw/thumbhash, js/thumbhash.js rgbaToThumbHash) on `pattern`.
@pytest.mark.parametrize(
    ("width", "height", "alpha", "expected"),
    [
        (32, 24, False, "3/cJPZpwh3eBdndYh2eXiINwB/h3"),
        (17, 40, False, "HwgKOxyAYHd3ZoSIcKEI+Hg="),
        (30, 30, True, "ZFiGHQ43soiweGmHZcOwNPt0gId4iIeIdw=="),
        (64, 48, True, "o1iGHIw3woawiHh4OAp7s08HeIiIeIiIBw=="),
        (100, 75, False, "3wcKNZqAh3dwd3d4eHh3eHCAB/h3"),
    ],
)
def test_thumbhash_matches_the_reference_encoder(width: int, height: int, alpha: bool, expected: str) -> None:
    assert base64.b64encode(thumbhash.encode(width, height, pattern(width, height, alpha))).decode() == expected


@pytest.mark.parametrize(("width", "height"), [(101, 10), (10, 0)])
def test_thumbhash_refuses_images_over_100_px(width: int, height: int) -> None:
    with pytest.raises(ValueError):
        thumbhash.encode(width, height, bytes(width * height * 4))


def two_colours() -> bytes:
    """800x600: 70% blue on the left, 30% red on the right (a PNG: exact colours)."""
    blue = pyvips.Image.black(560, 600, bands=3).new_from_image([20, 40, 200])
    red = pyvips.Image.black(240, 600, bands=3).new_from_image([220, 30, 30])
    return bytes(blue.join(red, "horizontal").cast("uchar").copy(interpretation="srgb").pngsave_buffer())


async def test_placeholder_fields_appear_once_derived(settings) -> None:  # type: ignore[no-untyped-def]
    async with app_client(settings) as client:  # derives nothing (IMGSVC_DERIVE_WORKERS=0)
        image = await upload(client, two_colours())
        assert image["placeholder"] is None
    async with app_client(with_settings(settings, derive_workers=1)) as client:  # the queue survived
        await wait_derived(client.services.catalog.pool, str(image["sha256"]))  # type: ignore[attr-defined]
        placeholder = (await client.get(f"/images/{image['id']}")).json()["placeholder"]
        assert placeholder["dominant_color"] == "#1428c8" and placeholder["aspect_ratio"] == round(800 / 600, 4)
        r, g, b = (int(placeholder["average_color"][i : i + 2], 16) for i in (1, 3, 5))
        assert abs(r - (0.7 * 20 + 0.3 * 220)) <= 3 and abs(g - 37) <= 3 and abs(b - (0.7 * 200 + 0.3 * 30)) <= 3
        digest = base64.b64decode(placeholder["thumbhash"])
        assert 20 <= len(digest) <= 30 and digest[4] >> 7 == 1  # ThumbHash's landscape flag
        second = await upload(client, two_colours())  # the same bytes: the placeholder from the upload on
        assert second["placeholder"] == placeholder
        listed = (await client.get("/images?owner=me")).json()["items"]
        assert {item["id"]: item["placeholder"] for item in listed} == {image["id"]: placeholder,
                                                                        second["id"]: placeholder}  # fmt: skip


@pytest.mark.parametrize("path", [PHOTO, PNG_ALPHA])
async def test_placeholder_of_photos_and_transparent_images(settings, path) -> None:  # type: ignore[no-untyped-def]
    async with app_client(with_settings(settings, derive_workers=1)) as client:
        image = await upload(client, path.read_bytes())
        await wait_derived(client.services.catalog.pool, str(image["sha256"]))  # type: ignore[attr-defined]
        placeholder = (await client.get(f"/images/{image['id']}")).json()["placeholder"]
        assert COLOUR.match(placeholder["dominant_color"]) and COLOUR.match(placeholder["average_color"])
        assert placeholder["aspect_ratio"] == round(int(image["width"]) / int(image["height"]), 4)  # type: ignore[call-overload]
        digest = base64.b64decode(placeholder["thumbhash"])
        assert digest[2] >> 7 == int(bool(image["has_alpha"]))  # ThumbHash's alpha flag


async def test_the_placeholder_preset_is_small_enough_to_inline(settings) -> None:  # type: ignore[no-untyped-def]
    async with app_client(settings) as client:
        image = await upload(client, PHOTO.read_bytes())
        assert image["urls"]["placeholder"].endswith(f"/img/{image['id']}?p=placeholder")  # type: ignore[index]
        response = await client.get(f"/img/{image['id']}?p=placeholder")
        assert response.status_code == 200 and response.headers["content-type"] == "image/webp"
        decoded = pyvips.Image.new_from_buffer(response.content, "")
        assert (decoded.width, decoded.height) == (32, 24) and len(response.content) < 1000


async def test_openapi_describes_the_placeholder(settings) -> None:  # type: ignore[no-untyped-def]
    async with app_client(settings) as client:
        schema = (await client.get("/openapi.json")).json()["components"]["schemas"]["Image"]["properties"]
        placeholder = schema["placeholder"]
        assert placeholder["type"] == ["object", "null"]
        assert set(placeholder["properties"]) == {"thumbhash", "dominant_color", "average_color", "aspect_ratio"}
