"""Everything the service holds while it runs, built in the lifespan and closed after it.

Loading happens in the background after the server starts listening, so /healthz answers at
once and /readyz says 503 until the model is warm and the indexes are loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from anyio import to_thread

from app.batching import DynamicBatcher
from app.config import Settings
from app.errors import ModelMismatch, NotReady
from app.metrics import INDEX_SIZE
from app.services import model_calls
from index.manager import CollectionPolicy, IndexedCollection
from index.media import MediaStore
from index.store import MetadataStore
from index.vectors import IndexParams, set_search_threads
from models.encoder import Encoder
from models.factory import EncoderSpec, load_encoder

log = logging.getLogger(__name__)


class DataDirLocked(RuntimeError):
    """Another xmodal process holds this data dir."""


class DataDirLock:
    """An exclusive flock on DATA_DIR/LOCK: one writer process per data dir."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "LOCK"
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        fh = open(self.path, "a+")  # noqa: SIM115 - held for the life of the process
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise DataDirLocked(
                f"{self.path.parent} is in use by another xmodal process (a running server?). "
                "Stop it, or send the work to it over HTTP (xmodal index/search --url URL)."
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh

    @property
    def held(self) -> bool:
        return self._fh is not None

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def encoder_spec(settings: Settings) -> EncoderSpec:
    m = settings.model
    return EncoderSpec(
        name=m.name,
        pretrained=m.pretrained,
        checkpoint=m.checkpoint,
        device=m.device,
        precision=m.precision,
        cache_dir=m.cache_dir,
    )


def collection_policy(settings: Settings) -> CollectionPolicy:
    ix = settings.index
    return CollectionPolicy(
        kind=None if ix.kind == "auto" else ix.kind,
        exact_max=ix.exact_max,
        hnsw_max=ix.hnsw_max,
        params=IndexParams(
            hnsw_m=ix.hnsw_m,
            hnsw_ef_search=ix.hnsw_ef_search,
            hnsw_ef_construction=ix.hnsw_ef_construction,
            ivf_nprobe=ix.ivf_nprobe,
        ),
        save_every_changes=ix.save_every_changes,
    )


@dataclass
class Library:
    """The data dir opened for one model: store, media and the two indexed collections."""

    settings: Settings
    encoder: Encoder
    store: MetadataStore
    media: MediaStore
    images: IndexedCollection
    texts: IndexedCollection
    lock: DataDirLock
    # Serialises (media file, SQLite row) pairs of writes against deletes of the same content.
    write_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, settings: Settings, encoder: Encoder, *, lock: bool = True) -> Library:
        data_dir = settings.data_dir
        dir_lock = DataDirLock(data_dir)
        if lock:
            dir_lock.acquire()
        try:
            store = MetadataStore(data_dir / "xmodal.sqlite3")
            media = MediaStore(data_dir)
            if lock:
                # Only the process that owns the data dir may sweep another's uploads.
                media.clean_temp()
                _sweep_after_crash(store, media)
            _check_model(store, encoder, reembed=settings.reembed_on_model_change and lock)
            policy = collection_policy(settings)
            common: dict[str, Any] = {
                "dim": encoder.dim,
                "fingerprint": encoder.fingerprint,
                "policy": policy,
            }
            images = IndexedCollection(
                store, "image", data_dir / "indexes" / "images.faiss", **common
            )
            texts = IndexedCollection(store, "text", data_dir / "indexes" / "texts.faiss", **common)
            library = cls(settings, encoder, store, media, images, texts, dir_lock)
            if store.get_meta("model_fingerprint") != encoder.fingerprint:
                library.reembed_all()
            images.open()
            texts.open()
        except BaseException:
            dir_lock.release()
            raise
        return library

    def reembed_all(self) -> None:
        from app.services.library import reembed_everything

        reembed_everything(self)
        self.store.set_meta("model_fingerprint", self.encoder.fingerprint)
        self.store.set_meta("model_name", self.encoder.name)
        self.store.set_meta("dim", str(self.encoder.dim))
        for path in (self.images.index_path, self.texts.index_path):
            path.unlink(missing_ok=True)

    def save(self) -> None:
        self.images.save()
        self.texts.save()

    def close(self) -> None:
        for collection in (self.images, self.texts):
            collection.wait_for_rebuild()
        self.save()
        if self.lock.held:
            _mark_clean_shutdown(self.store, True)
        self.store.close()
        self.lock.release()


CLEAN_SHUTDOWN = "clean_shutdown"


def _mark_clean_shutdown(store: MetadataStore, clean: bool) -> None:
    # Only a hint for the next start: a full disk must not stop a start or a close over it.
    try:
        store.set_meta(CLEAN_SHUTDOWN, "1" if clean else "0")
    except sqlite3.Error as exc:
        log.warning("could not record the shutdown state (%s); the next start sweeps media", exc)


def _sweep_after_crash(store: MetadataStore, media: MediaStore) -> None:
    """After a crash, remove media files no row points at. Skipped after a clean shutdown,
    since walking every file of a large collection at each start costs seconds."""
    if store.get_meta(CLEAN_SHUTDOWN) != "1" and any(media.media.iterdir()):
        removed = media.sweep_orphans(store.all_shas("image"))
        if removed:
            log.warning("removed %d media files left without a row by an earlier crash", removed)
    _mark_clean_shutdown(store, False)


def _check_model(store: MetadataStore, encoder: Encoder, *, reembed: bool) -> None:
    stored = store.get_meta("model_fingerprint")
    if stored is None or stored == encoder.fingerprint:
        if stored is None:
            store.set_meta("model_fingerprint", encoder.fingerprint)
            store.set_meta("model_name", encoder.name)
            store.set_meta("dim", str(encoder.dim))
        return
    if store.count("image") + store.count("text") == 0:
        return  # nothing embedded yet: adopt the new model (re-embed is a no-op)
    if not reembed:
        raise ModelMismatch(
            f"the data dir was embedded with model {store.get_meta('model_name')} "
            f"(fingerprint {stored}), but the loaded model is {encoder.name} (fingerprint "
            f"{encoder.fingerprint}). Vectors of different models are never mixed: start with "
            "the original model, use another --data-dir, or re-embed everything with "
            "--reembed (XMODAL_REEMBED_ON_MODEL_CHANGE=true)."
        )


class Runtime:
    """The service's state: the library, the batchers, and the readiness flag."""

    def __init__(
        self, settings: Settings, *, on_startup_failure: Callable[[str], None] | None = None
    ) -> None:
        self.settings = settings
        self._on_startup_failure = on_startup_failure
        self.library: Library | None = None
        self.text_batcher: DynamicBatcher[str, np.ndarray] | None = None
        self.image_batcher: DynamicBatcher[torch.Tensor, np.ndarray] | None = None
        self.rerank_batcher: DynamicBatcher[model_calls.RerankJob, np.ndarray] | None = None
        self.ready = False
        self.startup_error: str | None = None
        self.started = time.time()
        self._loader: asyncio.Task[None] | None = None
        self._saver: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start_loading(self, encoder: Encoder | None = None) -> None:
        self._loader = asyncio.get_running_loop().create_task(self._load(encoder))

    async def wait_ready(self) -> None:
        if self._loader is not None:
            await asyncio.shield(self._loader)

    async def _load(self, encoder: Encoder | None) -> None:
        try:
            set_search_threads(self.settings.index.search_threads)
            if encoder is None:
                encoder = await to_thread.run_sync(load_encoder, encoder_spec(self.settings))
            self.library = await to_thread.run_sync(Library.open, self.settings, encoder)
            self._start_batchers(encoder)
            await to_thread.run_sync(self._warm_up, encoder)
            self._saver = asyncio.get_running_loop().create_task(self._save_periodically())
            self._update_gauges()
            self.ready = True
            log.info("ready: %s", self.describe_counts())
        except Exception as exc:
            self.startup_error = f"{type(exc).__name__}: {exc}"
            log.error("start-up failed: %s", self.startup_error)
            if self._on_startup_failure is not None:
                self._on_startup_failure(self.startup_error)

    def _start_batchers(self, encoder: Encoder) -> None:
        b = self.settings.batch
        common: dict[str, Any] = {
            "max_batch_size": b.max_batch_size,
            "max_wait_ms": b.max_wait_ms,
            "max_queue": b.max_queue,
            "request_timeout_s": b.request_timeout_s,
        }
        self.text_batcher = DynamicBatcher(
            "text_encode", partial(model_calls.encode_texts_batch, encoder), **common
        )
        self.image_batcher = DynamicBatcher(
            "image_encode", partial(model_calls.encode_images_batch, encoder), **common
        )
        self.text_batcher.start()
        self.image_batcher.start()
        if encoder.has_reranker:
            self.rerank_batcher = DynamicBatcher(
                "rerank", partial(model_calls.rerank_batch, encoder), **common
            )
            self.rerank_batcher.start()

    def _warm_up(self, encoder: Encoder) -> None:
        size = self.settings.batch.max_batch_size
        started = time.perf_counter()
        encoder.encode_texts(["a photo of a dog"] * size)
        text_s = time.perf_counter() - started
        pixels = torch.zeros(3, encoder.image_size, encoder.image_size)
        started = time.perf_counter()
        encoder.encode_images([pixels] * size)
        image_s = time.perf_counter() - started
        log.info(
            "warm-up at batch %d: %.0f texts/s, %.0f images/s",
            size, size / max(text_s, 1e-9), size / max(image_s, 1e-9),
        )  # fmt: skip

    async def _save_periodically(self) -> None:
        interval = self.settings.index.save_every_s
        while True:
            await asyncio.sleep(min(interval, 5.0))
            library = self.library
            if library is None:
                continue
            try:
                for collection in (library.images, library.texts):
                    await to_thread.run_sync(collection.save_if_due, interval)
            except Exception:
                log.exception("saving an index failed; SQLite still holds every write")

    async def stop(self) -> None:
        self.ready = False
        for task in (self._saver, self._loader):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for batcher in (self.text_batcher, self.image_batcher, self.rerank_batcher):
            if batcher is not None:
                await batcher.stop()
        if self.library is not None:
            await to_thread.run_sync(self.library.close)
            self.library = None

    # -- access ----------------------------------------------------------------------------
    def require(self) -> Library:
        if not self.ready or self.library is None:
            detail = f" (start-up failed: {self.startup_error})" if self.startup_error else ""
            raise NotReady(f"the service is still starting{detail}", retry_after_s=2.0)
        return self.library

    def describe_counts(self) -> dict[str, int]:
        library = self.library
        if library is None:
            return {"images": 0, "texts": 0}
        return {"images": len(library.images), "texts": len(library.texts)}

    def _update_gauges(self) -> None:
        library = self.library
        if library is not None:
            INDEX_SIZE.labels("images").set(len(library.images))
            INDEX_SIZE.labels("texts").set(len(library.texts))

    def after_write(self) -> None:
        self._update_gauges()
