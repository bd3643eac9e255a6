"""The readers-writer lock the vector index's searches share."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np

from index.locks import SharedLock
from index.vectors import IndexParams, VectorIndex
from tests.index.test_vectors import DIM, clustered


class Holder:
    """A thread that takes one side of the lock and keeps it until `release()`."""

    def __init__(self, side: Callable[[], AbstractContextManager[None]]) -> None:
        self.entered = threading.Event()
        self._leave = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(side,), daemon=True)
        self._thread.start()

    def _run(self, side: Callable[[], AbstractContextManager[None]]) -> None:
        with side():
            self.entered.set()
            self._leave.wait(10)

    def release(self) -> None:
        self._leave.set()
        self._thread.join(10)


def test_readers_share_and_a_writer_waits_for_them() -> None:
    lock = SharedLock()
    first = Holder(lock.shared)
    assert first.entered.wait(5)
    second = Holder(lock.shared)
    assert second.entered.wait(5), "a second reader waited for the first"
    writer = Holder(lock.exclusive)
    assert not writer.entered.wait(0.3), "a writer went ahead of the readers"
    first.release()
    assert not writer.entered.wait(0.2)
    second.release()
    assert writer.entered.wait(5)
    reader = Holder(lock.shared)
    assert not reader.entered.wait(0.3), "a reader went ahead of a writer"
    writer.release()
    assert reader.entered.wait(5)
    reader.release()


def test_a_waiting_writer_holds_back_new_readers() -> None:
    """Back-to-back searches must not keep a change waiting for ever."""
    lock = SharedLock()
    search = Holder(lock.shared)
    assert search.entered.wait(5)
    writer = Holder(lock.exclusive)
    while not lock._writers_waiting:
        threading.Event().wait(0.01)
    later = Holder(lock.shared)
    assert not later.entered.wait(0.3), "a new reader overtook the waiting writer"
    search.release()
    assert writer.entered.wait(5) and not later.entered.is_set()
    writer.release()
    assert later.entered.wait(5)
    later.release()


def test_searches_run_while_another_search_holds_the_index() -> None:
    index = VectorIndex(DIM, IndexParams(kind="hnsw"))
    index.add(np.arange(1, 201, dtype=np.int64), clustered(200))
    searched = threading.Event()
    with index._lock.shared():  # a search in progress
        thread = threading.Thread(
            target=lambda: (index.search(clustered(1, seed=4), 5), searched.set())
        )
        thread.start()
        assert searched.wait(10), "a search waited for another one"
    thread.join()
