"""A bounded LRU of stored rows by item id, safe against deletes racing a fill.

A fill is a read of SQLite followed by an insert here; a delete between the two would leave
the deleted row cached. So every invalidation bumps a generation, a reader notes the generation
before its read, and its fill is dropped if any invalidation happened meanwhile. Ids are never
reused and rows are never updated (only added and deleted), so an entry is either the row as
stored or a row deleted since: invalidating on delete, after the commit, is all it needs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Generic, TypeVar

Row = TypeVar("Row")


class RowCache(Generic[Row]):
    def __init__(self, max_items: int) -> None:
        self.max_items = max(0, int(max_items))
        self._rows: OrderedDict[int, Row] = OrderedDict()
        self._lock = threading.Lock()
        self._generation = 0
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_items > 0

    def lookup(self, ids: Iterable[int]) -> tuple[dict[int, Row], list[int], int]:
        """(rows found, ids to read, the generation to pass to `fill` with what was read)."""
        found: dict[int, Row] = {}
        missing: list[int] = []
        with self._lock:
            for item_id in ids:
                row = self._rows.get(item_id)
                if row is None:
                    missing.append(item_id)
                else:
                    self._rows.move_to_end(item_id)
                    found[item_id] = row
            self.hits += len(found)
            self.misses += len(missing)
            return found, missing, self._generation

    def fill(self, rows: dict[int, Row], generation: int) -> None:
        """Keep rows read after `lookup` returned `generation`, unless a delete came since."""
        if not self.enabled or not rows:
            return
        with self._lock:
            if generation != self._generation:
                return
            self._rows.update(rows)
            for item_id in rows:
                self._rows.move_to_end(item_id)
            while len(self._rows) > self.max_items:
                self._rows.popitem(last=False)

    def invalidate(self, ids: Iterable[int]) -> None:
        with self._lock:
            self._generation += 1
            for item_id in ids:
                self._rows.pop(item_id, None)

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._rows.clear()

    def __len__(self) -> int:
        return len(self._rows)
