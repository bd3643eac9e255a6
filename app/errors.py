"""Domain errors and the one table that maps them to HTTP status codes.

Services raise these; only the exception handlers in `app/main.py` turn them into responses.
"""

from __future__ import annotations

import errno
from typing import ClassVar


class XmodalError(Exception):
    """Base of every error the service answers on purpose."""

    code: ClassVar[str] = "error"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidField(XmodalError):
    code = "invalid_field"


class InvalidImage(XmodalError):
    """Bytes that claim to be an image but cannot be decoded (truncated, corrupt)."""

    code = "invalid_image"


class UnsupportedMedia(XmodalError):
    """Bytes that are not an image at all."""

    code = "unsupported_media_type"


class TooLarge(XmodalError):
    code = "too_large"


class NotFound(XmodalError):
    code = "not_found"


class Unauthorized(XmodalError):
    code = "unauthorized"


class Overloaded(XmodalError):
    code = "overloaded"


class NotReady(XmodalError):
    code = "not_ready"


class RerankUnavailable(XmodalError):
    code = "rerank_unavailable"


class StorageError(XmodalError):
    """The store could not accept a write (disk full, read-only); nothing was half-written."""

    code = "storage_unavailable"


class ModelMismatch(XmodalError):
    code = "model_mismatch"


def storage_error(exc: BaseException) -> StorageError:
    """An OSError or SQLite error from a write, as the error the client gets."""
    text = str(exc).lower()
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "full" in text:
        return StorageError("the server's disk is full; nothing was stored", retry_after_s=60)
    return StorageError("the store could not accept the write; nothing was stored", retry_after_s=5)


# The one table from error kind to HTTP status.
STATUS_BY_ERROR: dict[type[XmodalError], int] = {
    InvalidField: 422,
    InvalidImage: 422,
    # 409: the request is well formed, the loaded model cannot do it (not a schema error)
    RerankUnavailable: 409,
    UnsupportedMedia: 415,
    TooLarge: 413,
    NotFound: 404,
    Unauthorized: 401,
    Overloaded: 503,
    NotReady: 503,
    StorageError: 507,
    ModelMismatch: 409,
}


def status_for(error: XmodalError) -> int:
    for kind in type(error).__mro__:
        if kind in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[kind]
    return 500
