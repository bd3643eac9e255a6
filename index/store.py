"""The metadata store: SQLite in WAL mode, the source of truth for items and embeddings.

Every change (add or delete) takes a row in `changes`, whose sequence number is what the FAISS
indexes record when they are saved: at start-up, changes after that number are replayed.
Ids come from AUTOINCREMENT and are never reused, so a stale id in an index can never point at
a different item.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from index.filters import compile_filter

Kind = Literal["image", "text"]
FORMAT_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('image', 'text')),
    sha256 TEXT NOT NULL,
    text TEXT,
    media_path TEXT,
    mime TEXT,
    width INTEGER,
    height INTEGER,
    bytes INTEGER,
    filename TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    embedding BLOB NOT NULL,
    UNIQUE (kind, sha256)
);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('add', 'delete'))
);
CREATE INDEX IF NOT EXISTS changes_kind_seq ON changes (kind, seq);
"""


class StoreVersionError(RuntimeError):
    """The data dir was written by a format this version cannot read."""


class StoreCorrupt(RuntimeError):
    """The SQLite file cannot be read as a database (header overwritten, not SQLite at all)."""


@dataclass
class NewItem:
    kind: Kind
    sha256: str
    embedding: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    text: str | None = None
    media_path: str | None = None
    mime: str | None = None
    width: int | None = None
    height: int | None = None
    bytes: int | None = None
    filename: str | None = None


@dataclass
class StoredItem:
    id: int
    kind: Kind
    sha256: str
    metadata: dict[str, Any]
    created: float
    text: str | None = None
    media_path: str | None = None
    mime: str | None = None
    width: int | None = None
    height: int | None = None
    bytes: int | None = None
    filename: str | None = None


@dataclass
class Change:
    seq: int
    item_id: int
    op: Literal["add", "delete"]


_ITEM_COLUMNS = (
    "id, kind, sha256, metadata, created, text, media_path, mime, width, height, bytes, filename"
)


def _row_to_item(row: sqlite3.Row) -> StoredItem:
    return StoredItem(
        id=row["id"],
        kind=row["kind"],
        sha256=row["sha256"],
        metadata=json.loads(row["metadata"]),
        created=row["created"],
        text=row["text"],
        media_path=row["media_path"],
        mime=row["mime"],
        width=row["width"],
        height=row["height"],
        bytes=row["bytes"],
        filename=row["filename"],
    )


def _stored(item_id: int, item: NewItem, created: float) -> StoredItem:
    return StoredItem(
        id=item_id,
        kind=item.kind,
        sha256=item.sha256,
        metadata=item.metadata,
        created=created,
        text=item.text,
        media_path=item.media_path,
        mime=item.mime,
        width=item.width,
        height=item.height,
        bytes=item.bytes,
        filename=item.filename,
    )


class MetadataStore:
    """Thread-safe access to the SQLite file; one connection guarded by a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        opened = os.stat(path)
        # the file this connection writes: if the path later names another one (or none), the
        # data dir was removed or replaced under us
        self.identity = (opened.st_dev, opened.st_ino)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before we acknowledge it, power loss included.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=10000")
            with self._lock:
                self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            raise StoreCorrupt(
                f"{path} is not a readable SQLite database ({exc}). It holds every item and "
                f"embedding, so xmodal will not start on it or overwrite it. Restore "
                f"{path.name} (with {path.name}-wal, if any) from a backup, or move the data "
                f"dir aside and start with a new one (then re-index: xmodal index)."
            ) from None
        with self._lock:
            version = self.get_meta("format_version")
            if version is None:
                self.set_meta("format_version", str(FORMAT_VERSION))
            elif int(version) != FORMAT_VERSION:
                raise StoreVersionError(
                    f"{path} was written with storage format {version}; this xmodal reads "
                    f"format {FORMAT_VERSION}. Use a matching xmodal version or a new data dir."
                )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- meta ------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row["value"])

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # -- writes ----------------------------------------------------------------------------
    def add_items(self, items: list[NewItem]) -> list[tuple[StoredItem, bool]]:
        """Insert items in one transaction. Returns (stored item, created) per item, in order;
        an item whose (kind, sha256) is already stored returns the existing row."""
        results: list[tuple[StoredItem, bool]] = []
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for item in items:
                    row = self._db.execute(
                        f"SELECT {_ITEM_COLUMNS} FROM items WHERE kind = ? AND sha256 = ?",
                        (item.kind, item.sha256),
                    ).fetchone()
                    if row is not None:
                        results.append((_row_to_item(row), False))
                        continue
                    vector = np.ascontiguousarray(item.embedding, dtype=np.float32)
                    cur = self._db.execute(
                        "INSERT INTO items (kind, sha256, text, media_path, mime, width, height,"
                        " bytes, filename, metadata, created, embedding)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            item.kind,
                            item.sha256,
                            item.text,
                            item.media_path,
                            item.mime,
                            item.width,
                            item.height,
                            item.bytes,
                            item.filename,
                            json.dumps(item.metadata, separators=(",", ":")),
                            now,
                            vector.tobytes(),
                        ),
                    )
                    item_id = int(cur.lastrowid or 0)
                    self._db.execute(
                        "INSERT INTO changes (item_id, kind, op) VALUES (?, ?, 'add')",
                        (item_id, item.kind),
                    )
                    results.append((_stored(item_id, item, now), True))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return results

    def delete(self, kind: Kind, item_id: int) -> StoredItem | None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    f"SELECT {_ITEM_COLUMNS} FROM items WHERE id = ? AND kind = ?",
                    (item_id, kind),
                ).fetchone()
                if row is None:
                    self._db.execute("ROLLBACK")
                    return None
                self._db.execute("DELETE FROM items WHERE id = ?", (item_id,))
                self._db.execute(
                    "INSERT INTO changes (item_id, kind, op) VALUES (?, ?, 'delete')",
                    (item_id, kind),
                )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        return _row_to_item(row)

    def replace_embeddings(self, kind: Kind, ids: list[int], vectors: np.ndarray) -> None:
        """Overwrite embeddings (re-embedding after a model change)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "UPDATE items SET embedding = ? WHERE id = ? AND kind = ?",
                    [(vectors[i].tobytes(), ids[i], kind) for i in range(len(ids))],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- reads -----------------------------------------------------------------------------
    def get(self, kind: Kind, item_id: int) -> StoredItem | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_ITEM_COLUMNS} FROM items WHERE id = ? AND kind = ?", (item_id, kind)
            ).fetchone()
        return None if row is None else _row_to_item(row)

    def get_many(self, kind: Kind, ids: list[int]) -> dict[int, StoredItem]:
        if not ids:
            return {}
        out: dict[int, StoredItem] = {}
        with self._lock:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for row in self._db.execute(
                    f"SELECT {_ITEM_COLUMNS} FROM items WHERE kind = ? AND id IN ({marks})",
                    (kind, *chunk),
                ):
                    out[int(row["id"])] = _row_to_item(row)
        return out

    def known_shas(self, kind: Kind, shas: list[str]) -> set[str]:
        """Which of `shas` are stored: one indexed query per 500."""
        out: set[str] = set()
        with self._lock:
            for start in range(0, len(shas), 500):
                chunk = shas[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for row in self._db.execute(
                    f"SELECT sha256 FROM items WHERE kind = ? AND sha256 IN ({marks})",
                    (kind, *chunk),
                ):
                    out.add(str(row["sha256"]))
        return out

    def embedding(self, kind: Kind, item_id: int) -> np.ndarray | None:
        with self._lock:
            row = self._db.execute(
                "SELECT embedding FROM items WHERE id = ? AND kind = ?", (item_id, kind)
            ).fetchone()
        return None if row is None else np.frombuffer(row["embedding"], dtype=np.float32).copy()

    def list_items(self, kind: Kind, *, after_id: int = 0, limit: int = 50) -> list[StoredItem]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_ITEM_COLUMNS} FROM items WHERE kind = ? AND id > ? ORDER BY id LIMIT ?",
                (kind, after_id, limit),
            ).fetchall()
        return [_row_to_item(r) for r in rows]

    def count(self, kind: Kind) -> int:
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) AS n FROM items WHERE kind = ?", (kind,))
            return int(row.fetchone()["n"])

    def all_shas(self, kind: Kind) -> set[str]:
        with self._lock:
            rows = self._db.execute("SELECT sha256 FROM items WHERE kind = ?", (kind,)).fetchall()
        return {str(r["sha256"]) for r in rows}

    def filter_ids(self, kind: Kind, filter_: dict[str, Any] | None) -> np.ndarray:
        where, params = compile_filter(filter_)
        with self._lock:
            rows = self._db.execute(
                f"SELECT id FROM items WHERE kind = ? AND {where}", (kind, *params)
            ).fetchall()
        return np.fromiter((r["id"] for r in rows), dtype=np.int64, count=len(rows))

    # -- change log ------------------------------------------------------------------------
    def last_seq(self) -> int:
        """The newest change of any kind (what a collection's applied_seq can be at most)."""
        with self._lock:
            row = self._db.execute("SELECT COALESCE(MAX(seq), 0) AS s FROM changes").fetchone()
        return int(row["s"])

    def snapshot_seq(self, kind: Kind) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(MAX(seq), 0) AS s FROM changes WHERE kind = ?", (kind,)
            ).fetchone()
        return int(row["s"])

    def changes_since(self, kind: Kind, seq: int) -> list[Change]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, item_id, op FROM changes WHERE kind = ? AND seq > ? ORDER BY seq",
                (kind, seq),
            ).fetchall()
        return [Change(int(r["seq"]), int(r["item_id"]), r["op"]) for r in rows]

    def embeddings_for(self, kind: Kind, ids: list[int]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        with self._lock:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for row in self._db.execute(
                    f"SELECT id, embedding FROM items WHERE kind = ? AND id IN ({marks})",
                    (kind, *chunk),
                ):
                    out[int(row["id"])] = np.frombuffer(row["embedding"], dtype=np.float32)
        return out

    def snapshot(self, kind: Kind) -> tuple[int, np.ndarray, np.ndarray]:
        """A consistent (seq, ids, vectors) of every live item of `kind`, read in one read
        transaction on a separate connection, so writers are not blocked meanwhile."""
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("BEGIN")
            seq = int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0])
            rows = db.execute(
                "SELECT id, embedding FROM items WHERE kind = ? ORDER BY id", (kind,)
            ).fetchall()
            db.execute("COMMIT")
        finally:
            db.close()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        if rows:
            vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
            vectors = vectors.reshape(len(rows), -1)
        else:
            vectors = np.zeros((0, 0), dtype=np.float32)
        return seq, ids, vectors
