"""Image decoding: orientation, colour modes, limits, broken files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from models.inputs.decode import CorruptImage, ImageTooLarge, NotAnImage, decode_image


def _jpeg_with_orientation(orientation: int) -> bytes:
    picture = Image.new("RGB", (40, 20), (255, 0, 0))
    picture.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    picture.save(out, "JPEG", exif=exif, quality=95)
    return out.getvalue()


def test_exif_rotation_is_applied() -> None:
    decoded = decode_image(_jpeg_with_orientation(6), max_pixels=10**6)  # rotate 90 CW
    assert decoded.image.size == (20, 40)
    assert (decoded.width, decoded.height) == (20, 40)
    top = np.asarray(decoded.image)[2, 10]
    assert top[2] > 200 and top[0] < 80  # the blue strip is now on top


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 32768, (128, 128, 128)),
        ("L", 10, (10, 10, 10)),
        ("LA", (0, 0), (255, 255, 255)),  # transparent -> white background
        ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("1", 1, (255, 255, 255)),
    ],
)
def test_modes_become_rgb(mode: str, value: object, expected: tuple[int, int, int]) -> None:
    out = io.BytesIO()
    fmt = "JPEG" if mode == "CMYK" else "PNG" if mode != "1" else "BMP"
    Image.new(mode, (8, 8), value).save(out, fmt)  # type: ignore[arg-type]
    decoded = decode_image(out.getvalue(), max_pixels=10**6)
    assert decoded.image.mode == "RGB"
    np.testing.assert_allclose(np.asarray(decoded.image)[4, 4], expected, atol=2)


def test_palette_transparency_composites_on_white() -> None:
    picture = Image.new("P", (8, 8), 0)
    picture.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    out = io.BytesIO()
    picture.save(out, "PNG", transparency=0)
    decoded = decode_image(out.getvalue(), max_pixels=10**6)
    assert tuple(np.asarray(decoded.image)[0, 0]) == (255, 255, 255)


def test_limits_and_errors() -> None:
    out = io.BytesIO()
    Image.new("RGB", (300, 300)).save(out, "PNG")
    with pytest.raises(ImageTooLarge):
        decode_image(out.getvalue(), max_pixels=300 * 299)
    with pytest.raises(NotAnImage):
        decode_image(b"GIF89 not really", max_pixels=10**6)
    with pytest.raises(CorruptImage):
        decode_image(out.getvalue()[:120], max_pixels=10**6)


def test_draft_decoding_keeps_reported_size() -> None:
    out = io.BytesIO()
    Image.new("RGB", (1920, 1080), (10, 200, 30)).save(out, "JPEG")
    decoded = decode_image(out.getvalue(), max_pixels=10**8, draft_px=256)
    assert (decoded.width, decoded.height) == (1920, 1080)
    assert min(decoded.image.size) >= 256 and decoded.image.size[0] < 1920
