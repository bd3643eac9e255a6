"""One searchable collection (images or texts): the SQLite rows plus a FAISS cache of them.

The FAISS index is never the truth. It records the store's change sequence number it reflects;
`catch_up()` applies newer changes from the store's change log in order, so an index saved at
any moment, or rebuilt in the background, converges to exactly the store's content.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from index.store import Kind, MetadataStore
from index.vectors import (
    SMALL_FILTER,
    IndexFileError,
    IndexKind,
    IndexParams,
    VectorIndex,
    choose_kind,
)

log = logging.getLogger(__name__)
# IVF-PQ trains on at most this many vectors (FAISS itself samples 256 per list, 1024 lists).
TRAIN_SAMPLE = 300_000
# Changes replayed per step when an index catches up with the store: the step's vectors are read
# into memory (64k x 512-d = 128 MiB), never a whole backlog (10M at once took 20+ GB).
CATCH_UP_CHUNK = 65_536
# A saved index more changes behind the store than this, and than the vectors it holds, is
# rebuilt from the store instead of caught up: a bulk build is faster, and picks the index kind
# for the collection's size (an empty exact index saved before a 10M import would otherwise
# have taken every vector in RAM).
REPLAY_MAX = 50_000


@dataclass
class CollectionPolicy:
    kind: IndexKind | None = None  # None: choose by size
    exact_max: int = 50_000
    hnsw_max: int = 1_000_000
    params: IndexParams | None = None
    # A save is due after this many changes, or this share of the index if more (see `save_due`)
    save_every_changes: int = 1000
    save_share: float = 0.01
    # A save starts no sooner than this many times the last one's duration after it ended.
    save_pace: float = 10.0
    # HNSW keeps deleted vectors as tombstones; rebuild when they pass this share.
    max_tombstone_share: float = 0.2


@dataclass
class SearchHit:
    id: int
    score: float


def save_due(
    policy: CollectionPolicy,
    *,
    size: int,
    changes: int,
    since_save_s: float,
    last_save_s: float,
    max_age_s: float,
) -> bool:
    """Whether to save an index of `size` vectors with `changes` unsaved, `since_save_s` after
    the last save ended, which took `last_save_s`.

    A save only shortens the replay at start-up (SQLite holds every change; ~3 s per 10,000
    changes at 1M vectors), and costs a write of the whole index: 2.2 GB at 1M vectors with
    HNSW, which starved the searches' SQLite reads when it came every 1,000 changes or 60 s.
    So: after `save_every_changes` or `save_share` of the index, whichever is more, or once the
    unsaved changes are `max_age_s` old and at least a tenth of `save_share` of the index (at
    1M vectors, 1,000: a third of a second of replay; 8 changes had a 31 s save of the whole
    index fall into a write load, multiplying the searches' p99 by 3.5-8.6); and never sooner
    after the last save than `save_pace` times its duration, so that saving takes at most
    about 1/save_pace of the disk's time."""
    if changes <= 0 or since_save_s < policy.save_pace * last_save_s:
        return False
    enough = max(policy.save_every_changes, int(size * policy.save_share))
    worth_an_age_save = changes >= size * policy.save_share / 10
    return changes >= enough or (since_save_s >= max_age_s and worth_an_age_save)


class IndexedCollection:
    def __init__(
        self,
        store: MetadataStore,
        kind: Kind,
        index_path: Path,
        *,
        dim: int,
        fingerprint: str,
        policy: CollectionPolicy,
    ) -> None:
        self.store = store
        self.item_kind: Kind = kind
        self.index_path = index_path
        self.dim = dim
        self.fingerprint = fingerprint
        self.policy = policy
        self._index = VectorIndex(dim, self._params_for(0), self._exact_vectors)
        self._catch_up_lock = threading.Lock()
        self._rebuild_thread: threading.Thread | None = None
        self._saved_seq = -1
        self._changes_since_save = 0
        self._last_save = time.monotonic()  # when the last save ended
        self._last_save_s = 0.0  # how long it took
        self._save_soon = False  # a fresh build is in use: its file is worth having now
        self.loaded_from: str = "new"

    # -- start-up --------------------------------------------------------------------------
    def _params_for(self, n: int) -> IndexParams:
        base = self.policy.params or IndexParams()
        kind = self.policy.kind or choose_kind(
            n, exact_max=self.policy.exact_max, hnsw_max=self.policy.hnsw_max
        )
        return replace(base, kind=kind)

    def open(self, preloaded: VectorIndex | None = None) -> None:
        """Load the saved index if it is sound, else rebuild from the store; then catch up.
        `preloaded`: this collection's file, already read and checked against this model."""
        try:
            if preloaded is not None:
                preloaded.exact_vectors = self._exact_vectors
                self._index = preloaded
            else:
                self._index = VectorIndex.load(
                    self.index_path,
                    fingerprint=self.fingerprint,
                    dim=self.dim,
                    exact_vectors=self._exact_vectors,
                )
            self._index.params = self._index.params.searching_like(self._params_for(0))
            self.loaded_from = "file"
            self._saved_seq = self._index.applied_seq
            if self._index.applied_seq > self.store.last_seq():
                # SQLite lost writes the index had seen (a torn WAL tail, a restored backup):
                # the index may hold ids SQLite will hand out again. SQLite is the truth.
                raise IndexFileError(
                    f"{self.index_path} is ahead of SQLite (seq {self._index.applied_seq} > "
                    f"{self.store.last_seq()})"
                )
            behind = self.store.count_changes_since(self.item_kind, self._index.applied_seq)
            if behind > max(REPLAY_MAX, len(self._index)):
                raise IndexFileError(
                    f"{self.index_path} is {behind} changes behind SQLite and holds "
                    f"{len(self._index)} vectors"
                )
        except IndexFileError as exc:
            if self.index_path.exists():
                log.warning("%s; rebuilding the %s index from SQLite", exc, self.item_kind)
            self._index = self._build_from_snapshot()
            self.loaded_from = "rebuilt" if self.index_path.exists() else "store"
            self._save_soon = True  # a build takes minutes at 1M vectors: keep it
        self.catch_up()

    def _build_from_snapshot(self) -> VectorIndex:
        """Build from one consistent read of the store, streamed in chunks: an index that must
        be trained (IVF-PQ) first trains on an even sample of at most TRAIN_SAMPLE vectors, so
        no more than a chunk of raw vectors is ever held besides the index itself."""
        started = time.monotonic()
        with self.store.read_snapshot() as snap:
            n = snap.count(self.item_kind)
            index = VectorIndex(self.dim, self._params_for(n), self._exact_vectors, n_hint=n)
            if n and not index.is_trained:
                every = max(1, n // TRAIN_SAMPLE)
                sample = [v for _, v in snap.chunks(self.item_kind, every=every)]
                index.train(np.concatenate(sample))
                del sample
            for ids, vectors in snap.chunks(self.item_kind):
                index.add(ids, vectors, searched=False)
            index.applied_seq = snap.seq
        log.info(
            "built %s index (%s) over %d vectors in %.1fs",
            self.item_kind, index.kind, len(index), time.monotonic() - started,
        )  # fmt: skip
        return index

    def _exact_vectors(self, ids: np.ndarray) -> np.ndarray:
        found = self.store.embeddings_for(self.item_kind, [int(i) for i in ids])
        # an id deleted meanwhile scores -inf-like (zero vector) and sorts last
        zero = np.zeros(self.dim, dtype=np.float32)
        return np.stack([found.get(int(i), zero) for i in ids])

    # -- keeping up with the store ---------------------------------------------------------
    def catch_up(self) -> int:
        """Apply the store's changes after the index's sequence number. Returns how many."""
        with self._catch_up_lock:
            index = self._index
            applied = _apply_changes(self.store, self.item_kind, index)
            self._changes_since_save += applied
        if applied:
            self._maybe_rebuild_in_background()
        return applied

    @property
    def needs_save(self) -> bool:
        return self._index.applied_seq != self._saved_seq

    def save(self) -> bool:
        if not self.needs_save:
            return False
        index = self._index
        seq = index.applied_seq
        started = time.monotonic()
        index.save(self.index_path, fingerprint=self.fingerprint)
        self._saved_seq = seq
        self._changes_since_save = 0
        self._save_soon = False
        self._last_save = time.monotonic()
        self._last_save_s = self._last_save - started
        return True

    def save_if_due(self, max_age_s: float) -> bool:
        """Save if `save_due` says so, or a fresh build is in use (still paced)."""
        if not self.needs_save:
            return False
        since = time.monotonic() - self._last_save
        # needs_save: at least one change, counted or not (an index built from the store)
        changes = max(self._changes_since_save, 1)
        due = save_due(
            self.policy,
            size=len(self._index),
            changes=1 << 62 if self._save_soon else changes,
            since_save_s=since,
            last_save_s=self._last_save_s,
            max_age_s=max_age_s,
        )
        if not due or not self.save():
            return False
        log.info(
            "saved the %s index (%d vectors, %d changes) in %.1f s; the next save no sooner "
            "than %.0f s from now",
            self.item_kind, len(self._index), changes, self._last_save_s,
            self.policy.save_pace * self._last_save_s,
        )  # fmt: skip
        return True

    # -- background rebuild ----------------------------------------------------------------
    def _rebuild_reason(self) -> str | None:
        index = self._index
        live = len(index)
        wanted = self._params_for(live).kind
        if wanted != index.kind:
            return f"{live} vectors call for {wanted} (now {index.kind})"
        total = live + index.tombstones
        if index.tombstones and index.tombstones / max(total, 1) > self.policy.max_tombstone_share:
            return f"{index.tombstones} of {total} vectors are deleted"
        return None

    def _maybe_rebuild_in_background(self) -> None:
        reason = self._rebuild_reason()
        if reason is None or (self._rebuild_thread and self._rebuild_thread.is_alive()):
            return
        log.info("rebuilding the %s index in the background: %s", self.item_kind, reason)
        self._rebuild_thread = threading.Thread(
            target=self.rebuild, name=f"rebuild-{self.item_kind}", daemon=True
        )
        self._rebuild_thread.start()

    def rebuild(self) -> None:
        """Build a fresh index from a store snapshot without blocking searches or writes,
        then catch it up with the changes made meanwhile and swap it in."""
        fresh = self._build_from_snapshot()
        with self._catch_up_lock:
            _apply_changes(self.store, self.item_kind, fresh)
            self._index = fresh
            self._save_soon = True

    def wait_for_rebuild(self, timeout: float | None = None) -> None:
        thread = self._rebuild_thread
        if thread is not None:
            thread.join(timeout)

    # -- queries ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._index)

    @property
    def index_kind(self) -> str:
        return self._index.kind

    @property
    def is_trained(self) -> bool:
        """False for an IVF index that has not seen vectors yet (it can only be rebuilt)."""
        return self._index.is_trained

    def info(self) -> dict[str, Any]:
        index = self._index
        return {
            "type": index.kind,
            "size": len(index),
            "tombstones": index.tombstones,
            "seq": index.applied_seq,
            "loaded_from": self.loaded_from,
        }

    def search(
        self, queries: np.ndarray, k: int, *, filter_: dict[str, Any] | None = None
    ) -> list[list[SearchHit]]:
        allowed = None if not filter_ else self.store.filter_ids(self.item_kind, filter_)
        allowed_vectors = None
        index = self._index
        # IVF-PQ keeps no raw vectors in memory: a small filter's vectors come from the store
        if allowed is not None and 0 < len(allowed) <= SMALL_FILTER and index.kind == "ivfpq":
            found = self.store.embeddings_for(self.item_kind, [int(i) for i in allowed])
            allowed = np.fromiter(found.keys(), dtype=np.int64, count=len(found))
            allowed_vectors = (
                np.stack(list(found.values())) if found else np.zeros((0, self.dim), np.float32)
            )
        k_eff = max(1, min(k, len(index) if allowed is None else len(allowed)))
        scores, ids = index.search(queries, k_eff, allowed, allowed_vectors)
        return [
            [SearchHit(int(i), float(s)) for s, i in zip(row_s, row_i, strict=True) if i >= 0]
            for row_s, row_i in zip(scores, ids, strict=True)
        ]


def _apply_changes(store: MetadataStore, kind: Kind, index: VectorIndex) -> int:
    """Every change after the index's sequence number, CATCH_UP_CHUNK at a time. Returns how
    many."""
    applied = 0
    while step := _apply_some_changes(store, kind, index, CATCH_UP_CHUNK):
        applied += step
    return applied


def _apply_some_changes(store: MetadataStore, kind: Kind, index: VectorIndex, limit: int) -> int:
    changes = store.changes_since(kind, index.applied_seq, limit)
    if not changes:
        return 0
    # Net effect per id, in sequence order: ids are never reused, so an id is added at most
    # once and deleted at most once.
    added: list[int] = []
    deleted: set[int] = set()
    for change in changes:
        if change.op == "add":
            added.append(change.item_id)
        else:
            deleted.add(change.item_id)
    to_add = [i for i in added if i not in deleted]
    vectors = store.embeddings_for(kind, to_add)
    ids = [i for i in to_add if i in vectors]
    if ids:
        index.add(np.asarray(ids, dtype=np.int64), np.stack([vectors[i] for i in ids]))
    # Deleted ids that were added before this batch of changes are in the index already.
    stale = [i for i in deleted if i not in set(added)]
    if stale:
        index.remove(np.asarray(stale, dtype=np.int64))
    index.applied_seq = changes[-1].seq
    return len(changes)
