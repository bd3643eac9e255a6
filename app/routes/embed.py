"""/v1/embed/* and /v1/classify: vectors and zero-shot labels for clients with their own store."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from app.deps import BackendDep
from app.routes.common import BODY_ERRORS, ERROR_RESPONSES, FilesField, spool_all
from app.schemas import (
    Classification,
    Embeddings,
    EmbedTextsIn,
    LabelScore,
    QueryText,
)
from app.services import search as search_service

router = APIRouter(tags=["embed"], responses={**ERROR_RESPONSES, **BODY_ERRORS})


@router.post("/embed/text", response_model=Embeddings)
async def embed_text(backend: BackendDep, body: EmbedTextsIn) -> Embeddings:
    vectors = await search_service.embed_texts(backend, body.texts)
    encoder = backend.encoder
    return Embeddings(model=encoder.name, dim=encoder.dim, embeddings=[v.tolist() for v in vectors])


@router.post("/embed/image", response_model=Embeddings)
async def embed_image(
    backend: BackendDep, files: Annotated[list[UploadFile], FilesField]
) -> Embeddings:
    sources = await spool_all(backend, files)
    vectors = await search_service.embed_images(backend, sources)
    encoder = backend.encoder
    return Embeddings(model=encoder.name, dim=encoder.dim, embeddings=[v.tolist() for v in vectors])


@router.post("/classify", response_model=Classification)
async def classify(
    backend: BackendDep,
    file: Annotated[UploadFile, File()],
    labels: Annotated[
        list[QueryText],
        Form(description="candidate labels (repeat the field)", min_length=2, max_length=256),
    ],
    template: Annotated[
        str,
        Form(
            description="the prompt; {} is replaced by each label",
            min_length=2,
            max_length=200,
            json_schema_extra={"pattern": r"\{\}"},
        ),
    ] = "a photo of {}",
) -> Classification:
    source = (await spool_all(backend, [file]))[0]
    ranked = await search_service.classify(backend, source, labels, template)
    return Classification(labels=[LabelScore(label=lab, probability=p) for lab, p in ranked])
