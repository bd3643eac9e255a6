"""/v1/texts: the text corpus that image-to-text search returns."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from app.deps import BackendDep
from app.routes.bodies import text_item
from app.routes.common import BODY_ERRORS, ERROR_RESPONSES, WRITE_ERRORS
from app.schemas import Cursor, ItemId, TextAdded, TextItem, TextList, TextsIn
from app.services import items

router = APIRouter(prefix="/texts", tags=["texts"], responses=ERROR_RESPONSES)

TextId = Annotated[ItemId, Path(description="the text's id")]


@router.post(
    "", status_code=201, response_model=TextAdded, responses={**BODY_ERRORS, **WRITE_ERRORS}
)
async def add_texts(backend: BackendDep, body: TextsIn) -> TextAdded:
    added = await items.add_texts(backend, [(t.text, t.metadata) for t in body.items])
    return TextAdded(items=[text_item(a.item, a.duplicate) for a in added])


@router.get("", response_model=TextList)
async def list_texts(
    backend: BackendDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    after: Annotated[Cursor, Query(description="id to start after")] = 0,
) -> TextList:
    page = await items.list_items(backend, "text", after=after, limit=limit)
    return TextList(
        items=[text_item(r) for r in page.items], next_after=page.next_after, total=page.total
    )


@router.get("/{text_id}", response_model=TextItem)
async def get_text(backend: BackendDep, text_id: TextId) -> TextItem:
    return text_item(await items.get_item(backend, "text", text_id))


@router.delete("/{text_id}", status_code=204, response_class=Response, responses=WRITE_ERRORS)
async def delete_text(backend: BackendDep, text_id: TextId) -> Response:
    await items.delete_item(backend, "text", text_id)
    return Response(status_code=204)
