"""Helpers the routes share: form parsing of JSON fields and upload spooling."""

from __future__ import annotations

import json
from typing import Any

from anyio import to_thread
from fastapi import UploadFile

from app.errors import InvalidField, TooLarge
from app.runtime import Backend
from app.schemas import ErrorBody
from app.services.items import UploadSource
from app.uploads import spool_upload

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 404, 413, 415, 422, 503)
}


def parse_filter(raw: str | None) -> dict[str, Any] | None:
    if raw is None or raw.strip() == "":
        return None
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise InvalidField(f"filter is not valid JSON: {exc}") from None
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidField("filter must be a JSON object")
    return value


async def spool_all(backend: Backend, files: list[UploadFile]) -> list[UploadSource]:
    library = backend.library
    limits = library.settings.limits
    if len(files) > limits.max_files_per_request:
        raise TooLarge(f"at most {limits.max_files_per_request} files per request")
    sources: list[UploadSource] = []
    try:
        for upload in files:
            sources.append(
                await to_thread.run_sync(
                    spool_upload, upload, library.media, limits.max_upload_bytes
                )
            )
    except BaseException:
        for source in sources:
            source.path.unlink(missing_ok=True)
        raise
    return sources
