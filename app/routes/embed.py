"""/v1/embed/* and /v1/classify: vectors and zero-shot labels for clients with their own store."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from app.deps import RuntimeDep
from app.routes.common import ERROR_RESPONSES, spool_all
from app.schemas import Classification, Embeddings, EmbedTextsIn, LabelScore
from app.services import search as search_service

router = APIRouter(tags=["embed"], responses=ERROR_RESPONSES)


@router.post("/embed/text", response_model=Embeddings)
async def embed_text(runtime: RuntimeDep, body: EmbedTextsIn) -> Embeddings:
    vectors = await search_service.embed_texts(runtime, body.texts)
    encoder = runtime.require().encoder
    return Embeddings(model=encoder.name, dim=encoder.dim, embeddings=[v.tolist() for v in vectors])


@router.post("/embed/image", response_model=Embeddings)
async def embed_image(
    runtime: RuntimeDep, files: Annotated[list[UploadFile], File()]
) -> Embeddings:
    sources = await spool_all(runtime, files)
    vectors = await search_service.embed_images(runtime, sources)
    encoder = runtime.require().encoder
    return Embeddings(model=encoder.name, dim=encoder.dim, embeddings=[v.tolist() for v in vectors])


@router.post("/classify", response_model=Classification)
async def classify(
    runtime: RuntimeDep,
    file: Annotated[UploadFile, File()],
    labels: Annotated[list[str], Form(description="candidate labels (repeat the field)")],
    template: Annotated[str, Form(max_length=200)] = "a photo of {}",
) -> Classification:
    source = (await spool_all(runtime, [file]))[0]
    ranked = await search_service.classify(runtime, source, labels, template)
    return Classification(labels=[LabelScore(label=lab, probability=p) for lab, p in ranked])
