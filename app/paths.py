"""Which files count as images when a folder is given (CLI, bulk indexer, Python client).

Kept free of heavy imports: the client uses it without torch.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".avif", ".heic", ".heif"}
)


def images_under(folder: Path) -> list[Path]:
    """Image files below `folder`, recursively, in a stable (sorted) order."""
    return [
        p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]
