"""A bounded LRU of recent filters' answers: the matching ids, and the change the answer is as of.

The store keeps each answer current from its change log instead of dropping it on a write
(`MetadataStore.filter_ids`): rows are only added and deleted, never updated, so an answer as of
change S becomes the answer as of change S' by testing the rows added after S and removing the
ids deleted after S. Bounded by the ids held in all (8 bytes each), not by the entry count: one
broad filter can match most of the collection.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FilterAnswer:
    ids: np.ndarray  # distinct, in no set order; shared between callers: read, never change
    seq: int  # the store's last change when it was exact


class FilterCache:
    def __init__(self, max_ids: int) -> None:
        self.max_ids = max(0, int(max_ids))
        self._answers: OrderedDict[Hashable, FilterAnswer] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_ids > 0

    def get(self, key: Hashable) -> FilterAnswer | None:
        with self._lock:
            answer = self._answers.get(key)
            if answer is None:
                self.misses += 1
            else:
                self.hits += 1
                self._answers.move_to_end(key)
            return answer

    def put(self, key: Hashable, answer: FilterAnswer) -> None:
        """Keep `answer` unless another caller kept a newer one meanwhile. An answer larger
        than the whole budget is not kept at all (it would evict everything else)."""
        if len(answer.ids) > self.max_ids:
            return
        with self._lock:
            old = self._answers.get(key)
            if old is not None:
                if old.seq > answer.seq:
                    return
                self._held -= len(old.ids)
            self._answers[key] = answer
            self._answers.move_to_end(key)
            self._held += len(answer.ids)
            while self._held > self.max_ids:
                _, dropped = self._answers.popitem(last=False)
                self._held -= len(dropped.ids)

    def clear(self) -> None:
        with self._lock:
            self._answers.clear()
            self._held = 0

    def __len__(self) -> int:
        return len(self._answers)
