"""Room to grow for FAISS's in-memory arrays, made while searches go on.

FAISS keeps an index's vectors, graph and id map in std::vectors. An add that outgrows one
reallocates it, and an add must exclude searches: at 1M 512-d vectors the first add after a
load copied 2 GB of vectors (1.5-3.8 s measured) while every search waited. Here the larger
array is allocated and filled beside the old one while searches keep reading the old one; only
swapping the two, a few pointers, needs the searches out of the way. An add that outgrows the
room anyway (a graph node drawn at an unusually high level) falls back to FAISS's own growth:
slower, never wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

_faiss: Any = faiss  # the arrays' wrappers are missing from its type hints

# Room made at each growth, as a share of the vectors held (at least MIN_ROOM vectors): each
# growth copies the whole array once, so a 32nd costs 32 vectors' copies per vector added,
# and 3% more memory held in reserve.
GROWTH_SHARE = 1 / 32
MIN_ROOM = 1024


@dataclass
class _Array:
    name: str
    holder: Any  # a std::vector wrapper, or a faiss MaybeOwnedVector around one
    per_vector: int  # elements one more vector takes

    @property
    def vector(self) -> Any:
        return self.holder.owned_data if hasattr(self.holder, "owned_data") else self.holder


def _arrays(index: Any) -> list[_Array]:
    """The arrays of an IndexIDMap2 around a flat or HNSW index that grow with each vector.
    IVF lists grow one list at a time, in small pieces: nothing to do for them."""
    arrays = [_Array("id_map", index.id_map, 1)]
    inner: Any = _faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexHNSW):
        graph: Any = inner.hnsw
        flat = _faiss.downcast_index(inner.storage)
        # a node has 2M neighbour slots on level 0 and M on each level above; one node in M
        # reaches level 1, so 3M a node leaves room enough but for the rare higher ones
        arrays += [
            _Array("neighbors", graph.neighbors, graph.nb_neighbors(0) + graph.nb_neighbors(1)),
            _Array("offsets", graph.offsets, 1),
            _Array("levels", graph.levels, 1),
        ]
        if hasattr(flat, "codes") and getattr(flat.codes, "is_owned", True):
            arrays.append(_Array("codes", flat.codes, flat.code_size))
    elif isinstance(inner, faiss.IndexFlatCodes) and getattr(inner.codes, "is_owned", True):
        arrays.append(_Array("codes", inner.codes, inner.code_size))
    return arrays


@dataclass
class Headroom:
    """What this process knows of an index's arrays' capacity (FAISS does not say): an array
    it has not grown is taken as full, as a freshly loaded or built one is."""

    capacity: dict[str, int] = field(default_factory=dict)

    def prepare(self, index: Any, adding: int) -> Callable[[], None] | None:
        """Make room for `adding` more vectors without touching the index: copies of the arrays
        that lack it, with room to spare. Returns what installs them, to be called with
        searches excluded, or None if every array has the room. Call with changes excluded."""
        grown: list[tuple[_Array, Any]] = []
        for array in _arrays(index):
            vector = array.vector
            size = int(vector.size())
            needed = size + adding * array.per_vector
            if needed <= self.capacity.get(array.name, size):
                continue
            room = max(MIN_ROOM, int(index.ntotal * GROWTH_SHARE), adding) * array.per_vector
            bigger = type(vector)()
            bigger.resize(size + room)  # zero-filled: the memory is committed now, not later
            if size:
                np.copyto(
                    faiss.rev_swig_ptr(bigger.data(), size), faiss.rev_swig_ptr(vector.data(), size)
                )
            bigger.resize(size)  # shrinking keeps the capacity
            grown.append((array, bigger))
            self.capacity[array.name] = size + room
        if not grown:
            return None

        def install() -> None:
            for array, bigger in grown:
                array.vector.swap(bigger)  # `bigger` now holds the old array, freed with it
                if array.holder is not array.vector:
                    # a MaybeOwnedVector caches the data pointer: resizing to the same size
                    # points it at the swapped-in array
                    array.holder.resize(int(array.vector.size()))

        return install

    def forget(self) -> None:
        """After a change FAISS may have made behind this record's back."""
        self.capacity.clear()
