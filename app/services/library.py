"""Adding, listing and deleting images and texts. Knows nothing of HTTP.

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
    TooLarge,
    UnsupportedMedia,
    storage_error,
)
from app.metrics import ITEMS_ADDED
from app.runtime import Library, Runtime
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
    )


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
    if not isinstance(value, dict):
        raise InvalidField("metadata must be a JSON object")
    try:
        encoded = json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, UnicodeEncodeError) as exc:
        raise InvalidField(f"metadata cannot be stored: {exc}") from None
    if len(encoded) > max_bytes:
        raise TooLarge(f"metadata is larger than {max_bytes} bytes")
    return value


def _commit_images(
    library: Library,
    prepared: list[PreparedImage],
    vectors: dict[str, np.ndarray],
    metadata: dict[str, Any],
) -> list[tuple[int, bool]]:
    items = []
    with library.write_lock:
        # A duplicate whose original was deleted since we looked needs a vector after all
        # (rare: embedded here, on this worker thread, rather than stored as a blank).
        lost = [
            p for p in prepared
            if p.sha256 not in vectors and library.store.find_sha("image", p.sha256) is None
        ]  # fmt: skip
        if lost:
            fresh = library.encoder.encode_images([p.pixels for p in lost])
            vectors = {**vectors, **{p.sha256: v for p, v in zip(lost, fresh, strict=True)}}
        try:
            for p in prepared:
                if p.sha256 not in vectors:
                    continue
                relative = library.media.relative_path(p.sha256, p.mime)
                library.media.put_file(p.source.path, relative)
                library.media.put_thumbnail(p.sha256, p.thumbnail)
            for p in prepared:
                items.append(
                    NewItem(
                        kind="image",
                        sha256=p.sha256,
                        # Known content keeps its stored row; this vector is then unused.
                        embedding=vectors.get(p.sha256, np.zeros(library.encoder.dim, np.float32)),
                        metadata=metadata,
                        media_path=library.media.relative_path(p.sha256, p.mime),
                        mime=p.mime,
                        width=p.width,
                        height=p.height,
                        bytes=p.size,
                        filename=clean_filename(p.source.filename),
                    )
                )
            results = library.store.add_items(items)
        except (OSError, sqlite3.Error) as exc:
            raise storage_error(exc) from exc
    library.images.catch_up()
    return results


async def add_images(
    runtime: Runtime, sources: list[UploadSource], metadata: dict[str, Any]
) -> list[AddedItem]:
    """All-or-nothing: if any file is bad, nothing of the request is stored."""
    library = runtime.require()
    try:
        prepared: list[PreparedImage] = []
        for source in sources:
            prepared.append(await to_thread.run_sync(prepare_image, library, source))
        known = {
            p.sha256
            for p in prepared
            if await to_thread.run_sync(library.store.find_sha, "image", p.sha256) is not None
        }
        fresh = {p.sha256: p for p in prepared if p.sha256 not in known}
        assert runtime.image_batcher is not None
        embedded = await runtime.image_batcher.submit_many([p.pixels for p in fresh.values()])
        vectors = dict(zip(fresh.keys(), embedded, strict=True))
        results = await to_thread.run_sync(_commit_images, library, prepared, vectors, metadata)
    finally:
        for source in sources:
            source.path.unlink(missing_ok=True)
    runtime.after_write()
    ids = [item_id for item_id, _ in results]
    stored = await to_thread.run_sync(library.store.get_many, "image", ids)
    created = sum(1 for _, new in results if new)
    ITEMS_ADDED.labels("image").inc(created)
    return [AddedItem(stored[i], not new) for i, new in results]


def text_sha256(text: str) -> str:
    """The content address of a text: identical texts are stored once."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def normalise_text(text: str, max_chars: int, what: str = "text") -> str:
    """Reject what cannot be encoded or searched: empty, too long, invalid Unicode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidField(f"{what} is not valid Unicode (lone surrogate)") from None
    cleaned = text.strip()
    if not cleaned:
        raise InvalidField(f"{what} is empty")
    if len(cleaned) > max_chars:
        raise InvalidField(f"{what} is longer than {max_chars} characters")
    return cleaned


def _commit_texts(library: Library, items: list[NewItem]) -> list[tuple[int, bool]]:
    with library.write_lock:
        try:
            results = library.store.add_items(items)
        except (OSError, sqlite3.Error) as exc:
            raise storage_error(exc) from exc
    library.texts.catch_up()
    return results


async def add_texts(runtime: Runtime, entries: list[tuple[str, dict[str, Any]]]) -> list[AddedItem]:
    library = runtime.require()
    limits = library.settings.limits
    cleaned = [
        (
            normalise_text(text, limits.max_query_chars),
            check_metadata(meta, limits.max_metadata_bytes),
        )
        for text, meta in entries
    ]
    shas = [text_sha256(text) for text, _ in cleaned]
    assert runtime.text_batcher is not None
    vectors = await runtime.text_batcher.submit_many([text for text, _ in cleaned])
    items = [
        NewItem(kind="text", sha256=sha, embedding=vec, metadata=meta, text=text)
        for (text, meta), sha, vec in zip(cleaned, shas, vectors, strict=True)
    ]
    results = await to_thread.run_sync(_commit_texts, library, items)
    runtime.after_write()
    stored = await to_thread.run_sync(library.store.get_many, "text", [i for i, _ in results])
    ITEMS_ADDED.labels("text").inc(sum(1 for _, new in results if new))
    return [AddedItem(stored[i], not new) for i, new in results]


def _delete(library: Library, kind: str, item_id: int) -> StoredItem:
    with library.write_lock:
        try:
            item = library.store.delete("image" if kind == "image" else "text", item_id)
        except sqlite3.Error as exc:
            raise storage_error(exc) from exc
        if item is None:
            raise NotFound(f"no {kind} with id {item_id}")
        if item.media_path:
            library.media.remove(item.media_path, item.sha256)
    (library.images if kind == "image" else library.texts).catch_up()
    return item


async def delete_item(runtime: Runtime, kind: str, item_id: int) -> None:
    library = runtime.require()
    await to_thread.run_sync(_delete, library, kind, item_id)
    runtime.after_write()


async def get_item(runtime: Runtime, kind: str, item_id: int) -> StoredItem:
    library = runtime.require()
    item = await to_thread.run_sync(
        library.store.get, "image" if kind == "image" else "text", item_id
    )
    if item is None:
        raise NotFound(f"no {kind} with id {item_id}")
    return item


def reembed_everything(library: Library, batch: int = 64) -> None:
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
                    path = library.media.path_of(row.media_path or "")
                    decoded = decode_image(path, max_pixels=1 << 62, draft_px=encoder.image_size)
                    pixels.append(encoder.preprocess_image(decoded.image))
                vectors = encoder.encode_images(pixels)
            else:
                vectors = encoder.encode_texts([row.text or "" for row in rows])
            store.replace_embeddings(kind, [r.id for r in rows], vectors)
            after = rows[-1].id
