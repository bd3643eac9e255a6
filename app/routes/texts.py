"""/v1/texts: the text corpus that image-to-text search returns."""

from __future__ import annotations

from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Query, Response

from app.deps import RuntimeDep
from app.errors import TooLarge
from app.routes.common import ERROR_RESPONSES
from app.schemas import TextAdded, TextItem, TextList, TextsIn
from app.services import library as library_service
from app.views import text_item

router = APIRouter(prefix="/texts", tags=["texts"], responses=ERROR_RESPONSES)


@router.post("", status_code=201, response_model=TextAdded)
async def add_texts(runtime: RuntimeDep, body: TextsIn) -> TextAdded:
    library = runtime.require()
    if len(body.items) > library.settings.limits.max_texts_per_request:
        raise TooLarge(f"at most {library.settings.limits.max_texts_per_request} texts per request")
    added = await library_service.add_texts(runtime, [(t.text, t.metadata) for t in body.items])
    return TextAdded(items=[text_item(a.item, a.duplicate) for a in added])


@router.get("", response_model=TextList)
async def list_texts(
    runtime: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    after: Annotated[int, Query(ge=0)] = 0,
) -> TextList:
    library = runtime.require()
    rows = await to_thread.run_sync(
        lambda: library.store.list_items("text", after_id=after, limit=limit)
    )
    total = await to_thread.run_sync(library.store.count, "text")
    next_after = rows[-1].id if len(rows) == limit else None
    return TextList(items=[text_item(r) for r in rows], next_after=next_after, total=total)


@router.get("/{text_id}", response_model=TextItem)
async def get_text(runtime: RuntimeDep, text_id: int) -> TextItem:
    return text_item(await library_service.get_item(runtime, "text", text_id))


@router.delete("/{text_id}", status_code=204, response_class=Response)
async def delete_text(runtime: RuntimeDep, text_id: int) -> Response:
    await library_service.delete_item(runtime, "text", text_id)
    return Response(status_code=204)
