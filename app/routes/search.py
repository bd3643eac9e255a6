"""/v1/search/*: text-to-image, image-to-image, image-to-text."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from app.deps import BackendDep
from app.routes.bodies import image_hit, text_hit
from app.routes.common import ERROR_RESPONSES, parse_filter, spool_all
from app.schemas import HARD_MAX_K, ImageResults, ItemId, TextResults, TextSearch
from app.services import search as search_service
from app.services.items import UploadSource

router = APIRouter(prefix="/search", tags=["search"], responses=ERROR_RESPONSES)

KForm = Annotated[int, Form(ge=1, le=HARD_MAX_K)]
FilterForm = Annotated[str | None, Form(description="JSON object of metadata conditions")]
FileForm = Annotated[UploadFile | None, File(description="the query image")]
ImageIdForm = Annotated[ItemId | None, Form(description="a stored image as the query")]


async def _source(backend: BackendDep, file: UploadFile | None) -> UploadSource | None:
    if file is None:
        return None
    return (await spool_all(backend, [file]))[0]


@router.post("/text", response_model=ImageResults)
async def search_text(backend: BackendDep, body: TextSearch) -> ImageResults:
    outcome = await search_service.search_by_text(
        backend,
        body.query,
        k=body.k,
        filter_=body.filter,
        rerank=body.rerank,
        rerank_k=body.rerank_k,
    )
    return ImageResults(results=[image_hit(h) for h in outcome.hits], took_ms=outcome.took_ms)


@router.post("/image", response_model=ImageResults)
async def search_image(
    backend: BackendDep,
    file: FileForm = None,
    image_id: ImageIdForm = None,
    k: KForm = 10,
    filter: FilterForm = None,
) -> ImageResults:
    filter_ = parse_filter(filter)
    outcome = await search_service.search_by_image(
        backend, source=await _source(backend, file), image_id=image_id, k=k, filter_=filter_
    )
    return ImageResults(results=[image_hit(h) for h in outcome.hits], took_ms=outcome.took_ms)


@router.post("/image-to-text", response_model=TextResults)
async def search_image_to_text(
    backend: BackendDep,
    file: FileForm = None,
    image_id: ImageIdForm = None,
    k: KForm = 10,
    filter: FilterForm = None,
    rerank: Annotated[bool, Form()] = False,
    rerank_k: Annotated[int | None, Form(ge=1, le=1024)] = None,
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
    )
    return TextResults(results=[text_hit(h) for h in outcome.hits], took_ms=outcome.took_ms)
