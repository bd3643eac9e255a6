"""The metadata store: SQLite in WAL mode, the source of truth for items and embeddings.

Every change (add or delete) takes a row in `changes`, whose sequence number is what the FAISS
indexes record when they are saved: at start-up, changes after that number are replayed.
Ids come from AUTOINCREMENT and are never reused, so a stale id in an index can never point at
a different item.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from index.filter_cache import FilterAnswer, FilterCache
from index.filters import compile_filter, compile_indexed_filter
from index.row_cache import RowCache

log = logging.getLogger(__name__)
Kind = Literal["image", "text"]
# 2: metadata is also kept in `item_meta`, one row per (item, top-level key), indexed, so a
# filter is an index range instead of a scan of every row's JSON. Format 1 is upgraded in place.
FORMAT_VERSION = 2
_UPGRADABLE = (1,)

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
-- Kind, then id (the rowid every index ends with): a page of one kind in id order, or the
-- vectors of one kind streamed for an index build, is a range of this index. Without it SQLite
-- took the (kind, sha256) index and sorted the whole kind: 6.4 s for the first page of photos
-- at 1M items, and 20 GB of temporary sort to build an index at 10M.
CREATE INDEX IF NOT EXISTS items_kind ON items (kind);
-- `value` has no declared type, so it keeps exactly what json_extract returns for the key
-- (integer, real, text, NULL for JSON null, the JSON text of a list or object): comparisons
-- and type ordering are those of the json_extract filters of format 1.
CREATE TABLE IF NOT EXISTS item_meta (
    item_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    value
);
"""
# Apart from the schema so that a bulk import can drop and rebuild them; the schema script runs
# at every open, so an import killed between the two finds them rebuilt on the next open.
_META_INDEXES = (
    ("item_meta_lookup", "item_meta (kind, key, value, item_id)"),
    ("item_meta_item", "item_meta (item_id)"),
)
_SCHEMA += "".join(f"CREATE INDEX IF NOT EXISTS {n} ON {on};\n" for n, on in _META_INDEXES)

# Rows of item_meta for the items whose ids lie in a range (json_each over the stored JSON, so
# the values are SQLite's own reading of it, as json_extract's are): one per top-level key, and
# one per field of a top-level object, named parent + char(31) + child (filters.NESTED_SEPARATOR).
_META_FROM_ITEMS = """
INSERT INTO item_meta (item_id, kind, key, value)
SELECT items.id, items.kind, j.key, j.value FROM items, json_each(items.metadata) AS j
WHERE items.id BETWEEN ?1 AND ?2 AND json_type(items.metadata) = 'object'
  AND instr(j.key, char(31)) = 0
UNION ALL
SELECT items.id, items.kind, j.key || char(31) || c.key, c.value
FROM items, json_each(items.metadata) AS j, json_each(j.value) AS c
WHERE items.id BETWEEN ?1 AND ?2 AND json_type(items.metadata) = 'object'
  AND j.type = 'object' AND instr(j.key, char(31)) = 0 AND instr(c.key, char(31)) = 0
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


# One encoder for every row: json.dumps with options builds a new one per call.
_JSON = json.JSONEncoder(separators=(",", ":"))

_ITEM_COLUMNS = (
    "id, kind, sha256, metadata, created, text, media_path, mime, width, height, bytes, filename"
)


# The columns an item keeps beside its id, creation time, metadata and embedding.
_PLAIN_FIELDS = (
    "kind",
    "sha256",
    "text",
    "media_path",
    "mime",
    "width",
    "height",
    "bytes",
    "filename",
)


def _row_to_item(row: sqlite3.Row) -> StoredItem:
    return StoredItem(
        id=row["id"],
        metadata=json.loads(row["metadata"]),
        created=row["created"],
        **{name: row[name] for name in _PLAIN_FIELDS},
    )


def _stored(item_id: int, item: NewItem, created: float) -> StoredItem:
    return StoredItem(
        id=item_id,
        metadata=item.metadata,
        created=created,
        **{name: getattr(item, name) for name in _PLAIN_FIELDS},
    )


def _rows_in(
    db: sqlite3.Connection, select: str, kind: str, values: list[Any]
) -> Iterator[sqlite3.Row]:
    """Rows of `select` (ending in `IN ({marks})`, its first parameter the kind) for `values`,
    500 to a statement so the parameter count stays under SQLite's limit."""
    for start in range(0, len(values), 500):
        chunk = values[start : start + 500]
        yield from db.execute(select.format(marks=",".join("?" * len(chunk))), (kind, *chunk))


class MetadataStore:
    """Thread-safe access to the SQLite file; one connection guarded by a lock."""

    def __init__(self, path: Path, *, row_cache_items: int = 0, filter_cache_ids: int = 0) -> None:
        """`row_cache_items`: rows `get_many` keeps in memory (0: none). Only for the process
        that makes every write to this file (the data dir's lock holder): another process's
        deletes would not reach this cache. `filter_cache_ids`: ids of recent filters' answers
        `filter_ids` keeps (0: none); they follow the change log, whoever writes."""
        self.path = path
        self.rows: RowCache[StoredItem] = RowCache(row_cache_items)
        self.filters = FilterCache(filter_cache_ids)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        opened = os.stat(path)
        # the file this connection writes: if the path later names another one (or none), the
        # data dir was removed or replaced under us
        self.identity = (opened.st_dev, opened.st_ino)
        # Reads that must not wait for the writer (filters, result rows, vectors for re-scoring)
        # use one read-only connection per thread: WAL lets them read during a write.
        self._readers = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        try:
            # A row holds a ~2 KiB (512-d) embedding: a 4 KiB page fits one, leaving ~40% of
            # the file empty; 8 KiB pages fit three. Only takes effect when the file is created.
            self._db.execute("PRAGMA page_size=8192")
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before we acknowledge it, power loss included.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=10000")
            # Bulk imports insert into three indexes; a bigger cache keeps their pages hot.
            self._db.execute("PRAGMA cache_size=-65536")
            with self._lock:
                version = self.get_meta_if_table("format_version")
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
            if version is not None and int(version) not in (*_UPGRADABLE, FORMAT_VERSION):
                raise StoreVersionError(
                    f"{path} was written with storage format {version}; this xmodal reads "
                    f"format {FORMAT_VERSION} (and upgrades format 1 in place). Use a matching "
                    "xmodal version or a new data dir."
                )
            if (
                version is not None
                and not self._db.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'items_kind'"
                ).fetchone()
            ):
                log.info("adding the index of items by kind (once: ~9 s per million items)")
            self._db.executescript(_SCHEMA)
            if version is None:
                self.set_meta("format_version", str(FORMAT_VERSION))
            elif int(version) < FORMAT_VERSION:
                self._upgrade(int(version))

    def _upgrade(self, version: int) -> None:
        """Format 1 -> 2: fill item_meta from every row's JSON, in one transaction."""
        started = time.monotonic()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("DELETE FROM item_meta")
            self._db.execute(_META_FROM_ITEMS, (0, 1 << 62))
            self._db.execute(
                "UPDATE meta SET value = ? WHERE key = 'format_version'", (str(FORMAT_VERSION),)
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        log.info(
            "upgraded %s from storage format %d to %d in %.1fs",
            self.path, version, FORMAT_VERSION, time.monotonic() - started,
        )  # fmt: skip

    def get_meta_if_table(self, key: str) -> str | None:
        exists = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        return self.get_meta(key) if exists else None

    def _reader(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._readers, "db", None)
        if db is None:
            uri = self.path.resolve().as_uri() + "?mode=ro"
            db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA busy_timeout=10000")
            db.row_factory = sqlite3.Row
            with self._readers_lock:
                self._reader_conns.append(db)
            self._readers.db = db
        return db

    def close(self) -> None:
        self.rows.clear()
        self.filters.clear()
        with self._readers_lock:
            for db in self._reader_conns:
                db.close()
            self._reader_conns.clear()
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
        an item whose (kind, sha256) is already stored (or earlier in `items`) returns the
        existing row. Rows go in with executemany and consecutive ids, so a bulk import of
        thousands of items per call costs a few statements, not a few per item."""
        results: list[tuple[StoredItem, bool]] = []
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                known = self._existing(items)
                last = self._last_id()
                first = last + 1
                rows: list[tuple[Any, ...]] = []
                for item in items:
                    found = known.get((item.kind, item.sha256))
                    if found is not None:
                        results.append((found, False))
                        continue
                    last += 1
                    stored = _stored(last, item, now)
                    known[(item.kind, item.sha256)] = stored
                    results.append((stored, True))
                    vector = np.ascontiguousarray(item.embedding, dtype=np.float32)
                    rows.append(
                        (
                            last,
                            item.kind,
                            item.sha256,
                            item.text,
                            item.media_path,
                            item.mime,
                            item.width,
                            item.height,
                            item.bytes,
                            item.filename,
                            _JSON.encode(item.metadata),
                            now,
                            vector.tobytes(),
                        )
                    )
                if rows:
                    self._db.executemany(
                        "INSERT INTO items (id, kind, sha256, text, media_path, mime, width,"
                        " height, bytes, filename, metadata, created, embedding)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                    self._db.executemany(
                        "INSERT INTO changes (item_id, kind, op) VALUES (?, ?, 'add')",
                        [(row[0], row[1]) for row in rows],
                    )
                    self._db.execute(_META_FROM_ITEMS, (first, last))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return results

    def add_embeddings(
        self,
        kind: Kind,
        shas: list[str],
        metadata_json: list[str],
        vectors: np.ndarray,
        texts: list[str | None] | None = None,
    ) -> np.ndarray:
        """`add_items` for a bulk import, column by column: row i is (shas[i], its metadata as
        JSON text, vectors[i], texts[i]), without files. Skips rows whose sha256 is stored (or
        earlier in the call) and returns which rows were created, as a bool array. No
        `StoredItem` per row and no JSON parse or encode here: at a million rows the per-row
        Python work is what the import's time goes to."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        created = np.zeros(len(shas), dtype=bool)
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seen = self._known(kind, shas)
                fresh: list[int] = []
                for i, sha in enumerate(shas):
                    if sha not in seen:
                        seen.add(sha)
                        fresh.append(i)
                first = self._last_id() + 1
                if fresh:
                    created[fresh] = True
                    # byte slices of one buffer: SQLite reads each as its blob, no copy per row
                    blobs = memoryview(vectors.data).cast("B")
                    width = vectors.shape[1] * 4
                    self._db.executemany(
                        "INSERT INTO items (id, kind, sha256, text, metadata, created, embedding)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            (first + n, kind, shas[i], texts[i] if texts else None,
                             metadata_json[i], now, blobs[i * width : (i + 1) * width])
                            for n, i in enumerate(fresh)
                        ),
                    )  # fmt: skip
                    last = first + len(fresh) - 1
                    # the fresh rows are exactly the ids in first..last: ids are never reused
                    self._db.execute(
                        "INSERT INTO changes (item_id, kind, op) SELECT id, kind, 'add'"
                        " FROM items WHERE id BETWEEN ? AND ? ORDER BY id",
                        (first, last),
                    )
                    self._db.execute(_META_FROM_ITEMS, (first, last))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return created

    @contextmanager
    def bulk_writes(self, rows: int = 0) -> Iterator[None]:
        """Commits of a bulk import with synchronous=NORMAL, made durable together at the end.
        In WAL mode NORMAL loses no commit to a crash of the process (kill -9): the pages are
        in the OS's cache; only a power cut could drop the last ones, and those are not
        acknowledged yet: the import reports its rows only after this has fsynced the WAL and
        the database file, on the way out (errors included).

        When the import brings at least as many `rows` as the store holds, the metadata
        indexes are dropped for its duration and built again at the end: one sort instead of
        a random B-tree insert per key of every row. Filters are not served meanwhile (the
        import holds the data dir)."""
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")
            held = int(self._db.execute("SELECT count(*) FROM items").fetchone()[0])
            rebuild = rows > 0 and rows >= held
            if rebuild:
                for name, _ in _META_INDEXES:
                    self._db.execute(f"DROP INDEX IF EXISTS {name}")
        try:
            yield
        finally:
            with self._lock:
                if rebuild:
                    for name, on in _META_INDEXES:
                        self._db.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {on}")
                self._db.execute("PRAGMA synchronous=FULL")
                for path in (self.path, self.path.with_name(self.path.name + "-wal")):
                    try:
                        fd = os.open(path, os.O_RDONLY)
                    except FileNotFoundError:
                        continue
                    try:
                        os.fsync(fd)  # flushes the file's pages whoever wrote them
                    finally:
                        os.close(fd)

    def _known(self, kind: Kind, shas: list[str]) -> set[str]:
        select = "SELECT sha256 FROM items WHERE kind = ? AND sha256 IN ({marks})"
        return {str(row[0]) for row in _rows_in(self._db, select, kind, shas)}

    def _existing(self, items: list[NewItem]) -> dict[tuple[str, str], StoredItem]:
        out: dict[tuple[str, str], StoredItem] = {}
        by_kind: dict[str, list[str]] = {}
        for item in items:
            by_kind.setdefault(item.kind, []).append(item.sha256)
        select = f"SELECT {_ITEM_COLUMNS} FROM items WHERE kind = ? AND sha256 IN ({{marks}})"
        for kind, shas in by_kind.items():
            for row in _rows_in(self._db, select, kind, shas):
                out[(kind, str(row["sha256"]))] = _row_to_item(row)
        return out

    def _last_id(self) -> int:
        """The largest id ever given (AUTOINCREMENT's record, or the rows themselves)."""
        row = self._db.execute(
            "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'items'), 0),"
            " COALESCE((SELECT MAX(id) FROM items), 0))"
        ).fetchone()
        return int(row[0])

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
                self._db.execute("DELETE FROM item_meta WHERE item_id = ?", (item_id,))
                self._db.execute(
                    "INSERT INTO changes (item_id, kind, op) VALUES (?, ?, 'delete')",
                    (item_id, kind),
                )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            # after the commit, not before: a read between the two would cache the row again
            self.rows.invalidate([item_id])
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
        """The stored items of `kind` among `ids` (an id deleted or of the other kind is left
        out). With the row cache on, items are shared between callers: read, never change."""
        if not ids:
            return {}
        if not self.rows.enabled:
            return self._read_many(kind, ids)
        cached, missing, generation = self.rows.lookup(ids)
        out = {i: item for i, item in cached.items() if item.kind == kind}
        if missing:
            read = self._read_many(kind, missing)
            self.rows.fill(read, generation)
            out.update(read)
        return out

    def _read_many(self, kind: Kind, ids: list[int]) -> dict[int, StoredItem]:
        # `+kind`: without it SQLite (no statistics) walks the (kind, sha256) index over every
        # item of the kind instead of looking the ids up: 180 ms instead of 1 ms at 1M items.
        out: dict[int, StoredItem] = {}
        select = f"SELECT {_ITEM_COLUMNS} FROM items WHERE +kind = ? AND id IN ({{marks}})"
        for row in _rows_in(self._reader(), select, kind, ids):
            out[int(row["id"])] = _row_to_item(row)
        return out

    def known_shas(self, kind: Kind, shas: list[str]) -> set[str]:
        """Which of `shas` are stored: one indexed query per 500."""
        with self._lock:
            return self._known(kind, shas)

    def embedding(self, kind: Kind, item_id: int) -> np.ndarray | None:
        with self._lock:
            row = self._db.execute(
                "SELECT embedding FROM items WHERE id = ? AND kind = ?", (item_id, kind)
            ).fetchone()
        return None if row is None else np.frombuffer(row["embedding"], dtype=np.float32).copy()

    def list_items(
        self, kind: Kind, *, after_id: int = 0, limit: int = 50, newest_first: bool = False
    ) -> list[StoredItem]:
        """A page in id order (ids are never reused, so id order is upload order). `after_id`
        is the last id of the previous page, 0 for the first, in either direction."""
        if newest_first:
            where, order = ("id < ?", "DESC") if after_id > 0 else ("id > ?", "DESC")
        else:
            where, order = "id > ?", "ASC"
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_ITEM_COLUMNS} FROM items WHERE kind = ? AND {where} "
                f"ORDER BY id {order} LIMIT ?",
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
        """Ids of `kind` matching the filter (distinct, in no set order), from the indexed
        `item_meta` table on this thread's read connection: an index range per key, and no wait
        for the writer. With the filter cache on, a filter seen recently costs one read of the
        change log while nothing changed, and a look at the rows changed since otherwise (at
        1M items, `year >= 2020` matched 194k ids in 31 ms; `album IN (3 values)` 29k in 5 ms)."""
        query = compile_indexed_filter(filter_, kind)
        db = self._reader()
        if query is None:
            return self._ids_where(db, "SELECT id FROM items WHERE kind = ?", [kind])
        sql, params = query
        if not self.filters.enabled:
            return self._ids_where(db, sql, params)
        # keys in any order mean the same filter (checked above: JSON values only)
        key = (kind, json.dumps(filter_, sort_keys=True))
        cached = self.filters.get(key)
        # one read transaction: the answer is exactly the one as of `seq`
        db.execute("BEGIN")
        try:
            seq = int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0])
            if cached is not None and cached.seq == seq:
                return cached.ids
            answer = None
            if cached is not None and cached.seq < seq:
                answer = self._caught_up(db, kind, filter_, cached, seq)
            if answer is None:
                answer = FilterAnswer(self._ids_where(db, sql, params), seq)
        finally:
            db.execute("COMMIT")
        self.filters.put(key, answer)
        return answer.ids

    # Past this many changes since a cached answer, it is computed afresh rather than caught up.
    _FILTER_CATCH_UP_MAX = 2000

    def _caught_up(
        self,
        db: sqlite3.Connection,
        kind: Kind,
        filter_: dict[str, Any] | None,
        cached: FilterAnswer,
        seq: int,
    ) -> FilterAnswer | None:
        """`cached` brought to `seq` from the change log: added rows that match join it, deleted
        ids leave it (rows are never updated). None when too much changed for that to pay."""
        changes = db.execute(
            "SELECT item_id, op FROM changes WHERE kind = ? AND seq > ? AND seq <= ? LIMIT ?",
            (kind, cached.seq, seq, self._FILTER_CATCH_UP_MAX + 1),
        ).fetchall()
        if len(changes) > self._FILTER_CATCH_UP_MAX:
            return None
        added = [int(c[0]) for c in changes if c[1] == "add"]
        deleted = [int(c[0]) for c in changes if c[1] == "delete"]
        ids = cached.ids
        if added:
            # an added row still there: the same test as the indexed query (test_meta_filters)
            where, params = compile_filter(filter_)
            matched: list[int] = []
            for start in range(0, len(added), 500):
                chunk = added[start : start + 500]
                rows = db.execute(
                    f"SELECT id FROM items WHERE kind = ? AND {where} "
                    f"AND id IN ({','.join('?' * len(chunk))})",
                    (kind, *params, *chunk),
                )
                matched += [int(row[0]) for row in rows]
            # ids are never reused: these were not in the answer as of `cached.seq`
            ids = np.concatenate([ids, np.asarray(matched, dtype=np.int64)])
        if deleted:
            ids = ids[~np.isin(ids, np.asarray(deleted, dtype=np.int64))]
        return FilterAnswer(ids, seq)

    def filter_ids_by_scan(self, kind: Kind, filter_: dict[str, Any] | None) -> np.ndarray:
        """The same answer by evaluating json_extract on every row (storage format 1's way):
        the reference the indexed path is tested against."""
        where, params = compile_filter(filter_)
        return np.unique(
            self._ids_where(
                self._reader(), f"SELECT id FROM items WHERE kind = ? AND {where}", [kind, *params]
            )
        )

    @staticmethod
    def _ids_where(db: sqlite3.Connection, sql: str, params: list[Any]) -> np.ndarray:
        # One text row parsed by numpy: 200k ids in ~20 ms, where fetching 200k Python rows
        # takes ~100 ms (and holds the GIL throughout).
        row = db.execute(f"SELECT group_concat(id) FROM ({sql})", params).fetchone()
        if row is None or not row[0]:
            return np.zeros(0, dtype=np.int64)
        return np.fromstring(str(row[0]), dtype=np.int64, sep=",")

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

    def changes_since(self, kind: Kind, seq: int, limit: int = -1) -> list[Change]:
        """The kind's changes after `seq`, in order; at most `limit` (-1: all)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, item_id, op FROM changes WHERE kind = ? AND seq > ? ORDER BY seq "
                "LIMIT ?",
                (kind, seq, limit),
            ).fetchall()
        return [Change(int(r["seq"]), int(r["item_id"]), r["op"]) for r in rows]

    def count_changes_since(self, kind: Kind, seq: int) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM changes WHERE kind = ? AND seq > ?", (kind, seq)
            ).fetchone()
        return int(row[0])

    def embeddings_for(self, kind: Kind, ids: list[int]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        select = "SELECT id, embedding FROM items WHERE +kind = ? AND id IN ({marks})"
        for row in _rows_in(self._reader(), select, kind, ids):
            out[int(row["id"])] = np.frombuffer(row["embedding"], dtype=np.float32)
        return out

    @contextmanager
    def read_snapshot(self) -> Iterator[Snapshot]:
        """One read transaction on a separate connection, for reading every vector of a
        collection consistently while writers go on (WAL)."""
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("BEGIN")
            yield Snapshot(db)
        finally:
            if db.in_transaction:
                db.execute("COMMIT")
            db.close()

    def snapshot(self, kind: Kind) -> tuple[int, np.ndarray, np.ndarray]:
        """A consistent (seq, ids, vectors) of every live item of `kind`, all in memory."""
        with self.read_snapshot() as snap:
            parts = list(snap.chunks(kind))
            seq = snap.seq
        if not parts:
            return seq, np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        return seq, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


class Snapshot:
    """What one read transaction sees: the change sequence number and the vectors, streamed in
    chunks so that a collection larger than memory can still be indexed (IVF-PQ at 10M)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.seq = int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0])

    def count(self, kind: Kind) -> int:
        return int(
            self._db.execute("SELECT COUNT(*) FROM items WHERE kind = ?", (kind,)).fetchone()[0]
        )

    def chunks(
        self, kind: Kind, rows: int = 65_536, every: int = 1
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors [m, dim]) in id order; `every` > 1 keeps one id in `every` (a sample)."""
        cursor = self._db.execute(
            "SELECT id, embedding FROM items WHERE kind = ? AND id % ? = 0 ORDER BY id",
            (kind, every),
        )
        while batch := cursor.fetchmany(rows):
            ids = np.fromiter((r[0] for r in batch), dtype=np.int64, count=len(batch))
            vectors = np.frombuffer(b"".join(r[1] for r in batch), dtype=np.float32)
            yield ids, vectors.reshape(len(batch), -1)
