"""A readers-writer lock: searches share an index, a change has it alone.

FAISS searches only read the index and run in parallel from several threads (they release the
GIL); adding vectors reallocates its storage and must not overlap one. A plain lock made every
search wait for the one before it: at 16 concurrent searches, one core idled while the other
searched. Not re-entrant: code holding either side must not take the lock again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class SharedLock:
    """Any number of holders of `shared()`, or one of `exclusive()`. A writer waiting holds
    back new readers: searches arrive back to back under load and would otherwise keep a
    change (and everything queued behind it) waiting indefinitely."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
