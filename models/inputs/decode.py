"""Image decoding: bytes in, an upright RGB picture out, with limits checked before decoding.

Formats: JPEG, PNG, GIF, WebP, BMP, TIFF, AVIF (Pillow itself) and HEIC/HEIF (through the
`pillow-heif` plugin). The pixel count is read from the header and checked before any decoding,
for every format. Handles EXIF orientation, animated files (first frame), palette/alpha
(composited on white), CMYK, 16-bit and float greyscale. Raises one of three errors a caller can
map to a status. The photo's own metadata (date taken, camera, GPS) comes with the header
(`models.inputs.exif`).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.inputs.exif import photo_fields

try:  # HEIC/HEIF (iPhone photos); AVIF is Pillow's own
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_SUPPORTED = True
except ImportError:  # pragma: no cover - a declared dependency; HEIF is then refused (415)
    HEIF_SUPPORTED = False

ALLOWED_FORMATS = {"JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "MPO", "AVIF", "HEIF"}
FORMAT_NAMES = "JPEG, PNG, GIF, WebP, BMP, TIFF, AVIF, HEIC/HEIF"
# The parsers Image.open may try; the JPEG one also answers MPO (multi-picture JPEG) files.
_OPENERS = sorted(ALLOWED_FORMATS - {"MPO"} - (set() if HEIF_SUPPORTED else {"HEIF"}))
MIME_BY_FORMAT = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "AVIF": "image/avif",
    "HEIF": "image/heic",
}
# ISO-BMFF brands (bytes 8..12 after "ftyp") of the HEIF family, AVIF included.
_HEIF_BRANDS = {
    b"heic",
    b"heix",
    b"hevc",
    b"hevx",
    b"heim",
    b"heis",
    b"mif1",
    b"msf1",
    b"avif",
    b"avis",
}


def _looks_like_image(head: bytes) -> bool:
    """Whether the first bytes are those of a format we take, though the file cannot be opened:
    a damaged HEIF/AVIF/WebP container is then a corrupt image (422), not an unknown type."""
    heif = head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS
    webp = head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    return heif or webp


def _head(fp: BinaryIO | Path) -> bytes:
    try:
        if isinstance(fp, Path):
            with open(fp, "rb") as fh:
                return fh.read(16)
        fp.seek(0)
        return fp.read(16)
    except OSError:
        return b""


class ImageError(ValueError):
    """Base of decoding errors."""


class NotAnImage(ImageError):
    """The bytes are not an image in a supported format."""


class CorruptImage(ImageError):
    """The bytes start like an image but cannot be decoded (truncated or damaged)."""


class ImageTooLarge(ImageError):
    """The header declares more pixels than allowed; refused before decoding."""


@dataclass
class DecodedImage:
    image: Image.Image  # RGB, EXIF-upright
    width: int  # of the stored original, after EXIF rotation
    height: int
    format: str
    mime: str
    # The reserved fields read from the file itself (`models.inputs.exif.photo_fields`).
    photo: dict[str, Any] = field(default_factory=dict)


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit and float greyscale: PIL's convert("L") clips instead of scaling.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        grey = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # CMYK (PIL undoes Adobe's inversion), YCbCr, LAB, HSV, 1, L.
    return img.convert("RGB")


@dataclass
class ImageHeader:
    """What the header says, read without decoding the pixels."""

    format: str
    mime: str
    width: int  # as stored, before EXIF rotation
    height: int
    orientation: int  # EXIF orientation, 1 when absent or unreadable
    mode: str  # PIL mode of the stored pixels (RGB, L, CMYK, P, ...)
    photo: dict[str, Any] = field(default_factory=dict)  # taken_at, camera, gps, width, height


def _open_checked(fp: BinaryIO | Path, max_pixels: int) -> tuple[Image.Image, ImageHeader]:
    """Open lazily and apply every check that can be made before decoding."""
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below; PIL's own bomb check must not fire first.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Only the allowed formats' parsers run: bytes that look like another format (IPTC,
            # EPS, ...) are no supported image (415), and exotic decoders never see client data.
            img = Image.open(fp, formats=_OPENERS)
    except UnidentifiedImageError:
        if _looks_like_image(_head(fp)):
            raise CorruptImage("image header could not be read (truncated or damaged)") from None
        raise NotAnImage(f"not an image in a supported format ({FORMAT_NAMES})") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptImage(f"image header could not be read: {exc}") from None
    fmt = img.format or ""
    if fmt not in ALLOWED_FORMATS:
        raise NotAnImage(f"image format {fmt or 'unknown'} is not supported")
    width, height = img.size
    if width <= 0 or height <= 0:
        raise CorruptImage("image has no pixels")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block must not sink an otherwise good image
        orientation = 1
    if not isinstance(orientation, int) or not 1 <= orientation <= 8:
        orientation = 1
    upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    photo = photo_fields(img, *upright)
    return img, ImageHeader(fmt, MIME_BY_FORMAT[fmt], width, height, orientation, img.mode, photo)


def probe_image(source: bytes | Path | BinaryIO, *, max_pixels: int) -> ImageHeader:
    """The checks of `decode_image` that need only the header (format, size limit, EXIF);
    raises the same errors. The pixels are not decoded, so a damaged body passes here."""
    fp: BinaryIO | Path = io.BytesIO(source) if isinstance(source, bytes) else source
    img, header = _open_checked(fp, max_pixels)
    img.close()
    return header


def decode_image(
    source: bytes | Path | BinaryIO, *, max_pixels: int, draft_px: int | None = None
) -> DecodedImage:
    """Decode to upright RGB. `draft_px` lets JPEG decode at a reduced scale that still
    covers that many pixels on the short side (much faster for large photos)."""
    fp: BinaryIO | Path = io.BytesIO(source) if isinstance(source, bytes) else source
    img, header = _open_checked(fp, max_pixels)
    fmt, width, height, orientation = header.format, header.width, header.height, header.orientation
    try:
        if draft_px and fmt in ("JPEG", "MPO"):
            scale = min(width, height) / draft_px
            if scale >= 2:
                img.draft("RGB", (max(1, int(width / scale)), max(1, int(height / scale))))
        img.seek(0)  # animated GIF/WebP/TIFF: the first frame
        img.load()
        upright: Image.Image = ImageOps.exif_transpose(img) if orientation != 1 else img
        rgb = _to_rgb(upright)
        rgb.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        raise CorruptImage(f"image is truncated or corrupt: {exc}") from None
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return DecodedImage(rgb, width, height, fmt, header.mime, header.photo)


def make_thumbnail(image: Image.Image, size_px: int, quality: int = 85) -> bytes:
    thumb = image.copy()
    thumb.thumbnail((size_px, size_px), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=quality, optimize=True)
    return out.getvalue()
