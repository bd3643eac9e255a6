"""Domain objects -> response bodies."""

from __future__ import annotations

from app.schemas import ImageHit, ImageItem, TextHit, TextItem
from app.services.search import Hit
from index.store import StoredItem


def image_item(item: StoredItem, duplicate: bool = False) -> ImageItem:
    return ImageItem(
        id=item.id,
        sha256=item.sha256,
        filename=item.filename,
        mime=item.mime,
        width=item.width,
        height=item.height,
        bytes=item.bytes,
        metadata=item.metadata,
        created=item.created,
        duplicate=duplicate,
        url=f"/v1/images/{item.id}/content",
        thumbnail_url=f"/v1/images/{item.id}/thumbnail",
    )


def text_item(item: StoredItem, duplicate: bool = False) -> TextItem:
    return TextItem(
        id=item.id,
        text=item.text or "",
        metadata=item.metadata,
        created=item.created,
        duplicate=duplicate,
    )


def image_hit(hit: Hit) -> ImageHit:
    return ImageHit(
        id=hit.item.id,
        score=hit.score,
        rerank_score=hit.rerank_score,
        metadata=hit.item.metadata,
        filename=hit.item.filename,
        url=f"/v1/images/{hit.item.id}/content",
        thumbnail_url=f"/v1/images/{hit.item.id}/thumbnail",
    )


def text_hit(hit: Hit) -> TextHit:
    return TextHit(
        id=hit.item.id,
        score=hit.score,
        rerank_score=hit.rerank_score,
        text=hit.item.text or "",
        metadata=hit.item.metadata,
    )
