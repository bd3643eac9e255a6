"""Upload handling: a request-size guard in front of the parser, and bounded copies to disk."""

from __future__ import annotations

import json

from fastapi import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import TooLarge, storage_error
from app.services.items import UploadSource
from index.media import MediaStore


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuse request bodies over `limit` bytes: by Content-Length before reading anything,
    and by counting while streaming otherwise, so a huge upload never fills memory or disk."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.limit:
                    await _send_413(send, self.limit)
                    return
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                # A parser that swallowed our exception answers 400; the client must see 413.
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _send_413(send, self.limit)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not started:
                await _send_413(send, self.limit)


async def _send_413(send: Send, limit: int) -> None:
    body = json.dumps(
        {"error": {"code": "too_large", "message": f"request body exceeds {limit} bytes"}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def spool_upload(upload: UploadFile, media: MediaStore, max_bytes: int) -> UploadSource:
    """Copy an upload into the store's tmp/ in chunks, refusing beyond `max_bytes`.
    Runs on a worker thread (the file object is synchronous)."""
    if upload.size is not None and upload.size > max_bytes:
        raise TooLarge(f"{upload.filename or 'file'}: larger than {max_bytes} bytes")
    try:
        target = media.new_temp_file()
    except OSError as exc:
        raise storage_error(exc) from exc
    written = 0
    try:
        upload.file.seek(0)
        with open(target, "wb") as out:
            while chunk := upload.file.read(1 << 20):
                written += len(chunk)
                if written > max_bytes:
                    raise TooLarge(f"{upload.filename or 'file'}: larger than {max_bytes} bytes")
                out.write(chunk)
    except OSError as exc:
        target.unlink(missing_ok=True)
        raise storage_error(exc) from exc
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return UploadSource(target, upload.filename)
