"""/v1/images: upload, list, get, content, thumbnail, delete."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Response, UploadFile
from fastapi.responses import FileResponse

from app.deps import BackendDep
from app.errors import NotFound
from app.routes.bodies import image_item
from app.routes.common import (
    BODY_ERRORS,
    ERROR_RESPONSES,
    WRITE_ERRORS,
    FilesField,
    json_form,
    spool_all,
)
from app.schemas import Cursor, ImageAdded, ImageItem, ImageList, ItemId
from app.services import items

router = APIRouter(prefix="/images", tags=["images"], responses=ERROR_RESPONSES)

ImageId = Annotated[ItemId, Path(description="the image's id")]


@router.post(
    "", status_code=201, response_model=ImageAdded, responses={**BODY_ERRORS, **WRITE_ERRORS}
)
async def upload_images(
    backend: BackendDep,
    files: Annotated[list[UploadFile], FilesField],
    metadata: Annotated[
        str | None, json_form("metadata", "JSON object stored with each file")
    ] = None,
) -> ImageAdded:
    meta = items.parse_metadata(metadata, backend.settings.limits.max_metadata_bytes)
    sources = await spool_all(backend, files)
    added = await items.add_images(backend, sources, meta)
    return ImageAdded(items=[image_item(a.item, a.duplicate) for a in added])


@router.get("", response_model=ImageList)
async def list_images(
    backend: BackendDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    after: Annotated[Cursor, Query(description="next_after of the previous page; 0: first")] = 0,
    order: Annotated[
        Literal["oldest", "newest"], Query(description="upload order: oldest or newest first")
    ] = "oldest",
) -> ImageList:
    page = await items.list_items(
        backend, "image", after=after, limit=limit, newest_first=order == "newest"
    )
    return ImageList(
        items=[image_item(r) for r in page.items], next_after=page.next_after, total=page.total
    )


@router.get("/{image_id}", response_model=ImageItem)
async def get_image(backend: BackendDep, image_id: ImageId) -> ImageItem:
    return image_item(await items.get_item(backend, "image", image_id))


@router.get("/{image_id}/content", response_class=FileResponse)
async def image_content(backend: BackendDep, image_id: ImageId) -> FileResponse:
    item = await items.get_item(backend, "image", image_id)
    if item.media_path is None:
        raise NotFound(items.NO_FILE.format(id=image_id))
    path = backend.library.media.path_of(item.media_path)
    if not path.is_file():
        raise NotFound(f"the file of image {image_id} is missing")
    return FileResponse(
        path,
        media_type=item.mime,
        headers={"Cache-Control": "private, max-age=31536000, immutable"},
    )


@router.get("/{image_id}/thumbnail", response_class=FileResponse)
async def image_thumbnail(backend: BackendDep, image_id: ImageId) -> FileResponse:
    item = await items.get_item(backend, "image", image_id)
    if item.media_path is None:
        raise NotFound(items.NO_FILE.format(id=image_id))
    path = backend.library.media.thumbnail_path(item.sha256)
    if not path.is_file():
        raise NotFound(f"the thumbnail of image {image_id} is missing")
    return FileResponse(
        path,
        media_type="image/jpeg",
        headers={"Cache-Control": "private, max-age=31536000, immutable"},
    )


@router.delete("/{image_id}", status_code=204, response_class=Response, responses=WRITE_ERRORS)
async def delete_image(backend: BackendDep, image_id: ImageId) -> Response:
    await items.delete_item(backend, "image", image_id)
    return Response(status_code=204)
