"""The service's life: loading in the background, readiness, the batchers, periodic saves.

Loading happens after the server starts listening, so /healthz answers at once and /readyz
says 503 until the model is warm and the indexes are loaded. Once ready, every request gets
one `Backend`: the open library and its batchers, complete by construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from anyio import to_thread

from app.batching import Batcher, DynamicBatcher
from app.config import Settings
from app.errors import NotReady
from app.library import Library, with_remembered_model
from app.metrics import FILTER_CACHE, INDEX_SIZE, ROW_CACHE
from app.query_cache import QueryCache
from app.saved_indexes import IndexFiles, read_index_files
from app.services import forward_passes
from app.services.query_vectors import QueryEncoder
from index.vectors import set_search_threads
from models.encoder import Encoder
from models.factory import EncoderSpec, load_encoder

log = logging.getLogger(__name__)


def encoder_spec(settings: Settings) -> EncoderSpec:
    m = settings.model
    return EncoderSpec(
        name=m.name,
        pretrained=m.pretrained,
        checkpoint=m.checkpoint,
        device=m.device,
        precision=m.precision,
        cache_dir=m.cache_dir,
        text_compile=m.text_compile,
    )


@dataclass(frozen=True)
class Backend:
    """What a request needs once the service is ready: the open library and one batcher per
    model call. `reranker` is None when the loaded model has no re-ranker. `queries` puts the
    query cache in front of `text_encoder`; stored texts go to the batcher itself, so an
    upload of many texts does not push the recent queries out of the cache."""

    library: Library
    text_encoder: Batcher[str, np.ndarray]
    image_encoder: Batcher[torch.Tensor, np.ndarray]
    reranker: Batcher[forward_passes.RerankJob, np.ndarray] | None
    queries: QueryEncoder = field(init=False)

    def __post_init__(self) -> None:
        encoder = self.library.encoder
        # one cache per backend, and the model in every key besides: the same weights at
        # another precision give other vectors
        model = f"{encoder.fingerprint}/{encoder.precision}"
        cache = QueryCache(self.library.settings.cache.query_vectors)
        # frozen: built once here, from the fields above
        object.__setattr__(self, "queries", QueryEncoder(self.text_encoder, cache, model))

    @property
    def settings(self) -> Settings:
        return self.library.settings

    @property
    def encoder(self) -> Encoder:
        return self.library.encoder

    def counts(self) -> dict[str, int]:
        return {"images": len(self.library.images), "texts": len(self.library.texts)}

    def after_write(self) -> None:
        INDEX_SIZE.labels("images").set(len(self.library.images))
        INDEX_SIZE.labels("texts").set(len(self.library.texts))

    async def stop(self) -> None:
        for batcher in (self.text_encoder, self.image_encoder, self.reranker):
            if batcher is not None:
                await batcher.stop()


# Builds the batchers somewhere else than in this process (`app/distributed/serve.py`): given
# the open library, returns a Backend whose batchers are not started yet.
BackendFactory = Callable[[Library], Awaitable[Backend]]


def _yield_cpu(nice: int = 10) -> None:
    """Schedule the calling thread `nice` steps below its process (Linux; elsewhere, or if
    not permitted, it runs as it is)."""
    if hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):
            tid = threading.get_native_id()
            os.setpriority(
                os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice)
            )


class Runtime:
    """The service's state: loading, readiness, and the `Backend` once ready."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_startup_failure: Callable[[str], None] | None = None,
        on_loaded: Callable[[], None] | None = None,
        backend_factory: BackendFactory | None = None,
        index_files: Future[IndexFiles | None] | None = None,
    ) -> None:
        self.settings = settings
        self._index_files = index_files
        self._backend_factory = backend_factory
        self._on_startup_failure = on_startup_failure
        self._on_loaded = on_loaded
        self.backend: Backend | None = None
        self.startup_error: str | None = None
        self._loader: asyncio.Task[None] | None = None
        self._saver: asyncio.Task[None] | None = None
        self._warmer: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.backend is not None

    @property
    def warmed_up(self) -> bool:
        """Ready, and the full-size warm-up after readiness is through the batchers."""
        return self.ready and (self._warmer is None or self._warmer.done())

    def storage_problem(self) -> str | None:
        return None if self.backend is None else self.backend.library.storage_problem()

    # -- lifecycle -------------------------------------------------------------------------
    def start_loading(self, encoder: Encoder | None = None) -> None:
        self._loader = asyncio.get_running_loop().create_task(self._load(encoder))

    async def wait_ready(self) -> None:
        if self._loader is not None:
            await asyncio.shield(self._loader)

    async def wait_warmed_up(self) -> None:
        """Until the full-size warm-up that follows readiness is through the batchers (for
        callers that count the batchers' work)."""
        await self.wait_ready()
        if self._warmer is not None:
            await asyncio.shield(self._warmer)

    async def _load(self, encoder: Encoder | None) -> None:
        library: Library | None = None
        try:
            set_search_threads(self.settings.index.search_threads)
            index_files: IndexFiles | None = None
            if encoder is None:
                # Model options left unset: the model the data dir was embedded with.
                self.settings = with_remembered_model(self.settings)
                # The saved indexes (~5 s at 1M vectors) are read while the model loads, if
                # `xmodal serve` has not started reading them before its imports, checked against
                # the model the data dir records; Library.open checks that it is this one.
                reading: asyncio.Future[IndexFiles | None] = (
                    asyncio.wrap_future(self._index_files)
                    if self._index_files is not None
                    else asyncio.ensure_future(
                        to_thread.run_sync(read_index_files, self.settings.data_dir)
                    )
                )
                try:
                    encoder = await to_thread.run_sync(load_encoder, encoder_spec(self.settings))
                finally:
                    index_files = await reading
            # The data dir (SQLite, the index files unless read above) opens while the model
            # warms up: neither needs the other, and both mostly run outside the GIL.
            opening = asyncio.ensure_future(
                to_thread.run_sync(
                    partial(Library.open, self.settings, encoder, index_files=index_files)
                )
            )
            try:
                if self._backend_factory is None:
                    await to_thread.run_sync(self._warm_up, encoder)
            finally:
                library = await opening
            rows = library.store.rows
            ROW_CACHE.source = lambda: (len(rows), rows.hits, rows.misses)
            filters = library.store.filters
            FILTER_CACHE.source = lambda: (len(filters), filters.hits, filters.misses)
            if self._backend_factory is None:
                backend = self._start_backend(library)
                self._warmer = asyncio.get_running_loop().create_task(
                    self._warm_up_batchers(backend)
                )
            else:  # the forward passes run elsewhere, warmed up there
                backend = await self._backend_factory(library)
                for batcher in (backend.text_encoder, backend.image_encoder, backend.reranker):
                    if batcher is not None:
                        batcher.start()
            self._saver = asyncio.get_running_loop().create_task(self._save_periodically(library))
            backend.after_write()
            if self._on_loaded is not None:
                self._on_loaded()  # before ready: no request waits behind it
            self.backend = backend
            log.info("ready: %s", backend.counts())
        except Exception as exc:
            if library is not None and self.backend is None:
                await to_thread.run_sync(library.close)
            self.startup_error = f"{type(exc).__name__}: {exc}"
            log.error("start-up failed: %s", self.startup_error)
            if self._on_startup_failure is not None:
                self._on_startup_failure(self.startup_error)

    def _start_backend(self, library: Library) -> Backend:
        b = self.settings.batch
        common: dict[str, Any] = {
            "max_batch_size": b.max_batch_size,
            "max_wait_ms": b.max_wait_ms,
            "max_queue": b.max_queue,
            "request_timeout_s": b.request_timeout_s,
        }
        encoder = library.encoder
        reranker = None
        if encoder.has_reranker:
            reranker = DynamicBatcher(
                "rerank", partial(forward_passes.rerank_batch, encoder), **common
            )
        backend = Backend(
            library=library,
            text_encoder=DynamicBatcher(
                "text_encode", partial(forward_passes.encode_texts_batch, encoder), **common
            ),
            image_encoder=DynamicBatcher(
                "image_encode", partial(forward_passes.encode_images_batch, encoder), **common
            ),
            reranker=reranker,
        )
        for batcher in (backend.text_encoder, backend.image_encoder, backend.reranker):
            if batcher is not None:
                batcher.start()
        return backend

    def _warm_up(self, encoder: Encoder) -> None:
        """Before ready: one text and one image, the shapes of the first searches and uploads
        (first calls allocate and pick kernels; a full batch here cost ~6 s of start-up), and,
        when the text tower is compiled, every shape it specialises on, so that no request
        pays a compile."""
        started = time.perf_counter()
        encoder.warm_up_texts(self.settings.batch.max_batch_size)
        compile_s = time.perf_counter() - started
        if compile_s > 1:
            log.info("text tower compiled in %.0f s", compile_s)
        started = time.perf_counter()
        encoder.encode_texts(["a photo of a dog"])
        encoder.encode_images([torch.zeros(3, encoder.image_size, encoder.image_size)])
        log.info("warm-up at batch 1 in %.2fs", time.perf_counter() - started)

    async def _warm_up_batchers(self, backend: Backend) -> None:
        """After ready: a full batch through the batchers, so it takes turns with requests
        (one worker per model call, never two forward passes on the same batcher at once),
        and the throughput is logged. A request meanwhile waits at most this one batch."""
        size = min(self.settings.batch.max_batch_size, max(1, self.settings.batch.max_queue // 2))
        pixels = torch.zeros(3, backend.encoder.image_size, backend.encoder.image_size)
        try:
            started = time.perf_counter()
            await backend.text_encoder.submit_many(["a photo of a dog"] * size)
            text_s = time.perf_counter() - started
            started = time.perf_counter()
            await backend.image_encoder.submit_many([pixels] * size)
            image_s = time.perf_counter() - started
        except Exception as exc:  # busy already, or stopping: the warm-up is only a nicety
            log.info("warm-up at batch %d skipped: %s", size, exc)
            return
        log.info(
            "warm-up at batch %d: %.0f texts/s, %.0f images/s",
            size, size / max(text_s, 1e-9), size / max(image_s, 1e-9),
        )  # fmt: skip

    async def _save_periodically(self, library: Library) -> None:
        interval = self.settings.index.save_every_s
        # Saves run on a thread of their own, scheduled below the requests' threads: at 1M
        # vectors a save serialises and hashes 2.2 GB for half a minute, and searches should
        # not share their cores with it evenly. The file is a cache; it can wait.
        saver = ThreadPoolExecutor(1, thread_name_prefix="index-save", initializer=_yield_cpu)
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(min(interval, 5.0))
                try:
                    for collection in (library.images, library.texts):
                        save = loop.run_in_executor(saver, collection.save_if_due, interval)
                        try:
                            await asyncio.shield(save)
                        except asyncio.CancelledError:
                            # stopping: the save under way ends before the final one starts
                            await asyncio.wait({save})
                            raise
                except Exception:
                    log.exception("saving an index failed; SQLite still holds every write")
        finally:
            saver.shutdown(wait=False)

    async def stop(self) -> None:
        backend, self.backend = self.backend, None
        ROW_CACHE.source = None
        FILTER_CACHE.source = None
        for task in (self._warmer, self._saver, self._loader):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if backend is not None:
            await backend.stop()
            await to_thread.run_sync(backend.library.close)

    # -- access ----------------------------------------------------------------------------
    def require(self) -> Backend:
        if self.backend is None:
            detail = f" (start-up failed: {self.startup_error})" if self.startup_error else ""
            raise NotReady(f"the service is still starting{detail}", retry_after_s=2.0)
        return self.backend
