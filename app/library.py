"""The data dir opened for one model: its lock, the SQLite store, the media files and the two
indexed collections (images, texts).

Opening checks the stored model fingerprint against the loaded model (refusing, or re-embedding
everything when asked), and after an unclean shutdown removes media files that no row points
at. The data dir remembers which model it was embedded with (name, pretrained tag or weights
file, checkpoint): `with_remembered_model` fills model options left unset from it. SQLite is the source of truth; the FAISS indexes are caches caught up from its change log.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from app.config import Settings
from app.errors import ModelMismatch
from app.saved_indexes import IndexFiles, index_file, read_only_store
from index.collection import CollectionPolicy, IndexedCollection
from index.media import MediaStore
from index.store import Kind, MetadataStore
from index.vectors import IndexParams
from models.encoder import Encoder
from models.inputs.decode import decode_image

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
            fh.seek(0)
            holder = fh.read().strip()
            fh.close()
            who = f"process {holder}" if holder.isdigit() else "another xmodal process"
            raise DataDirLocked(
                f"{self.path.parent} is in use by {who} (a running server?); see {self.path}. "
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
        save_share=ix.save_share,
        save_pace=ix.save_pace,
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
    def open(
        cls,
        settings: Settings,
        encoder: Encoder,
        *,
        lock: bool = True,
        index_files: IndexFiles | None = None,
    ) -> Library:
        """`index_files`: the saved indexes, read while the model loaded; used if they were
        checked against this model, else read again here."""
        data_dir = settings.data_dir
        dir_lock = DataDirLock(data_dir)
        if lock:
            dir_lock.acquire()
        try:
            # the row cache only where every write passes through this process (it holds the lock)
            rows = settings.cache.result_rows if lock else 0
            store = MetadataStore(
                data_dir / "xmodal.sqlite3",
                row_cache_items=rows,
                filter_cache_ids=settings.cache.filter_ids,
            )
            media = MediaStore(data_dir)
            if lock:
                # Only the process that owns the data dir may sweep another's uploads.
                media.clean_temp()
                _sweep_after_crash(store, media)
            _check_model(store, encoder, reembed=settings.reembed_on_model_change and lock)
            if lock and store.get_meta("model_fingerprint") == encoder.fingerprint:
                # Also records the model of a data dir made before it was remembered.
                _remember_model(store, settings, encoder)
            policy = collection_policy(settings)
            common: dict[str, Any] = {
                "dim": encoder.dim,
                "fingerprint": encoder.fingerprint,
                "policy": policy,
            }
            images = IndexedCollection(store, "image", index_file(data_dir, "image"), **common)
            texts = IndexedCollection(store, "text", index_file(data_dir, "text"), **common)
            library = cls(settings, encoder, store, media, images, texts, dir_lock)
            if store.get_meta("model_fingerprint") != encoder.fingerprint:
                library.reembed_all()
            ahead = index_files if index_files and index_files.fits(encoder) else None
            images.open(ahead.images if ahead else None)
            texts.open(ahead.texts if ahead else None)
        except BaseException:
            dir_lock.release()
            raise
        return library

    def reembed_all(self) -> None:
        _reembed_everything(self)
        self.store.set_meta("model_fingerprint", self.encoder.fingerprint)
        self.store.set_meta("model_name", self.encoder.name)
        self.store.set_meta("dim", str(self.encoder.dim))
        _remember_model(self.store, self.settings, self.encoder)
        for path in (self.images.index_path, self.texts.index_path):
            path.unlink(missing_ok=True)

    def save(self) -> None:
        self.images.save()
        self.texts.save()

    def storage_problem(self) -> str | None:
        """Why writes cannot succeed now, or None. Cheap (a few stat calls): /readyz asks it."""
        db = self.store.path
        try:
            found = os.stat(db)
        except FileNotFoundError:
            return f"{db} is gone: the data dir was removed while the server runs"
        except OSError as exc:
            return f"{db} cannot be reached: {exc}"
        if (found.st_dev, found.st_ino) != self.store.identity:
            return f"{db} was replaced while the server runs"
        for folder in (self.settings.data_dir, self.media.media, self.media.tmp):
            try:
                read_only = os.statvfs(folder).f_flag & os.ST_RDONLY
            except OSError as exc:
                return f"{folder} cannot be reached: {exc}"
            if read_only or not os.access(folder, os.W_OK | os.X_OK):
                return f"{folder} is read-only"
        return None

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
        raise model_mismatch(
            f"{store.get_meta('model_name')} (fingerprint {stored})",
            f"the loaded model is {encoder.name} (fingerprint {encoder.fingerprint})",
        )


def model_mismatch(stored: str, other: str) -> ModelMismatch:
    return ModelMismatch(
        f"the data dir was embedded with model {stored}, but {other}. Vectors of different "
        "models are never mixed: start with the original model, use another --data-dir, or "
        "re-embed everything with --reembed (XMODAL_REEMBED_ON_MODEL_CHANGE=true)."
    )


# -- the remembered model ------------------------------------------------------------------
MODEL_SPEC_KEY = "model_spec"
_SPEC_FIELDS = ("name", "pretrained", "checkpoint")


def _spec_of(settings: Settings) -> dict[str, str | None]:
    """The model options that decide the vectors, with files as absolute paths."""
    m = settings.model
    pretrained = m.pretrained
    if Path(pretrained).is_file():
        pretrained = str(Path(pretrained).resolve())
    checkpoint = str(m.checkpoint.resolve()) if m.checkpoint is not None else None
    return {"name": m.name, "pretrained": pretrained, "checkpoint": checkpoint}


def _remember_model(store: MetadataStore, settings: Settings, encoder: Encoder) -> None:
    """Record the model options the data dir is embedded with, once they are known to be the
    loaded model's (an encoder handed in by a caller may not come from `settings.model`)."""
    spec = _spec_of(settings)
    if spec["checkpoint"] is None and spec["name"] != encoder.name:
        return
    value = json.dumps(spec, sort_keys=True)
    if store.get_meta(MODEL_SPEC_KEY) != value:
        store.set_meta(MODEL_SPEC_KEY, value)


def _describe(spec: dict[str, str | None], fingerprint: str | None = None) -> str:
    """'xmodal-tiny (pretrained none, fingerprint f)' or 'checkpoint PATH (fingerprint f)'."""
    if spec.get("checkpoint"):
        head, details = f"checkpoint {spec['checkpoint']}", []
    else:
        head, details = str(spec.get("name")), [f"pretrained {spec.get('pretrained')}"]
    if fingerprint:
        details.append(f"fingerprint {fingerprint}")
    return f"{head} ({', '.join(details)})" if details else head


def remembered_model(data_dir: Path) -> tuple[dict[str, str | None], bool, str | None] | None:
    """(the model spec a data dir recorded, whether it holds any item, its model fingerprint),
    or None when it has none."""
    try:
        with read_only_store(data_dir) as db:
            if db is None:
                return None
            get = "SELECT value FROM meta WHERE key = ?"
            row = db.execute(get, (MODEL_SPEC_KEY,)).fetchone()
            # not COUNT(*): that reads the whole table (1.1 s at 1M rows from a cold cache)
            holds = bool(db.execute("SELECT EXISTS (SELECT 1 FROM items)").fetchone()[0])
            fingerprint = db.execute(get, ("model_fingerprint",)).fetchone()
        spec = json.loads(row[0]) if row else None
    except (sqlite3.Error, ValueError, TypeError):
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        return None
    stored_fingerprint = str(fingerprint[0]) if fingerprint else None
    return {k: spec.get(k) for k in _SPEC_FIELDS}, holds, stored_fingerprint


def with_remembered_model(settings: Settings) -> Settings:
    """Settings whose model options left unset (flags and XMODAL_MODEL__*) are those the data
    dir recorded. Options given that disagree with it raise the model-mismatch error, before
    any weights are loaded, unless the data dir is still empty or re-embedding is asked for."""
    found = remembered_model(settings.data_dir)
    if found is None:
        return settings
    stored, holds_items, fingerprint = found
    given = settings.model.model_fields_set & set(_SPEC_FIELDS)
    if given:
        asked = _spec_of(settings)
        disagree = any(asked[f] != stored[f] for f in given) or (
            "checkpoint" not in given and stored["checkpoint"] is not None
        )
        if disagree:
            if not holds_items or settings.reembed_on_model_change:
                return settings  # nothing to keep consistent, or a deliberate change
            raise model_mismatch(
                _describe(stored, fingerprint), f"the options ask for {_describe(asked)}"
            )
    update: dict[str, str | Path | None] = {f: stored[f] for f in _SPEC_FIELDS if f not in given}
    if update.get("checkpoint") is not None:
        update["checkpoint"] = Path(str(update["checkpoint"]))
    model = settings.model.model_copy(update=update)
    return settings.model_copy(update={"model": model})


def _reembed_everything(library: Library, batch: int = 64) -> None:
    """Re-embed every stored image and text with the loaded model (after a model change)."""
    encoder = library.encoder
    store = library.store
    log.warning("re-embedding the whole collection with %s", encoder.name)
    kinds: tuple[Kind, ...] = ("image", "text")
    for kind in kinds:
        after = 0
        while True:
            rows = store.list_items(kind, after_id=after, limit=batch)
            if not rows:
                break
            if kind == "image":
                pixels = []
                for row in rows:
                    if row.media_path is None:
                        raise ModelMismatch(
                            f"image {row.id} was imported as an embedding without its file, so "
                            "it cannot be re-embedded with another model: import it again with "
                            "that model's embeddings into a new data dir"
                        )
                    path = library.media.path_of(row.media_path)
                    decoded = decode_image(path, max_pixels=1 << 62, draft_px=encoder.image_size)
                    pixels.append(encoder.preprocess_image(decoded.image))
                vectors = encoder.encode_images(pixels)
            else:
                vectors = encoder.encode_texts([row.text or "" for row in rows])
            store.replace_embeddings(kind, [r.id for r in rows], vectors)
            after = rows[-1].id
