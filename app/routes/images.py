"""/v1/images: upload, list, get, content, thumbnail, delete."""

from __future__ import annotations

from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from fastapi.responses import FileResponse

from app.deps import RuntimeDep
from app.errors import NotFound
from app.routes.common import ERROR_RESPONSES, spool_all
from app.schemas import ImageAdded, ImageItem, ImageList
from app.services import library as library_service
from app.views import image_item

router = APIRouter(prefix="/images", tags=["images"], responses=ERROR_RESPONSES)


@router.post("", status_code=201, response_model=ImageAdded)
async def upload_images(
    runtime: RuntimeDep,
    files: Annotated[list[UploadFile], File(description="one or more image files")],
    metadata: Annotated[str | None, Form(description="JSON object stored with each file")] = None,
) -> ImageAdded:
    library = runtime.require()
    meta = library_service.parse_metadata(metadata, library.settings.limits.max_metadata_bytes)
    sources = await spool_all(runtime, files)
    added = await library_service.add_images(runtime, sources, meta)
    return ImageAdded(items=[image_item(a.item, a.duplicate) for a in added])


@router.get("", response_model=ImageList)
async def list_images(
    runtime: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    after: Annotated[int, Query(ge=0, description="id to start after")] = 0,
) -> ImageList:
    library = runtime.require()
    rows = await to_thread.run_sync(
        lambda: library.store.list_items("image", after_id=after, limit=limit)
    )
    total = await to_thread.run_sync(library.store.count, "image")
    next_after = rows[-1].id if len(rows) == limit else None
    return ImageList(items=[image_item(r) for r in rows], next_after=next_after, total=total)


@router.get("/{image_id}", response_model=ImageItem)
async def get_image(runtime: RuntimeDep, image_id: int) -> ImageItem:
    return image_item(await library_service.get_item(runtime, "image", image_id))


@router.get("/{image_id}/content", response_class=FileResponse)
async def image_content(runtime: RuntimeDep, image_id: int) -> FileResponse:
    item = await library_service.get_item(runtime, "image", image_id)
    path = runtime.require().media.path_of(item.media_path or "")
    if not path.is_file():
        raise NotFound(f"the file of image {image_id} is missing")
    return FileResponse(
        path,
        media_type=item.mime,
        headers={"Cache-Control": "private, max-age=31536000, immutable"},
    )


@router.get("/{image_id}/thumbnail", response_class=FileResponse)
async def image_thumbnail(runtime: RuntimeDep, image_id: int) -> FileResponse:
    item = await library_service.get_item(runtime, "image", image_id)
    path = runtime.require().media.thumbnail_path(item.sha256)
    if not path.is_file():
        raise NotFound(f"the thumbnail of image {image_id} is missing")
    return FileResponse(
        path,
        media_type="image/jpeg",
        headers={"Cache-Control": "private, max-age=31536000, immutable"},
    )


@router.delete("/{image_id}", status_code=204, response_class=Response)
async def delete_image(runtime: RuntimeDep, image_id: int) -> Response:
    await library_service.delete_item(runtime, "image", image_id)
    return Response(status_code=204)
