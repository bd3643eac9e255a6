"""Helpers the routes share: form parsing of JSON fields and upload spooling."""

from __future__ import annotations

import json
from typing import Any

from anyio import to_thread
from fastapi import File, Form, UploadFile

from app.errors import InvalidField
from app.runtime import Backend
from app.schemas import ErrorBody, limit
from app.services.items import UploadSource
from app.uploads import spool_upload

Responses = dict[int | str, dict[str, Any]]


def _errors(*codes: int) -> Responses:
    return {code: {"model": ErrorBody} for code in codes}


# Every /v1 operation: 401 (API key), 404, 413 (request size), 415, 422, 503 (not ready, overloaded)
ERROR_RESPONSES = _errors(401, 404, 413, 415, 422, 503)
# Operations with a request body: 400 when it cannot be parsed (malformed JSON or multipart)
BODY_ERRORS = _errors(400)
# Operations that write: 507 `storage_unavailable` (disk full, data dir read-only or gone)
WRITE_ERRORS = _errors(507)
# Operations that can re-rank: 409 `rerank_unavailable` when the loaded model has no re-ranker
RERANK_ERRORS = _errors(409)

# Upload fields, as the OpenAPI document states them (app/openapi.py completes the multipart
# schema: JSON parts, configured limits).
FilesField = File(
    description="one or more image files",
    min_length=1,
    json_schema_extra=limit(maxItems="max_files_per_request"),
)


def json_form(what: str, description: str) -> Any:
    """A form field carrying a JSON object; the document shows it as one (`x-xmodal-json`)."""
    return Form(description=description, json_schema_extra={"x-xmodal-json": what})


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
        # a bound the schema states (maxItems): a field error like any other
        raise InvalidField(f"at most {limits.max_files_per_request} files per request")
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
