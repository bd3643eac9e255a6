"""A bounded LRU of query-text vectors, keyed by (model, text as the text encoder gets it).

Invariants: an entry is only ever found under the model it was computed with (the key holds
the model's identity: weights fingerprint and precision), so no model change, re-embed or
second backend in the process can be answered with another model's vector. Stored vectors are
read-only copies: a caller that writes into one gets an error instead of corrupting every later
answer. Thread-safe: one lock around the map (the event loop and worker threads may both ask).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from app.metrics import QUERY_CACHE_HITS, QUERY_CACHE_MISSES, QUERY_CACHE_SIZE

Key = tuple[str, str]  # (model identity, text)


class QueryCache:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max(0, int(max_entries))
        self._items: OrderedDict[Key, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def get(self, model: str, text: str) -> np.ndarray | None:
        if not self.enabled:
            return None
        with self._lock:
            vector = self._items.get((model, text))
            if vector is None:
                self.misses += 1
            else:
                self._items.move_to_end((model, text))
                self.hits += 1
        (QUERY_CACHE_MISSES if vector is None else QUERY_CACHE_HITS).inc()
        return vector

    def put(self, model: str, text: str, vector: np.ndarray) -> np.ndarray:
        """Keep a read-only copy of `vector`; returns that copy (or, disabled, `vector`)."""
        if not self.enabled:
            return vector
        frozen = np.array(vector, dtype=np.float32, copy=True)
        frozen.flags.writeable = False
        with self._lock:
            self._items[(model, text)] = frozen
            self._items.move_to_end((model, text))
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
            size = len(self._items)
        QUERY_CACHE_SIZE.set(size)
        return frozen

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
        QUERY_CACHE_SIZE.set(0)

    def __len__(self) -> int:
        return len(self._items)
