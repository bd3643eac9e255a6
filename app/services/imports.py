"""Bulk import of precomputed embeddings (`xmodal import`), through the one write path.

Accepted inputs, each a PATH argument:
  * a Parquet file, or a folder of them, with columns `embedding` (list of floats, required),
    `key` (string), `metadata` (a JSON object as a string, or a struct), `image_path` (a local
    file whose bytes become the item's image) and `text` (the row becomes a text item);
  * a folder as clip-retrieval's inference writes it: `img_emb/*.npy` and
    `metadata/*.parquet`, paired by their number and aligned row by row; the metadata columns
    become the item's metadata, `image_path` as above (and as the key when there is no `key`).

Everything is read and checked once before the first row is written (columns, dimension,
finite values, JSON, readable files), so bad input stops the run with nothing imported. The
check pass also notes which rows' JSON text is already in the stored form (compact), so the
commit pass stores those without parsing them again. Rows are then committed a chunk to a
transaction (`commit_embeddings`, `commit_images` for rows with their file), the next chunk
read and prepared on a second thread meanwhile, and the FAISS index is caught up (or rebuilt,
for a large import) once at the end.

Durability: the commits run with synchronous=NORMAL (a crash of the process loses none of
them) and are fsynced together before `import_paths` returns; the command reports rows as
imported only after that. An interrupted import keeps its committed chunks; a rerun skips them.

A row's identity: its content hash when its image file is stored, its text's hash for a text
(as with uploads), else the hash of its `key`, else of its vector. A rerun therefore skips the
rows already stored and resumes an interrupted import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import InvalidField
from app.library import Library
from app.services.items import (
    ImageToStore,
    checked_text,
    commit_embeddings,
    commit_images,
    encode_metadata,
    text_sha256,
)
from index.media import file_sha256
from index.store import Kind
from models.inputs.decode import ImageError, decode_image, make_thumbnail

log = logging.getLogger(__name__)

KNOWN_COLUMNS = ("embedding", "key", "metadata", "image_path", "text")
# Rebuild the index from the store after an import this large, instead of adding row by row.
REBUILD_AFTER = 50_000


class ImportInputError(InvalidField):
    """Input that cannot be imported; the message names the file (and row) and the problem."""


@dataclass
class Chunk:
    """Rows read from one file: embeddings [n, d] and the optional columns, one entry a row."""

    label: str  # file name, for messages
    first_row: int
    embeddings: np.ndarray
    keys: list[str | None]
    # JSON text as read (a string column: parsed only by the check pass) or a dict (a struct
    # column, clip-retrieval's columns); None or "" for none
    metadata: list[str | dict[str, Any] | None]
    image_paths: list[str | None]
    texts: list[str | None]


@dataclass
class ImportReport:
    rows: int = 0
    added: int = 0
    skipped_known: int = 0
    texts_added: int = 0
    without_file: int = 0  # image rows stored without image bytes
    failed: list[tuple[str, str]] = field(default_factory=list)  # image files that did not decode
    check_s: float = 0.0
    import_s: float = 0.0
    index_s: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.import_s if self.import_s else 0.0


# -- reading ---------------------------------------------------------------------------------
def _pa() -> tuple[Any, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa, pq


def _number(path: Path) -> tuple[int, str]:
    found = re.findall(r"\d+", path.stem)
    return (int(found[-1]) if found else -1, path.name)


@dataclass
class _Source:
    parquet: Path
    npy: Path | None = None  # clip-retrieval: the embeddings live here, the parquet is metadata


def _sources(paths: list[Path]) -> list[_Source]:
    out: list[_Source] = []
    for path in paths:
        if path.is_dir() and (path / "img_emb").is_dir():
            npys = sorted((path / "img_emb").glob("*.npy"), key=_number)
            metas = sorted((path / "metadata").glob("*.parquet"), key=_number)
            if not npys:
                raise ImportInputError(f"{path}/img_emb has no .npy files")
            if len(npys) != len(metas):
                raise ImportInputError(
                    f"{path}: {len(npys)} files in img_emb/ but {len(metas)} in metadata/; "
                    "clip-retrieval writes one metadata parquet per embedding file"
                )
            out += [_Source(m, n) for n, m in zip(npys, metas, strict=True)]
        elif path.is_dir():
            files = sorted(path.glob("*.parquet"), key=_number)
            if not files:
                raise ImportInputError(f"{path} has no .parquet files (nor img_emb/ + metadata/)")
            out += [_Source(f) for f in files]
        elif path.is_file():
            out.append(_Source(path))
        else:
            raise ImportInputError(f"{path} does not exist")
    return out


def _open_parquet(path: Path) -> Any:
    pa, pq = _pa()
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ImportInputError(f"{path}: not a readable Parquet file ({exc})") from None


def _embeddings_from_arrow(column: Any, label: str, first_row: int) -> np.ndarray:
    pa, _ = _pa()
    if not (
        pa.types.is_list(column.type)
        or pa.types.is_large_list(column.type)
        or pa.types.is_fixed_size_list(column.type)
    ) or not (
        pa.types.is_floating(column.type.value_type) or pa.types.is_integer(column.type.value_type)
    ):
        raise ImportInputError(
            f"{label}: column embedding must be a list of floats, not {column.type}"
        )
    if column.null_count:
        row = first_row + int(np.flatnonzero(np.asarray(column.is_null()))[0])
        raise ImportInputError(f"{label}: row {row} has no embedding")
    if pa.types.is_fixed_size_list(column.type):
        dims = np.full(len(column), column.type.list_size)
    else:
        offsets = np.asarray(column.offsets)
        dims = np.diff(offsets)
    if len(column) and (dims != dims[0]).any():
        row = first_row + int(np.flatnonzero(dims != dims[0])[0])
        raise ImportInputError(
            f"{label}: row {row} has an embedding of {dims[row - first_row]} values, "
            f"earlier rows {dims[0]}"
        )
    values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return values.reshape(len(column), int(dims[0]) if len(column) else 0)


def _strings(table: Any, name: str, label: str) -> list[str | None]:
    pa, _ = _pa()
    if name not in table.column_names:
        return [None] * table.num_rows
    column = table.column(name)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        if pa.types.is_null(column.type):
            return [None] * table.num_rows
        raise ImportInputError(f"{label}: column {name} must hold strings, not {column.type}")
    return list(column.to_pylist())


def _metadata_column(table: Any, label: str) -> list[str | dict[str, Any] | None]:
    pa, _ = _pa()
    if "metadata" not in table.column_names:
        return [None] * table.num_rows
    column = table.column("metadata")
    if not (
        pa.types.is_struct(column.type)
        or pa.types.is_string(column.type)
        or pa.types.is_large_string(column.type)
    ):
        raise ImportInputError(
            f"{label}: column metadata must be a JSON string or a struct, not {column.type}"
        )
    return list(column.to_pylist())


def _plain_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _chunks(source: _Source, batch_rows: int) -> Iterator[Chunk]:
    pa, _ = _pa()
    label = str(source.parquet)
    parquet = _open_parquet(source.parquet)
    names = parquet.schema_arrow.names
    vectors: np.ndarray | None = None
    if source.npy is not None:
        try:
            vectors = np.load(source.npy, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise ImportInputError(f"{source.npy}: not a readable .npy file ({exc})") from None
        if vectors.ndim != 2:
            raise ImportInputError(f"{source.npy}: expected a 2-d array, got {vectors.shape}")
        if vectors.shape[0] != parquet.metadata.num_rows:
            raise ImportInputError(
                f"{source.npy} has {vectors.shape[0]} rows but {label} has "
                f"{parquet.metadata.num_rows}: the files are not aligned"
            )
    elif "embedding" not in names:
        raise ImportInputError(
            f"{label}: no column 'embedding' (columns: {', '.join(names) or 'none'}); "
            f"expected {', '.join(KNOWN_COLUMNS)}"
        )
    else:
        extra = [n for n in names if n not in KNOWN_COLUMNS]
        if extra:
            log.warning("%s: ignoring columns %s", label, ", ".join(extra))
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows):
            table = pa.Table.from_batches([batch])
            n = table.num_rows
            if vectors is not None:
                embeddings = np.asarray(vectors[row : row + n], dtype=np.float32)
                meta_names = [c for c in table.column_names if c not in ("image_path", "key")]
                columns = {c: table.column(c).to_pylist() for c in meta_names}
                metadata: list[str | dict[str, Any] | None] = [
                    {
                        c: _plain_value(columns[c][i])
                        for c in meta_names
                        if columns[c][i] is not None
                    }
                    for i in range(n)
                ]
                image_paths = _strings(table, "image_path", label)
                keys = _strings(table, "key", label)
                keys = [k if k is not None else p for k, p in zip(keys, image_paths, strict=True)]
                texts: list[str | None] = [None] * n
            else:
                embeddings = _embeddings_from_arrow(
                    table.column("embedding").combine_chunks(), label, row
                )
                metadata = _metadata_column(table, label)
                image_paths = _strings(table, "image_path", label)
                keys = _strings(table, "key", label)
                texts = _strings(table, "text", label)
            yield Chunk(label, row, embeddings, keys, metadata, image_paths, texts)
            row += n
    except pa.ArrowException as exc:
        raise ImportInputError(f"{label}: unreadable after row {row} ({exc})") from None
    except OSError as exc:
        raise ImportInputError(f"{label}: unreadable after row {row} ({exc})") from None


def _stored_metadata(raw: str | dict[str, Any] | None, max_bytes: int) -> str:
    """One row's metadata as it is stored (compact JSON text), or ImportInputError."""
    if raw is None or raw == "":
        return "{}"
    value: Any = raw
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise ImportInputError(f"metadata is not valid JSON ({exc})") from None
    return encode_metadata(value, max_bytes)


def _check(chunk: Chunk, dim: int, max_metadata_bytes: int, max_text_chars: int) -> np.ndarray:
    """Refuse the chunk's first bad row. Returns, per row, whether its metadata must be
    encoded again to be stored: False where the JSON text read is already the stored form,
    which the commit pass then stores without parsing it a second time."""
    emb = chunk.embeddings
    if emb.shape[1] != dim:
        raise ImportInputError(
            f"{chunk.label}: embeddings have {emb.shape[1]} dimensions; the model's is {dim}. "
            "Import embeddings of the data dir's model (or open another data dir with --model)."
        )
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        row = chunk.first_row + int(np.flatnonzero(~finite)[0])
        raise ImportInputError(f"{chunk.label}: row {row}: embedding has NaN or infinite values")
    zero = ~(np.abs(emb) > 0).any(axis=1)
    if zero.any():
        row = chunk.first_row + int(np.flatnonzero(zero)[0])
        raise ImportInputError(f"{chunk.label}: row {row}: embedding is all zeros")
    reencode: list[bool] = []
    for i, raw in enumerate(chunk.metadata):
        try:
            reencode.append(_stored_metadata(raw, max_metadata_bytes) != raw)
        except InvalidField as exc:
            raise ImportInputError(f"{chunk.label}: row {chunk.first_row + i}: {exc}") from None
    for i, text in enumerate(chunk.texts):
        if text is not None:
            try:
                checked_text(text, max_text_chars)
            except InvalidField as exc:
                raise ImportInputError(f"{chunk.label}: row {chunk.first_row + i}: {exc}") from None
    return np.array(reencode, dtype=bool)


def _metadata_texts(chunk: Chunk, reencode: np.ndarray, max_bytes: int) -> list[str]:
    return [
        raw if isinstance(raw, str) and not again else _stored_metadata(raw, max_bytes)
        for raw, again in zip(chunk.metadata, reencode.tolist(), strict=True)
    ]


# -- writing ---------------------------------------------------------------------------------
def _identity(prefix: bytes, value: bytes) -> str:
    return hashlib.sha256(prefix + value).hexdigest()


def _image_row(
    library: Library, path: Path, meta: dict[str, Any], vector: np.ndarray
) -> tuple[ImageToStore | None, str | None]:
    """An image row with its file: decoded for its size, mime and thumbnail."""
    sha, size = file_sha256(path)
    settings = library.settings
    try:
        decoded = decode_image(
            path, max_pixels=settings.limits.max_image_pixels, draft_px=settings.thumbnail_px
        )
    except ImageError as exc:
        return None, str(exc)
    return (
        ImageToStore(
            source=path,
            sha256=sha,
            thumbnail=make_thumbnail(decoded.image, settings.thumbnail_px),
            mime=decoded.mime,
            width=decoded.width,
            height=decoded.height,
            size=size,
            filename=path.name,
            metadata=meta,
            vector=vector,
        ),
        None,
    )


@dataclass
class _Rows:
    """One kind's rows of a chunk, ready for `commit_embeddings`."""

    shas: list[str] = field(default_factory=list)
    metadata: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # into the chunk's vectors
    texts: list[str | None] | None = None


@dataclass
class _Prepared:
    """A chunk turned into what the store takes; built on the reading thread."""

    rows: int
    vectors: np.ndarray  # normalised
    images: list[ImageToStore]  # rows whose image file is here: stored with the file
    plain: _Rows  # rows stored without a file, by key (or vector)
    texts: _Rows
    failed: list[tuple[str, str]]


def _prepare(library: Library, chunk: Chunk, reencode: np.ndarray) -> _Prepared:
    limits = library.settings.limits
    vectors = chunk.embeddings / np.linalg.norm(chunk.embeddings, axis=1, keepdims=True)
    vectors = vectors.astype(np.float32)
    metadata = _metadata_texts(chunk, reencode, limits.max_metadata_bytes)
    out = _Prepared(len(vectors), vectors, [], _Rows(), _Rows(texts=[]), [])
    for i, (text, image_path, key) in enumerate(
        zip(chunk.texts, chunk.image_paths, chunk.keys, strict=True)
    ):
        if text is not None:
            text = checked_text(text, limits.max_query_chars)
            out.texts.shas.append(text_sha256(text))
            out.texts.metadata.append(metadata[i])
            out.texts.rows.append(i)
            out.texts.texts.append(text)  # type: ignore[union-attr]
            continue
        if image_path is not None and Path(image_path).is_file():
            meta = json.loads(metadata[i])
            image, error = _image_row(library, Path(image_path), meta, vectors[i])
            if image is not None:
                out.images.append(image)
                continue
            out.failed.append((image_path, error or "unreadable"))
        out.plain.shas.append(
            _identity(b"xmodal-import-key\0", key.encode("utf-8"))
            if key is not None
            else _identity(b"xmodal-import-vector\0", vectors[i].tobytes())
        )
        out.plain.metadata.append(metadata[i])
        out.plain.rows.append(i)
    return out


def _commit(library: Library, chunk: _Prepared, report: ImportReport) -> None:
    report.failed += chunk.failed
    report.without_file += len(chunk.plain.rows)
    if chunk.images:
        results = commit_images(library, chunk.images, move=False, catch_up=False)
        new = sum(1 for _, created in results if created)
        report.added += new
        report.skipped_known += len(results) - new
    parts: tuple[tuple[Kind, _Rows], ...] = (("image", chunk.plain), ("text", chunk.texts))
    for kind, part in parts:
        if part.rows:
            created = commit_embeddings(
                library, kind, part.shas, part.metadata, chunk.vectors[part.rows], part.texts
            )
            new = int(created.sum())
            if kind == "image":
                report.added += new
            else:
                report.texts_added += new
            report.skipped_known += len(part.rows) - new
    report.rows += chunk.rows


def _one_ahead(items: Iterator[_Prepared]) -> Iterator[_Prepared]:
    """`items`, each produced on a worker thread while the caller handles the one before: the
    next chunk is read and prepared (Python, holding the GIL) while SQLite writes this one
    (which releases the GIL), so the two use both cores. One thread, one item at a time."""
    with ThreadPoolExecutor(1, thread_name_prefix="import-read") as pool:
        future = pool.submit(next, items, None)
        while (item := future.result()) is not None:
            future = pool.submit(next, items, None)
            yield item


def _catch_up_indexes(library: Library, report: ImportReport) -> None:
    started = time.monotonic()
    for collection, added in ((library.images, report.added), (library.texts, report.texts_added)):
        if added >= REBUILD_AFTER or (added and not collection.is_trained):
            collection.rebuild()  # one bulk build from the store, of the kind its size calls for
        else:
            collection.catch_up()
    report.index_s = time.monotonic() - started


def import_paths(
    library: Library, paths: list[Path], *, batch_rows: int = 20_000, progress: bool = True
) -> ImportReport:
    from tqdm import tqdm

    report = ImportReport()
    sources = _sources(paths)
    total = sum(_open_parquet(s.parquet).metadata.num_rows for s in sources)
    limits = library.settings.limits
    started = time.monotonic()
    # per chunk, in reading order: which rows' metadata the commit pass must encode again
    reencode: list[np.ndarray] = []
    with tqdm(total=total, unit="row", desc="checking", disable=not progress) as bar:
        for source in sources:
            for chunk in _chunks(source, batch_rows):
                reencode.append(
                    _check(
                        chunk,
                        library.encoder.dim,
                        limits.max_metadata_bytes,
                        limits.max_query_chars,
                    )
                )
                bar.update(len(chunk.keys))
    report.check_s = time.monotonic() - started
    started = time.monotonic()
    masks = iter(reencode)
    prepared = (
        _prepare(library, chunk, next(masks))
        for source in sources
        for chunk in _chunks(source, batch_rows)
    )
    with (
        tqdm(total=total, unit="row", desc="importing", disable=not progress) as bar,
        library.store.bulk_writes(rows=total),
    ):
        for ready in _one_ahead(prepared):
            _commit(library, ready, report)
            bar.update(ready.rows)
    report.import_s = time.monotonic() - started
    _catch_up_indexes(library, report)
    return report
