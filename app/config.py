"""Service settings: one pydantic-settings class, read from XMODAL_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ModelSettings(BaseModel):
    """Which encoder to load. Env: XMODAL_MODEL__NAME, XMODAL_MODEL__PRETRAINED, ..."""

    # open_clip architecture name, or the built-in "xmodal-tiny".
    name: str = "ViT-B-32"
    # open_clip pretrained tag, a local weights file, or "none" (random init, for tests/benchmarks).
    pretrained: str = "laion2b_s34b_b79k"
    # A checkpoint written by `xmodal train`; overrides name/pretrained when set.
    checkpoint: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: fp16 autocast on CUDA; on a CPU with native bf16, the text tower in bf16 and the
    # image tower in fp32 ("bf16-text"), else fp32. bf16 runs both towers in bf16.
    precision: Literal["auto", "fp32", "bf16", "bf16-text", "fp16"] = "auto"
    # Where open_clip / Hugging Face keep downloaded weights.
    cache_dir: Path | None = None
    # torch.compile the text tower's blocks (CPU inductor; query lengths padded to 8/16/32/77
    # tokens). Off: the warm-up then compiles two graphs (about a minute on 2 cores), and
    # bench/text_tower.py found them slower than the eager fused blocks from batch 8 on.
    text_compile: bool = False


class BatchSettings(BaseModel):
    """Dynamic batching of concurrent requests into one forward pass per model call."""

    # 1 disables batching (each request runs its own forward pass).
    max_batch_size: int = Field(32, ge=1, le=1024)
    # How long the first request of a batch waits for company.
    max_wait_ms: float = Field(5.0, ge=0, le=1000)
    # Requests waiting beyond this are refused at once with 503 + Retry-After.
    max_queue: int = Field(256, ge=1, le=100_000)
    # A request waiting longer than this in the queue gets a 503 instead of a hang.
    request_timeout_s: float = Field(30.0, gt=0)
    # A text search query that, for having queued, would be answered later than this after it
    # arrived is refused with 503 + Retry-After when its batch forms, instead of being
    # computed late: under overload clients hear to back off and the queue keeps only what
    # can be served in time. 0 = no deadline. Only search queries carry it: uploads and embedding
    # requests of many items wait for their own earlier items by design.
    query_deadline_ms: float = Field(250.0, ge=0)


class LimitSettings(BaseModel):
    """Request limits, enforced before any expensive work."""

    max_upload_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    # A whole request body (all files of a multipart upload together).
    max_request_bytes: int = Field(200 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(50_000_000, ge=64 * 64)
    max_files_per_request: int = Field(64, ge=1)
    max_query_chars: int = Field(1000, ge=1)
    max_k: int = Field(1000, ge=1)
    max_metadata_bytes: int = Field(16 * 1024, ge=2)
    max_texts_per_request: int = Field(256, ge=1)
    max_rerank_k: int = Field(128, ge=1)


class IndexSettings(BaseModel):
    """FAISS index choice and persistence."""

    # "auto" picks by collection size: exact below exact_max, then HNSW, then IVF-PQ above hnsw_max.
    kind: Literal["auto", "exact", "hnsw", "ivfpq"] = "auto"
    exact_max: int = Field(50_000, ge=0)
    # Measured at 1M 512-d vectors (bench/README.md): HNSW 2.2 GiB and a 10-minute build,
    # IVF-PQ 79 MiB and 3 minutes at better recall, so IVF-PQ takes over above 1M.
    hnsw_max: int = Field(1_000_000, ge=0)
    hnsw_m: int = Field(32, ge=4, le=128)
    # Search-time (a saved index takes the current value). At 1M vectors 256 gave recall@10
    # 0.95 on bench/ann.py's data but 0.938 on bench/scale.py's, where 512 gave 0.957 (0.934
    # against 0.833 on a harder query set) at about 1.8x the search time, ~1 ms a query;
    # 0.999 at 100k either way.
    hnsw_ef_search: int = Field(512, ge=8)
    hnsw_ef_construction: int = Field(80, ge=8)
    ivf_nprobe: int = Field(16, ge=1)
    # OpenMP threads per FAISS search. Requests already search in parallel; 2 threads on a
    # single query stalled in the hand-off (8 ms vs 1 ms for HNSW at efSearch 256, 2 cores).
    search_threads: int = Field(1, ge=1, le=256)
    # Save the in-memory indexes after this many changes (or this share of the index, if more:
    # at 1M vectors an HNSW save writes 2.2 GB, and 10,000 changes replay in ~3 s at start-up)
    # or seconds, but never sooner after a save than `save_pace` times its duration. SQLite
    # stays the truth: rarer saves only lengthen the replay at start-up.
    save_every_changes: int = Field(1000, ge=1)
    save_share: float = Field(0.01, ge=0, le=1)
    save_every_s: float = Field(60.0, gt=0)
    save_pace: float = Field(10.0, ge=0)


class CacheSettings(BaseModel):
    """In-memory caches on the query path. Env: XMODAL_CACHE__QUERY_VECTORS, ..."""

    # Vectors of recent query texts (LRU, entries; 0 disables): a repeated query skips the
    # text tower and the batcher's wait. An entry is the vector (2 KiB at 512-d) and its text.
    query_vectors: int = Field(4096, ge=0, le=10_000_000)
    # Result rows (LRU, items; 0 disables): the fields a hit's body shows, kept so that a
    # search need not read SQLite for items returned recently. Measured 1.7 KiB per image with
    # five metadata fields: 20,000 hold about 35 MiB. Deletes drop their row before answering.
    result_rows: int = Field(20_000, ge=0, le=100_000_000)
    # Answers of recent metadata filters (LRU, in ids held; 8 bytes each; 0 disables): a filter
    # seen recently skips its SQL (31 ms for one matching 194k of 1M items) and is brought up to
    # date from the change log. 4M ids hold about 32 MiB.
    filter_ids: int = Field(4_000_000, ge=0, le=1_000_000_000)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="XMODAL_", env_nested_delimiter="__", extra="ignore"
    )

    data_dir: Path = Path("./data")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Bearer token guarding /v1; empty means no authentication.
    api_key: str = ""
    # CORS stays off unless origins are listed.
    cors_origins: list[str] = Field(default_factory=list)
    # On a model change over an existing data dir: refuse (default) or re-embed everything.
    reembed_on_model_change: bool = False
    thumbnail_px: int = Field(256, ge=16, le=2048)
    # Store the GPS position read from a photo's EXIF as metadata field `gps` (filterable,
    # returned to every client). Off: the position is left out of the metadata; the original
    # file, served as uploaded, still carries its EXIF.
    store_gps: bool = True
    log_level: str = "info"

    model: ModelSettings = Field(default_factory=ModelSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)

    @field_validator("api_key")
    @classmethod
    def _strip_key(cls, value: str) -> str:
        return value.strip()

    @model_validator(mode="after")
    def _check_index_bounds(self) -> Settings:
        if self.index.hnsw_max < self.index.exact_max:
            raise ValueError("index.hnsw_max must be >= index.exact_max")
        return self
