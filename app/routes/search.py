"""/v1/search/*: text-to-image, vector-to-image, image-to-image, image-to-text."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from app.deps import BackendDep
from app.routes.bodies import image_hit, text_hit
from app.routes.common import (
    BODY_ERRORS,
    ERROR_RESPONSES,
    RERANK_ERRORS,
    json_form,
    parse_filter,
    spool_all,
)
from app.schemas import (
    HARD_MAX_K,
    HARD_MAX_RERANK_K,
    MIN_SCORE_HELP,
    ImageResults,
    ItemId,
    TextResults,
    TextSearch,
    VectorSearch,
    limit,
)
from app.services import search as search_service
from app.services.items import UploadSource

router = APIRouter(prefix="/search", tags=["search"], responses=ERROR_RESPONSES)

KForm = Annotated[int, Form(ge=1, le=HARD_MAX_K, json_schema_extra=limit(maximum="max_k"))]
FilterForm = Annotated[str | None, json_form("filter", "JSON object of metadata conditions")]
# exactly one of the two (the document says so with `oneOf`)
FileForm = Annotated[UploadFile | None, File(description="the query image")]
ImageIdForm = Annotated[ItemId | None, Form(description="a stored image as the query")]
RerankKForm = Annotated[
    int | None,
    Form(ge=1, le=HARD_MAX_RERANK_K, json_schema_extra=limit(maximum="max_rerank_k")),
]
MinScoreForm = Annotated[float | None, Form(ge=-1.0, le=1.0, description=MIN_SCORE_HELP)]


async def _source(backend: BackendDep, file: UploadFile | None) -> UploadSource | None:
    if file is None:
        return None
    return (await spool_all(backend, [file]))[0]


@router.post("/text", response_model=ImageResults, responses={**BODY_ERRORS, **RERANK_ERRORS})
async def search_text(backend: BackendDep, body: TextSearch) -> ImageResults:
    outcome = await search_service.search_by_text(
        backend,
        body.query,
        k=body.k,
        filter_=body.filter,
        rerank=body.rerank,
        rerank_k=body.rerank_k,
        min_score=body.min_score,
    )
    return ImageResults(results=[image_hit(h) for h in outcome.hits], took_ms=outcome.took_ms)


@router.post("/vector", response_model=ImageResults, responses=BODY_ERRORS)
async def search_vector(backend: BackendDep, body: VectorSearch) -> ImageResults:
    """Images nearest to an embedding the caller computed (the model's dimension)."""
    outcome = await search_service.search_by_vector(
        backend, body.vector, k=body.k, filter_=body.filter, min_score=body.min_score
    )
    return ImageResults(results=[image_hit(h) for h in outcome.hits], took_ms=outcome.took_ms)


@router.post("/image", response_model=ImageResults, responses=BODY_ERRORS)
async def search_image(
    backend: BackendDep,
    file: FileForm = None,
    image_id: ImageIdForm = None,
    k: KForm = 10,
    filter: FilterForm = None,
    min_score: MinScoreForm = None,
) -> ImageResults:
    filter_ = parse_filter(filter)
    outcome = await search_service.search_by_image(
        backend,
        source=await _source(backend, file),
        image_id=image_id,
        k=k,
        filter_=filter_,
        min_score=min_score,
    )
    return ImageResults(results=[image_hit(h) for h in outcome.hits], took_ms=outcome.took_ms)


@router.post(
    "/image-to-text", response_model=TextResults, responses={**BODY_ERRORS, **RERANK_ERRORS}
)
async def search_image_to_text(
    backend: BackendDep,
    file: FileForm = None,
    image_id: ImageIdForm = None,
    k: KForm = 10,
    filter: FilterForm = None,
    rerank: Annotated[bool, Form()] = False,
    rerank_k: RerankKForm = None,
    min_score: MinScoreForm = None,
) -> TextResults:
    filter_ = parse_filter(filter)
    outcome = await search_service.search_texts_by_image(
        backend,
        source=await _source(backend, file),
        image_id=image_id,
        k=k,
        filter_=filter_,
        rerank=rerank,
        rerank_k=rerank_k,
        min_score=min_score,
    )
    return TextResults(results=[text_hit(h) for h in outcome.hits], took_ms=outcome.took_ms)
