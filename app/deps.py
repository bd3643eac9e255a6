"""Dependencies shared by the routes: the backend (resolved once per request), the runtime,
settings and the API key check.

All `async def`, though none awaits: FastAPI runs a plain `def` dependency in its thread pool,
one thread hop each, and these four cost a search by vector ~0.3 ms of the event loop's time.
None of them blocks."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from app.config import Settings
from app.errors import Unauthorized
from app.runtime import Backend, Runtime


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_backend(runtime: RuntimeDep) -> Backend:
    """503 `not_ready` until the service is ready; afterwards the same complete backend."""
    return runtime.require()


BackendDep = Annotated[Backend, Depends(get_backend)]


async def require_api_key(request: Request, settings: SettingsDep) -> None:
    expected = settings.api_key
    if not expected:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # Constant-time comparison of bytes; the token is never logged or echoed.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode("utf-8", "surrogateescape"), expected.encode()
    ):
        raise Unauthorized("missing or wrong API key (send Authorization: Bearer <key>)")
