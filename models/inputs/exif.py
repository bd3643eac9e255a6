"""A photo's own metadata, read from its EXIF block: when it was taken, with which camera,
where. Every field is guarded: a value that is missing, of the wrong type, out of range or
absurd is left out, and nothing here raises on a malformed block.

`taken_at` is an ISO 8601 string, "2023-07-14T18:03:22+02:00" when the camera recorded its
UTC offset (OffsetTimeOriginal), "2023-07-14T18:03:22" (local time, offset unknown) when not,
so that string comparisons order dates: {"taken_at": {"$gte": "2023-01-01"}}.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any

from PIL import ExifTags, Image

RESERVED_FIELDS = ("taken_at", "camera", "gps", "width", "height")

_DATE = re.compile(r"^\s*(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET = re.compile(r"^\s*([+-])(\d{2}):(\d{2})\s*$")
MIN_YEAR, MAX_YEAR = 1850, 2100  # outside: a clock never set, or garbage
MAX_TEXT = 128

_TAG_DATETIME_ORIGINAL = 0x9003
_TAG_DATETIME_DIGITIZED = 0x9004
_TAG_OFFSET_ORIGINAL = 0x9011
_TAG_OFFSET_DIGITIZED = 0x9012
_TAG_MAKE = 0x010F
_TAG_MODEL = 0x0110


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    cleaned = "".join(ch for ch in value if ch.isprintable()).strip()
    return cleaned[:MAX_TEXT] or None


def _taken_at(date_value: Any, offset_value: Any) -> str | None:
    text = _text(date_value)
    match = _DATE.match(text or "")
    if match is None:
        return None
    try:
        year, month, day, hour, minute, second = (int(p) for p in match.groups())
        # Naive: the offset, when the camera recorded one, is appended below.
        when = datetime(year, month, day, hour, minute, second)
    except ValueError:
        return None
    if not MIN_YEAR <= when.year <= MAX_YEAR:
        return None
    stamp = when.strftime("%Y-%m-%dT%H:%M:%S")
    offset = _OFFSET.match(_text(offset_value) or "")
    if offset is not None:
        sign, hours, minutes = offset.group(1), int(offset.group(2)), int(offset.group(3))
        if hours <= 14 and minutes < 60:
            stamp += f"{sign}{hours:02d}:{minutes:02d}"
    return stamp


def _camera(make_value: Any, model_value: Any) -> str | None:
    make, model = _text(make_value), _text(model_value)
    if make and model:
        # Many cameras repeat the make in the model ("Canon" + "Canon EOS R5").
        return model if model.lower().startswith(make.lower()) else f"{make} {model}"[:MAX_TEXT]
    return make or model


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _degrees(value: Any, ref: Any, positive: str, negative: str, limit: float) -> float | None:
    if not isinstance(value, tuple | list) or not 1 <= len(value) <= 3:
        return None
    parts = [_number(v) for v in value]
    if any(p is None or p < 0 for p in parts):
        return None
    degrees = sum((p or 0.0) / 60**i for i, p in enumerate(parts))
    hemisphere = (_text(ref) or "").upper()[:1]
    if hemisphere == negative:
        degrees = -degrees
    elif hemisphere != positive:
        return None  # without its hemisphere a coordinate is as likely wrong as right
    return round(degrees, 6) if abs(degrees) <= limit else None


def _gps(info: Any) -> dict[str, float] | None:
    if not hasattr(info, "get"):
        return None
    lat = _degrees(info.get(2), info.get(1), "N", "S", 90.0)
    lon = _degrees(info.get(4), info.get(3), "E", "W", 180.0)
    if lat is None or lon is None or (lat == 0.0 and lon == 0.0):
        return None  # (0, 0) is what receivers write without a fix
    return {"lat": lat, "lon": lon}


def photo_fields(image: Image.Image, width: int, height: int) -> dict[str, Any]:
    """The reserved fields of one opened image (pixels not needed): `width`/`height` (upright,
    as given), and `taken_at`, `camera`, `gps` when its EXIF block has them."""
    fields: dict[str, Any] = {"width": width, "height": height}
    try:
        exif = image.getexif()
    except Exception:
        return fields
    for name, read in (
        ("camera", lambda: _camera(exif.get(_TAG_MAKE), exif.get(_TAG_MODEL))),
        ("taken_at", lambda: _taken_from(exif.get_ifd(ExifTags.IFD.Exif))),
        ("gps", lambda: _gps(exif.get_ifd(ExifTags.IFD.GPSInfo))),
    ):
        try:
            value = read()
        except Exception:  # a malformed block never fails the upload
            value = None
        if value is not None:
            fields[name] = value
    return fields


def _taken_from(ifd: Any) -> str | None:
    if not hasattr(ifd, "get"):
        return None
    return _taken_at(ifd.get(_TAG_DATETIME_ORIGINAL), ifd.get(_TAG_OFFSET_ORIGINAL)) or _taken_at(
        ifd.get(_TAG_DATETIME_DIGITIZED), ifd.get(_TAG_OFFSET_DIGITIZED)
    )
