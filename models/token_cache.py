"""A bounded LRU cache of the image tokens CoCa's decoder reads, keyed by the caller.

Re-ranking a text query's top k images needs each candidate's image tokens: without a cache,
every candidate image is decoded from disk and run through the image tower again (for
coca_ViT-B-32 about 8.7 GFLOP per image, the largest share of a re-ranked search on a CPU).
An entry holds the pooled embedding and the tokens, float32: for coca_ViT-B-32 255 x 512
floats + 512, about 0.52 MB; for xmodal-tiny 64 x 128 + 128, about 33 KB.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

import torch

Entry = tuple[torch.Tensor, torch.Tensor]  # pooled [D] (normalised), tokens [P, W]


class TokenCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[Hashable, Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _size(entry: Entry) -> int:
        return sum(t.numel() * t.element_size() for t in entry)

    def get(self, key: Hashable) -> Entry | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: Hashable, pooled: torch.Tensor, tokens: torch.Tensor) -> None:
        entry = (pooled.detach().clone(), tokens.detach().clone())
        size = self._size(entry)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= self._size(old)
            self._items[key] = entry
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= self._size(evicted)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes
