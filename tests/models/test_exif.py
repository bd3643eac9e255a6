"""Reading a photo's own metadata: every field guarded, nothing raised on a malformed block."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from models.inputs.exif import photo_fields


def photo_jpeg(
    ifd0: dict[int, Any] | None = None,
    exif_ifd: dict[int, Any] | None = None,
    gps_ifd: dict[int, Any] | None = None,
    size: tuple[int, int] = (40, 30),
    fmt: str = "JPEG",
) -> bytes:
    """A small image in `fmt` carrying the given EXIF tags."""
    exif = Image.Exif()
    for tag, value in (ifd0 or {}).items():
        exif[tag] = value
    if exif_ifd:
        exif.get_ifd(0x8769).update(exif_ifd)
    if gps_ifd:
        exif.get_ifd(0x8825).update(gps_ifd)
    out = io.BytesIO()
    Image.new("RGB", size, (120, 60, 30)).save(out, format=fmt, exif=exif.tobytes())
    return out.getvalue()


def _fields(data: bytes) -> dict[str, Any]:
    image = Image.open(io.BytesIO(data))
    return photo_fields(image, *image.size)


def _dms(d: float, m: float, s: float) -> tuple[IFDRational, ...]:
    return (IFDRational(d), IFDRational(m), IFDRational(s))


GOOD = {
    "ifd0": {0x010F: "Apple", 0x0110: "iPhone 13 mini"},
    "exif_ifd": {0x9003: "2023:07:14 18:03:22", 0x9011: "+02:00"},
    "gps_ifd": {1: "N", 2: _dms(48, 51, 29.76), 3: "W", 4: _dms(2, 17, 40.2)},
}


def test_good_block_gives_every_field() -> None:
    fields = _fields(photo_jpeg(**GOOD))
    assert fields == {
        "width": 40,
        "height": 30,
        "camera": "Apple iPhone 13 mini",
        "taken_at": "2023-07-14T18:03:22+02:00",
        "gps": {"lat": 48.858267, "lon": -2.2945},
    }


def test_make_repeated_in_model_is_said_once_and_offset_is_optional() -> None:
    fields = _fields(
        photo_jpeg({0x010F: "Canon", 0x0110: "Canon EOS R5"}, {0x9003: "2019:01:02 03:04:05"})
    )
    assert fields["camera"] == "Canon EOS R5"
    assert fields["taken_at"] == "2019-01-02T03:04:05"


def test_malformed_values_are_dropped_not_raised() -> None:
    bad = photo_jpeg(
        {0x010F: "\x00\x00"},
        {0x9003: "0000:00:00 00:00:00", 0x9011: "+99:00", 0x9004: "2023:02:30 10:00:00"},
        {1: "N", 2: (IFDRational(1, 0), IFDRational(0), IFDRational(0)), 3: "E", 4: _dms(2, 0, 0)},
    )
    assert _fields(bad) == {"width": 40, "height": 30}
    out_of_range = photo_jpeg(
        exif_ifd={0x9003: "2023:07:14 18:03:22", 0x9011: "garbage"},
        gps_ifd={1: "N", 2: _dms(200, 0, 0), 3: "E", 4: _dms(10, 0, 0)},
    )
    assert _fields(out_of_range) == {"width": 40, "height": 30, "taken_at": "2023-07-14T18:03:22"}
    no_fix = photo_jpeg(gps_ifd={1: "N", 2: _dms(0, 0, 0), 3: "E", 4: _dms(0, 0, 0)})
    assert "gps" not in _fields(no_fix)
    absurd_year = photo_jpeg(exif_ifd={0x9003: "1201:01:01 00:00:00"})
    assert "taken_at" not in _fields(absurd_year)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_bytes_never_raise() -> None:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(
        out, format="JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff"
    )
    assert _fields(out.getvalue()) == {"width": 8, "height": 8}
