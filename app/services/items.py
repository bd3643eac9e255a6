"""Adding, listing and deleting images and texts: the one write path of HTTP uploads and of
`xmodal index`. Knows nothing of HTTP.

Write path of an image: streamed to a temp file -> decoded and checked (pixels, format) ->
embedded through the batcher -> file moved into the content-addressed store (fsync) -> row and
embedding committed to SQLite (the acknowledgement point) -> FAISS caught up from the change log.
A crash before the commit leaves no row (a stray temp file, cleaned at start-up); after it, the
row is replayed into FAISS at start-up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anyio import to_thread

from app.errors import (
    InvalidField,
    InvalidImage,
    NotFound,
    StorageError,
    TooLarge,
    UnsupportedMedia,
    storage_error,
)
from app.library import Library
from app.metrics import ITEMS_ADDED
from app.runtime import Backend
from index.media import file_sha256
from index.store import Kind, NewItem, StoredItem
from models.inputs.decode import (
    CorruptImage,
    ImageTooLarge,
    NotAnImage,
    decode_image,
    make_thumbnail,
)

log = logging.getLogger(__name__)


NO_FILE = (
    "image {id} was imported as an embedding without its image file (xmodal import): its "
    "metadata and vector are stored, its content and thumbnail are not"
)


@dataclass
class UploadSource:
    path: Path  # a temp file under the media store's tmp/, removed or moved by the service
    filename: str | None  # the client's name: shown, never used on disk


@dataclass
class PreparedImage:
    source: UploadSource
    sha256: str
    pixels: torch.Tensor
    thumbnail: bytes
    mime: str
    width: int
    height: int
    size: int
    photo: dict[str, Any]  # the reserved fields read from the file (models.inputs.exif)


@dataclass
class AddedItem:
    item: StoredItem
    duplicate: bool


def clean_filename(name: str | None) -> str | None:
    """Keep only the last path component, printable, bounded: a label, never a path."""
    if not name:
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] != "C").strip()
    return base[:255] or None


def prepare_image(library: Library, source: UploadSource) -> PreparedImage:
    """Decode and check one uploaded file (on a worker thread)."""
    limits = library.settings.limits
    sha, size = file_sha256(source.path)
    if size == 0:
        raise InvalidImage(f"{source.filename or 'file'}: the file is empty")
    if size > limits.max_upload_bytes:
        raise TooLarge(
            f"{source.filename or 'file'}: {size} bytes; the limit is {limits.max_upload_bytes}"
        )
    encoder = library.encoder
    label = source.filename or "file"
    try:
        decoded = decode_image(
            source.path,
            max_pixels=limits.max_image_pixels,
            draft_px=max(encoder.image_size, library.settings.thumbnail_px),
        )
    except NotAnImage as exc:
        raise UnsupportedMedia(f"{label}: {exc}") from None
    except CorruptImage as exc:
        raise InvalidImage(f"{label}: {exc}") from None
    except ImageTooLarge as exc:
        raise TooLarge(f"{label}: {exc}") from None
    return PreparedImage(
        source=source,
        sha256=sha,
        pixels=encoder.preprocess_image(decoded.image),
        thumbnail=make_thumbnail(decoded.image, library.settings.thumbnail_px),
        mime=decoded.mime,
        width=decoded.width,
        height=decoded.height,
        size=size,
        photo=decoded.photo,
    )


def with_photo_fields(
    photo: dict[str, Any], metadata: dict[str, Any], *, store_gps: bool
) -> dict[str, Any]:
    """The stored metadata of one image: the fields read from the file (taken_at, camera, gps,
    width, height) under the client's, which win on a conflict. `store_gps` False leaves out
    the position read from the file (a `gps` the client sent itself is kept)."""
    read = {k: v for k, v in photo.items() if store_gps or k != "gps"}
    return {**read, **metadata}


def parse_metadata(raw: str | None, max_bytes: int) -> dict[str, Any]:
    if raw is None or raw.strip() == "":
        return {}
    if len(raw.encode("utf-8", "surrogatepass")) > max_bytes:
        raise TooLarge(f"metadata is larger than {max_bytes} bytes")
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise InvalidField(f"metadata is not valid JSON: {exc}") from None
    return check_metadata(value, max_bytes)


def check_metadata(value: Any, max_bytes: int) -> dict[str, Any]:
    encode_metadata(value, max_bytes)
    return value  # encode_metadata refuses all but a dict


# Compact, non-ASCII kept as is: the form `xmodal import` stores (and the size that is limited).
_COMPACT = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def encode_metadata(value: Any, max_bytes: int) -> str:
    """Metadata as stored: compact JSON text, checked (an object, no NaN, valid Unicode, at
    most `max_bytes` bytes)."""
    if not isinstance(value, dict):
        raise InvalidField("metadata must be a JSON object")
    try:
        text = _COMPACT.encode(value)
        size = len(text.encode("utf-8"))
    except (ValueError, TypeError, UnicodeEncodeError) as exc:  # TypeError: a date, bytes...
        raise InvalidField(f"metadata cannot be stored: {exc}") from None
    if size > max_bytes:
        raise TooLarge(f"metadata is larger than {max_bytes} bytes")
    return text


@dataclass
class ImageToStore:
    """One decoded image on its way into the library; or, from `xmodal import`, an embedding
    whose image bytes are not here (`source` None: no file, no thumbnail; `sha256` is then the
    row's identity, not a content hash)."""

    source: Path | None  # the file to copy (or move) into the media store
    sha256: str
    thumbnail: bytes | None
    mime: str | None
    width: int | None
    height: int | None
    size: int | None
    filename: str | None
    metadata: dict[str, Any]
    # None when the content was already stored (no forward pass spent on it); then `pixels`
    # embeds it after all should its stored twin be deleted before the commit.
    vector: np.ndarray | None
    pixels: torch.Tensor | None = None


def _check_writable(library: Library) -> None:
    """Refuse a write the data dir cannot keep. SQLite goes on writing to a file that was
    removed (its descriptor is still open): that write would be acknowledged and then lost."""
    problem = library.storage_problem()
    if problem is not None:
        raise StorageError(f"{problem}; nothing was changed", retry_after_s=30)


def commit_images(
    library: Library, images: list[ImageToStore], *, move: bool, catch_up: bool = True
) -> list[tuple[StoredItem, bool]]:
    """Store files, thumbnails and rows in one SQLite transaction, the acknowledgement point;
    then catch the FAISS index up. Returns (stored item, created) per image, in order.
    `move`: the sources are temp files of ours (uploads) rather than the user's files.
    `catch_up=False` (bulk import): leave the index to catch up, or rebuild, once at the end."""
    with library.write_lock:
        _check_writable(library)
        unembedded = [i for i in images if i.vector is None]
        if unembedded:
            # A duplicate whose original was deleted since the caller looked needs a vector
            # after all (rare: embedded here, on this worker thread).
            stored = library.store.known_shas("image", [i.sha256 for i in unembedded])
            lost = [i for i in unembedded if i.sha256 not in stored and i.pixels is not None]
            if lost:
                vectors = library.encoder.encode_images(
                    [i.pixels for i in lost if i.pixels is not None]
                )
                for image, vector in zip(lost, vectors, strict=True):
                    image.vector = vector
        try:
            items = []
            for image in images:
                relative = None
                if image.source is not None:
                    relative = library.media.relative_path(image.sha256, image.mime or "")
                    if image.vector is not None:
                        library.media.put_file(image.source, relative, move=move)
                        if image.thumbnail is not None:
                            library.media.put_thumbnail(image.sha256, image.thumbnail)
                items.append(
                    NewItem(
                        kind="image",
                        sha256=image.sha256,
                        # Known content keeps its stored row; this vector is then unused.
                        embedding=image.vector
                        if image.vector is not None
                        else np.zeros(library.encoder.dim, np.float32),
                        metadata=image.metadata,
                        media_path=relative,
                        mime=image.mime,
                        width=image.width,
                        height=image.height,
                        bytes=image.size,
                        filename=image.filename,
                    )
                )
            results = library.store.add_items(items)
        except (OSError, sqlite3.Error) as exc:
            raise storage_error(exc) from exc
    if catch_up:
        library.images.catch_up()
    return results


def commit_texts(
    library: Library, items: list[NewItem], *, catch_up: bool = True
) -> list[tuple[StoredItem, bool]]:
    """Texts' rows in one transaction, then the FAISS index caught up."""
    with library.write_lock:
        _check_writable(library)
        try:
            results = library.store.add_items(items)
        except (OSError, sqlite3.Error) as exc:
            raise storage_error(exc) from exc
    if catch_up:
        library.texts.catch_up()
    return results


def commit_embeddings(
    library: Library,
    kind: Kind,
    shas: list[str],
    metadata_json: list[str],
    vectors: np.ndarray,
    texts: list[str | None] | None = None,
) -> np.ndarray:
    """Rows without files (`xmodal import`), in one transaction: (sha256, metadata as checked
    JSON text, normalised vector, text) per row. Returns which rows were created; the index
    is left to the caller, which catches it up (or rebuilds it) once at the end."""
    with library.write_lock:
        _check_writable(library)
        try:
            return library.store.add_embeddings(kind, shas, metadata_json, vectors, texts)
        except (OSError, sqlite3.Error) as exc:
            raise storage_error(exc) from exc


async def add_images(
    backend: Backend, sources: list[UploadSource], metadata: dict[str, Any]
) -> list[AddedItem]:
    """All-or-nothing: if any file is bad, nothing of the request is stored."""
    library = backend.library
    try:
        prepared: list[PreparedImage] = []
        for source in sources:
            prepared.append(await to_thread.run_sync(prepare_image, library, source))
        known = await to_thread.run_sync(
            library.store.known_shas, "image", [p.sha256 for p in prepared]
        )
        fresh = {p.sha256: p for p in prepared if p.sha256 not in known}
        embedded = await backend.image_encoder.submit_many([p.pixels for p in fresh.values()])
        vectors = dict(zip(fresh.keys(), embedded, strict=True))
        images = [
            ImageToStore(
                source=p.source.path,
                sha256=p.sha256,
                thumbnail=p.thumbnail,
                mime=p.mime,
                width=p.width,
                height=p.height,
                size=p.size,
                filename=clean_filename(p.source.filename),
                metadata=with_photo_fields(p.photo, metadata, store_gps=library.settings.store_gps),
                vector=vectors.get(p.sha256),
                pixels=None if p.sha256 in vectors else p.pixels,
            )
            for p in prepared
        ]
        results = await to_thread.run_sync(lambda: commit_images(library, images, move=True))
    finally:
        for source in sources:
            source.path.unlink(missing_ok=True)
    backend.after_write()
    ITEMS_ADDED.labels("image").inc(sum(1 for _, new in results if new))
    return [AddedItem(item, not new) for item, new in results]


def text_sha256(text: str) -> str:
    """The content address of a text: identical texts are stored once."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def checked_text(text: str, max_chars: int, what: str = "text") -> str:
    """Reject what cannot be encoded or searched: empty, too long, invalid Unicode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidField(f"{what} is not valid Unicode (lone surrogate)") from None
    # the length as sent (what the schema's maxLength states), then the content
    if len(text) > max_chars:
        raise InvalidField(f"{what} is longer than {max_chars} characters")
    cleaned = text.strip()
    if not cleaned:
        raise InvalidField(f"{what} is empty")
    return cleaned


async def add_texts(backend: Backend, entries: list[tuple[str, dict[str, Any]]]) -> list[AddedItem]:
    limits = backend.settings.limits
    if len(entries) > limits.max_texts_per_request:
        # a bound the schema states (maxItems): a field error like any other
        raise InvalidField(f"items: at most {limits.max_texts_per_request} texts per request")
    cleaned = [
        (
            checked_text(text, limits.max_query_chars),
            check_metadata(meta, limits.max_metadata_bytes),
        )
        for text, meta in entries
    ]
    vectors = await backend.text_encoder.submit_many([text for text, _ in cleaned])
    items = [
        NewItem(kind="text", sha256=text_sha256(text), embedding=vec, metadata=meta, text=text)
        for (text, meta), vec in zip(cleaned, vectors, strict=True)
    ]
    results = await to_thread.run_sync(commit_texts, backend.library, items)
    backend.after_write()
    ITEMS_ADDED.labels("text").inc(sum(1 for _, new in results if new))
    return [AddedItem(item, not new) for item, new in results]


def _delete(library: Library, kind: Kind, item_id: int) -> StoredItem:
    with library.write_lock:
        _check_writable(library)
        try:
            item = library.store.delete(kind, item_id)
        except sqlite3.Error as exc:
            raise storage_error(exc) from exc
        if item is None:
            raise NotFound(f"no {kind} with id {item_id}")
        if item.media_path:
            library.media.remove(item.media_path, item.sha256)
    (library.images if kind == "image" else library.texts).catch_up()
    return item


async def delete_item(backend: Backend, kind: Kind, item_id: int) -> None:
    await to_thread.run_sync(_delete, backend.library, kind, item_id)
    backend.after_write()


async def get_item(backend: Backend, kind: Kind, item_id: int) -> StoredItem:
    item = await to_thread.run_sync(backend.library.store.get, kind, item_id)
    if item is None:
        raise NotFound(f"no {kind} with id {item_id}")
    return item


@dataclass
class Page:
    items: list[StoredItem]
    next_after: int | None  # the cursor of the next page; None on the last one
    total: int


async def list_items(
    backend: Backend, kind: Kind, *, after: int, limit: int, newest_first: bool = False
) -> Page:
    store = backend.library.store
    rows = await to_thread.run_sync(
        lambda: store.list_items(kind, after_id=after, limit=limit, newest_first=newest_first)
    )
    # The live vectors of the kind's index, caught up with every acknowledged write: a
    # COUNT(*) reads the whole kind under the store's lock (~0.5 s at 10M rows, warm).
    total = len(backend.library.images if kind == "image" else backend.library.texts)
    return Page(rows, rows[-1].id if len(rows) == limit else None, total)
