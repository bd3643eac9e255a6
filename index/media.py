"""Content-addressed media on disk: originals under media/, derived thumbnails under thumbs/.

Files are named by their SHA-256, never by a client-given name, and written atomically
(temp file in the same folder, fsync, rename), so a crash leaves either no file or a whole one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

EXTENSION_BY_MIME = {
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/gif": ".gif",
    "image/webp": ".webp",
    "image/bmp": ".bmp",
    "image/tiff": ".tif",
    "image/avif": ".avif",
    "image/heic": ".heic",
}


def file_sha256(path: Path) -> tuple[str, int]:
    """(SHA-256 hex digest, size in bytes) of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MediaStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.media = root / "media"
        self.thumbs = root / "thumbs"
        self.tmp = root / "tmp"
        for folder in (self.media, self.thumbs, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)

    def relative_path(self, sha256: str, mime: str) -> str:
        return f"{sha256[:2]}/{sha256}{EXTENSION_BY_MIME.get(mime, '.bin')}"

    def path_of(self, relative: str) -> Path:
        return self.media / relative

    def thumbnail_path(self, sha256: str) -> Path:
        return self.thumbs / sha256[:2] / f"{sha256}.jpg"

    def new_temp_file(self) -> Path:
        """A fresh file under tmp/ for streaming an upload to disk."""
        fd, name = tempfile.mkstemp(dir=self.tmp, suffix=".upload")
        os.close(fd)
        return Path(name)

    def put_file(self, source: Path, relative: str, *, move: bool = True) -> Path:
        target = self.media / relative
        if target.exists():
            if move:
                source.unlink(missing_ok=True)
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
        os.close(fd)
        try:
            if move and source.parent == self.tmp:
                # Same filesystem: fsync the upload, then rename into place.
                with open(source, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(source, tmp)
            else:
                shutil.copyfile(source, tmp)
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def put_thumbnail(self, sha256: str, data: bytes) -> Path:
        target = self.thumbnail_path(sha256)
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def remove(self, relative: str, sha256: str) -> None:
        (self.media / relative).unlink(missing_ok=True)
        self.thumbnail_path(sha256).unlink(missing_ok=True)

    def sweep_orphans(self, referenced: set[str]) -> int:
        """Remove originals and thumbnails whose SHA-256 is not in `referenced`, and half-written
        `.part` files. A crash between writing a file and committing its row (or between
        committing a delete and removing the file) leaves such files; nothing points at them.
        Call only while no upload can be in flight (at start-up, with the data dir locked)."""
        removed = 0
        for folder in (self.media, self.thumbs):
            for shard in folder.iterdir():
                if not shard.is_dir():
                    continue
                for entry in shard.iterdir():
                    sha = entry.name.split(".", 1)[0]
                    if entry.suffix == ".part" or sha not in referenced:
                        entry.unlink(missing_ok=True)
                        removed += 1
        return removed

    def clean_temp(self) -> int:
        """Remove leftovers of uploads interrupted by a crash."""
        removed = 0
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed
