"""Request and response bodies. Hard bounds live here; configured limits are checked in services."""

from __future__ import annotations

from typing import Annotated, Any

from annotated_types import Interval
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from index.filters import filter_json_schema

HARD_MAX_K = 10_000
HARD_MAX_QUERY = 10_000
MIN_SCORE_HELP = (
    "drop results whose cosine similarity `score` is below this, in [-1, 1]; applied after "
    "re-ranking, still on `score` (not `rerank_score`)"
)
HARD_MAX_DIM = 8192
HARD_MAX_RERANK_K = 1024

# Every id and cursor the API accepts is bounded once, here: SQLite integers are 64-bit signed,
# so a larger number can never name a stored item and must be a 422, not an OverflowError.
MAX_ID = 2**63 - 1


def _digits(value: Any) -> Any:
    """An id in a URL or form is written in digits: not "2.0", "1_000" or " 7", which lax
    parsing would read as another, existing, id."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("Input should be a whole number written in digits")
    return value


ItemId = Annotated[int, Interval(ge=1, le=MAX_ID), BeforeValidator(_digits)]
Cursor = Annotated[int, Interval(ge=0, le=MAX_ID), BeforeValidator(_digits)]

# The filter is checked by index/filters.py, whose own JSON Schema describes it exactly.
FilterSpec = Annotated[dict[str, Any], WithJsonSchema(filter_json_schema())]

# What the services check beyond the types: a text must have a non-blank character (it is
# stripped, then must not be empty). `pattern` is unanchored in JSON Schema.
# The set is spelled out (\\S differs between regex dialects: ECMA's omits U+0085, U+001C-1F).
BLANK = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())  # what str.strip() strips
NON_BLANK = "[^" + "".join(f"\\u{ord(c):04x}" for c in BLANK) + "]"


def _json_int(value: Any) -> Any:
    """JSON integers, and numbers like 10.0 (JSON Schema counts them as integers); never a
    boolean or a string, which lax validation would turn into numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("Input should be a valid integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("Input should be a valid integer")
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_json_int)]
RerankK = Annotated[int, Interval(ge=1, le=HARD_MAX_RERANK_K), BeforeValidator(_json_int)]


def limit(**keywords: str) -> dict[str, Any]:
    """Mark schema keywords whose value is a configured limit (`LimitSettings` field names); the
    OpenAPI document fills them in from the running settings (app/openapi.py)."""
    return {"x-xmodal-limits": keywords}


QueryText = Annotated[
    str,
    Field(
        min_length=1,
        max_length=HARD_MAX_QUERY,
        json_schema_extra={"pattern": NON_BLANK, **limit(maxLength="max_query_chars")},
    ),
]


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
    text: QueryText
    metadata: dict[str, Any] = Field(default_factory=dict)


class TextsIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    items: list[TextIn] = Field(
        min_length=1, max_length=1024, json_schema_extra=limit(maxItems="max_texts_per_request")
    )


class TextAdded(BaseModel):
    items: list[TextItem]


class TextList(BaseModel):
    items: list[TextItem]
    next_after: int | None = None
    total: int


class TextSearch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    query: QueryText
    k: JsonInt = Field(10, ge=1, le=HARD_MAX_K, json_schema_extra=limit(maximum="max_k"))
    filter: FilterSpec | None = Field(
        None, description='metadata conditions, e.g. {"album": "paris", "year": {"$gte": 2020}}'
    )
    rerank: bool = False
    rerank_k: RerankK | None = Field(
        None,
        description="candidates to re-rank",
        json_schema_extra=limit(maximum="max_rerank_k"),
    )
    min_score: float | None = Field(None, ge=-1.0, le=1.0, description=MIN_SCORE_HELP)


class VectorSearch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    vector: list[float] = Field(
        min_length=1,
        max_length=HARD_MAX_DIM,
        description="a query embedding of the model's dimension, not all zeros; normalised like "
        "any query",
        json_schema_extra={
            "x-xmodal-model": {"minItems": "dim", "maxItems": "dim"},
            "contains": {"not": {"const": 0}},
        },
    )
    k: JsonInt = Field(10, ge=1, le=HARD_MAX_K, json_schema_extra=limit(maximum="max_k"))
    filter: FilterSpec | None = Field(None, description="metadata conditions, as for text search")
    min_score: float | None = Field(
        None, ge=-1.0, le=1.0, description="drop results whose cosine score is below this"
    )


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
    texts: list[QueryText] = Field(
        min_length=1, max_length=1024, json_schema_extra=limit(maxItems="max_texts_per_request")
    )


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
