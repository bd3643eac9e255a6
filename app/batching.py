"""Dynamic batching: concurrent requests share one forward pass.

One `DynamicBatcher` per model call. Requests enter a bounded queue as (item, future); one
worker task cuts a batch at `max_batch_size` items or `max_wait_ms` after the first item,
runs the batch function on a dedicated thread (never on the event loop), and resolves every
future. A failed batch fails every future in it. A full queue refuses at once (503). An item
submitted with a deadline (a search query) that queueing has made miss it is refused with 503
when its batch is formed, instead of being computed late.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from app.errors import Overloaded, TooLarge
from app.metrics import BATCH_SIZE, QUEUE_DEPTH, SHED

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


In_contra = TypeVar("In_contra", contravariant=True)


class Batcher(Protocol[In_contra, Out]):
    """What the services need from a model call: `DynamicBatcher` here, or (with
    `xmodal serve --engine ray`) a client of remote replicas that batch themselves."""

    name: str

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def submit(self, item: In_contra) -> Out: ...

    async def submit_many(
        self, items: Sequence[In_contra], *, deadline_s: float | None = None
    ) -> list[Out]: ...


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]
    enqueued: float
    deadline: float | None = None  # monotonic time by which it should be answered
    taken: bool = False  # in a batch that is running


async def wait_for_result(future: asyncio.Future[Out], name: str, timeout_s: float) -> Out:
    """A queued item's result, or 503 `Overloaded` once it waited `timeout_s`. Either way an
    abandoned item's future is cancelled, so whoever runs the batch skips it (a client that went
    away cancels the wait)."""
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout_s)
    except asyncio.TimeoutError:
        future.cancel()
        raise Overloaded(
            f"the {name} request waited over {timeout_s:.0f}s; retry shortly", retry_after_s=2.0
        ) from None
    except asyncio.CancelledError:
        future.cancel()
        raise


class DynamicBatcher(Generic[In, Out]):
    def __init__(
        self,
        name: str,
        fn: Callable[[list[In]], Sequence[Out]],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        request_timeout_s: float = 30.0,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.name = name
        self._fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        # A forward pass's duration, averaged over recent batches (0 before the first).
        self._batch_s = 0.0
        # One thread per batcher: torch parallelises inside the op, not across batches (two
        # one-thread workers measured no better on 2 cores).
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix=f"batch-{name}")
        self._owns_executor = executor is None
        self._queue: asyncio.Queue[_Pending[In, Out]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self.batches_run = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._worker is not None:
            return
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._worker = asyncio.get_running_loop().create_task(
            self._run(), name=f"batcher-{self.name}"
        )

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        if self._queue is not None:
            while not self._queue.empty():
                pending = self._queue.get_nowait()
                if not pending.future.done():
                    pending.future.set_exception(Overloaded("server is shutting down"))
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    # -- request side ----------------------------------------------------------------------
    async def submit(self, item: In, *, deadline_s: float | None = None) -> Out:
        """`deadline_s`: seconds from now within which the result is wanted; an item that
        the queue made miss it is refused (503) rather than computed late (`_too_late`).
        Only for interactive requests: a request of many items waits for its own earlier
        items by design."""
        if self._queue is None:
            raise RuntimeError(f"batcher {self.name} is not started")
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        pending = _Pending(item, future, now, None if deadline_s is None else now + deadline_s)
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise Overloaded(
                f"the {self.name} queue is full ({self.max_queue} waiting); retry shortly",
                retry_after_s=1.0,
            ) from None
        QUEUE_DEPTH.labels(self.name).set(self._queue.qsize())
        if deadline_s is not None:
            try:
                return await asyncio.wait_for(asyncio.shield(future), deadline_s)
            except asyncio.TimeoutError:
                # Still queued at its deadline: refused now, not when a batch reaches it.
                # One in a running batch is nearly done and worth its wait.
                if not pending.taken:
                    self._refuse(pending)
            except asyncio.CancelledError:
                future.cancel()
                raise
        return await wait_for_result(future, self.name, self.request_timeout_s)

    async def submit_many(
        self, items: Sequence[In], *, deadline_s: float | None = None
    ) -> list[Out]:
        """All or nothing: a request that does not fit the queue enqueues none of its items."""
        if self._queue is not None:
            if len(items) > self.max_queue:
                raise TooLarge(
                    f"{len(items)} items exceed the {self.name} queue ({self.max_queue})"
                )
            if self._queue.qsize() + len(items) > self.max_queue:
                raise Overloaded(
                    f"the {self.name} queue is full ({self.max_queue} waiting); retry shortly",
                    retry_after_s=1.0,
                )
        return list(
            await asyncio.gather(*(self.submit(item, deadline_s=deadline_s) for item in items))
        )

    # -- worker side -----------------------------------------------------------------------
    def _record_duration(self, seconds: float) -> None:
        # A moving average over the last few batches: follows a change of load within a
        # second or so, and one odd batch (a first call, a pause) moves it by a fifth.
        self._batch_s = seconds if not self._batch_s else 0.8 * self._batch_s + 0.2 * seconds

    def _too_late(self, pending: _Pending[In, Out]) -> bool:
        """Refuse (503) an item that queueing has made miss its deadline: one more batch would
        end past it. Under overload the queue then holds what can be served in time, and
        clients hear to back off instead of waiting. When the model alone is slower than the
        deadline, only an item that queued a whole batch is refused: that one would have
        waited twice the time a request takes on an idle server."""
        if pending.deadline is None or pending.future.done():
            return False
        now = time.monotonic()
        waited = now - pending.enqueued
        if self._batch_s < pending.deadline - pending.enqueued:
            late = now + self._batch_s > pending.deadline
        else:
            late = waited >= self._batch_s
        if late:
            self._refuse(pending)
        return late

    def _refuse(self, pending: _Pending[In, Out]) -> None:
        if pending.future.done():
            return
        SHED.labels(self.name).inc()
        waited = time.monotonic() - pending.enqueued
        pending.future.set_exception(
            Overloaded(
                f"the {self.name} queue could not answer in time (waited "
                f"{waited * 1000:.0f} ms); retry shortly",
                retry_after_s=1.0,
            )
        )

    async def _collect(self) -> list[_Pending[In, Out]]:
        assert self._queue is not None
        first = await self._queue.get()
        while self._too_late(first):
            first = await self._queue.get()
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                pending = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    pending = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if not self._too_late(pending):
                batch.append(pending)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            assert self._queue is not None
            QUEUE_DEPTH.labels(self.name).set(self._queue.qsize())
            # Requests whose client disconnected (or timed out) are not worth a forward pass.
            live = [p for p in batch if not p.future.done()]
            if not live:
                continue
            for pending in live:
                pending.taken = True
            BATCH_SIZE.labels(self.name).observe(len(live))
            started = time.monotonic()
            try:
                outputs = await loop.run_in_executor(
                    self._executor, self._fn, [p.item for p in live]
                )
                self._record_duration(time.monotonic() - started)
                if len(outputs) != len(live):
                    raise RuntimeError(
                        f"{self.name}: batch function returned {len(outputs)} results "
                        f"for {len(live)} items"
                    )
            except Exception as exc:  # a failed batch fails every request in it
                log.exception("batch %s of %d failed", self.name, len(live))
                for pending in live:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            finally:
                self.batches_run += 1
            for pending, output in zip(live, outputs, strict=True):
                if not pending.future.done():
                    pending.future.set_result(output)
