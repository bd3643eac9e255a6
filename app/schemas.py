"""Request and response bodies. Hard bounds live here; configured limits are checked in services."""

from __future__ import annotations

from typing import Annotated, Any

from annotated_types import Interval
from pydantic import BaseModel, ConfigDict, Field

FilterSpec = dict[str, Any]
HARD_MAX_K = 10_000
HARD_MAX_QUERY = 10_000

# Every id and cursor the API accepts is bounded once, here: SQLite integers are 64-bit signed,
# so a larger number can never name a stored item and must be a 422, not an OverflowError.
MAX_ID = 2**63 - 1
ItemId = Annotated[int, Interval(ge=1, le=MAX_ID)]
Cursor = Annotated[int, Interval(ge=0, le=MAX_ID)]


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable error kind, e.g. invalid_image")
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class ImageItem(BaseModel):
    id: int
    sha256: str
    filename: str | None = None
    mime: str | None = None
    width: int | None = None
    height: int | None = None
    bytes: int | None = None
    metadata: dict[str, Any]
    created: float
    duplicate: bool = False
    url: str
    thumbnail_url: str


class TextItem(BaseModel):
    id: int
    text: str
    metadata: dict[str, Any]
    created: float
    duplicate: bool = False


class ImageAdded(BaseModel):
    items: list[ImageItem]


class ImageList(BaseModel):
    items: list[ImageItem]
    next_after: int | None = Field(None, description="pass as ?after= for the next page")
    total: int


class TextIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    text: str = Field(min_length=1, max_length=HARD_MAX_QUERY)
    metadata: dict[str, Any] = Field(default_factory=dict)


class TextsIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    items: list[TextIn] = Field(min_length=1, max_length=1024)


class TextAdded(BaseModel):
    items: list[TextItem]


class TextList(BaseModel):
    items: list[TextItem]
    next_after: int | None = None
    total: int


class TextSearch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    query: str = Field(min_length=1, max_length=HARD_MAX_QUERY)
    k: int = Field(10, ge=1, le=HARD_MAX_K)
    filter: FilterSpec | None = Field(
        None, description='metadata conditions, e.g. {"album": "paris", "year": {"$gte": 2020}}'
    )
    rerank: bool = False
    rerank_k: int | None = Field(None, ge=1, le=1024, description="candidates to re-rank")


class ImageHit(BaseModel):
    id: int
    score: float
    rerank_score: float | None = None
    metadata: dict[str, Any]
    filename: str | None = None
    url: str
    thumbnail_url: str


class ImageResults(BaseModel):
    results: list[ImageHit]
    took_ms: float


class TextHit(BaseModel):
    id: int
    score: float
    rerank_score: float | None = None
    text: str
    metadata: dict[str, Any]


class TextResults(BaseModel):
    results: list[TextHit]
    took_ms: float


class EmbedTextsIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    texts: list[str] = Field(min_length=1, max_length=1024)


class Embeddings(BaseModel):
    model: str
    dim: int
    embeddings: list[list[float]]


class LabelScore(BaseModel):
    label: str
    probability: float


class Classification(BaseModel):
    labels: list[LabelScore]


class ModelInfo(BaseModel):
    name: str
    pretrained: str
    fingerprint: str
    dim: int
    device: str
    precision: str
    image_size: int
    has_reranker: bool


class IndexInfo(BaseModel):
    type: str
    size: int
    tombstones: int
    seq: int
    loaded_from: str


class Info(BaseModel):
    version: str
    model: ModelInfo
    counts: dict[str, int]
    index: dict[str, IndexInfo]
    limits: dict[str, int]


class Health(BaseModel):
    status: str
    detail: str | None = None
