"""A data dir's saved FAISS indexes, read without its lock and without the model: `xmodal serve`
starts reading them before it imports torch and open_clip, so that at 1M vectors the read (2.2 GB,
seconds) runs beside those imports and the model's load instead of after them.

Nothing here imports torch: that is what lets the read start first.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from index.store import Kind
from index.vectors import IndexFileError, VectorIndex

if TYPE_CHECKING:
    from models.encoder import Encoder


@contextmanager
def read_only_store(data_dir: Path) -> Iterator[sqlite3.Connection | None]:
    """The data dir's SQLite file opened read-only (so it works beside a running server), or
    None when there is none."""
    path = data_dir / "xmodal.sqlite3"
    if not path.is_file():
        yield None
        return
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        yield db
    finally:
        db.close()


def index_file(data_dir: Path, kind: Kind) -> Path:
    """Where a data dir keeps the saved FAISS index of one kind of item."""
    return data_dir / "indexes" / f"{kind}s.faiss"


@dataclass(frozen=True)
class IndexFiles:
    """A data dir's saved indexes, read before the model is loaded, checked against the model
    fingerprint the data dir records; `Library.open` adopts them only if `fits` the model."""

    fingerprint: str
    dim: int
    images: VectorIndex | None
    texts: VectorIndex | None

    def fits(self, encoder: Encoder) -> bool:
        return self.fingerprint == encoder.fingerprint and self.dim == encoder.dim


def read_index_files(data_dir: Path) -> IndexFiles | None:
    """The saved indexes of a data dir, without its lock: read-only, and files are replaced only
    by a rename. Never raises: what cannot be read here (no file, another model's, a file
    replaced under the read) is read or rebuilt the usual way once the model is loaded."""
    try:
        with read_only_store(data_dir) as db:
            if db is None:
                return None
            rows = db.execute(
                "SELECT key, value FROM meta WHERE key IN ('model_fingerprint', 'dim')"
            ).fetchall()
        meta = dict(rows)
        fingerprint, dim = str(meta["model_fingerprint"]), int(meta["dim"])
    except (sqlite3.Error, KeyError, ValueError, TypeError):
        return None

    def read(kind: Kind) -> VectorIndex | None:
        try:
            return VectorIndex.load(index_file(data_dir, kind), fingerprint=fingerprint, dim=dim)
        except IndexFileError:
            return None

    return IndexFiles(fingerprint, dim, read("image"), read("text"))


def start_reading_index_files(data_dir: Path) -> Future[IndexFiles | None]:
    """`read_index_files` on a thread of its own, started now. A daemon thread: a start that
    fails before it is needed does not wait for it."""
    future: Future[IndexFiles | None] = Future()

    def run() -> None:
        try:
            future.set_result(read_index_files(data_dir))
        except Exception as exc:  # read_index_files never raises; MemoryError might
            future.set_exception(exc)

    threading.Thread(target=run, name="read-index-files", daemon=True).start()
    return future
