"""The FastAPI application: routers, error handling, middleware and the lifespan."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.deps import require_api_key
from app.disconnect import CancelOnDisconnect
from app.errors import XmodalError, status_for
from app.metrics import REQUEST_LATENCY
from app.openapi import install_openapi
from app.routes import embed, images, ops, search, texts
from app.runtime import BackendFactory, Runtime
from app.saved_indexes import IndexFiles
from app.uploads import BodyLimitMiddleware
from models.encoder import Encoder

log = logging.getLogger("xmodal")

_CODE_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_field",
    503: "overloaded",
}


def error_response(
    status: int, code: str, message: str, retry_after_s: float | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after_s)))} if retry_after_s else None
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def _describe_validation(exc: RequestValidationError) -> str:
    # Never echo the input back: it may be huge, binary, or not encodable (lone surrogates).
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> list[str]:
    """The methods some route answers on this path (Starlette's 405 names only the first)."""
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(r.matches({**request.scope, "method": method})[0] is Match.FULL for r in routes)
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(XmodalError)
    async def _domain(_: Request, exc: XmodalError) -> JSONResponse:
        return error_response(status_for(exc), exc.code, exc.message, exc.retry_after_s)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_field", _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _CODE_BY_STATUS.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        response = error_response(exc.status_code, code, message)
        # Keep what the exception carries: a 405's `Allow` is required by RFC 9110 (15.5.6).
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        if exc.status_code == 405:
            # Starlette names only the first route that matched the path; list them all.
            response.headers["Allow"] = ", ".join(_allowed_methods(request))
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal", "internal server error")


class LatencyMiddleware:
    """Request latency by route template (not raw path: ids would explode the label set)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", "unmatched")
            REQUEST_LATENCY.labels(scope.get("method", ""), template, str(status)).observe(
                time.perf_counter() - started
            )


def create_app(
    settings: Settings | None = None,
    *,
    encoder: Encoder | None = None,
    on_startup_failure: Callable[[str], None] | None = None,
    on_loaded: Callable[[], None] | None = None,
    backend_factory: BackendFactory | None = None,
    index_files: Future[IndexFiles | None] | None = None,
) -> FastAPI:
    """`encoder` lets tests share one loaded model across apps; normally it is loaded here.
    `on_loaded`: called on the event loop once everything is loaded, just before ready.
    `backend_factory`: run the model calls elsewhere (`xmodal serve --engine ray`).
    `index_files`: the data dir's saved indexes, being read already (`xmodal serve` starts
    before its imports); used when the model is loaded here."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(
            settings,
            on_startup_failure=on_startup_failure,
            on_loaded=on_loaded,
            backend_factory=backend_factory,
            index_files=index_files,
        )
        app.state.runtime = runtime
        runtime.start_loading(encoder)
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="xmodal",
        summary="Image-text cross-modal retrieval: dual encoder, fusion re-ranker, FAISS.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)

    def loaded_model() -> dict[str, int] | None:
        runtime: Runtime | None = getattr(app.state, "runtime", None)
        backend = runtime.backend if runtime is not None else None
        return None if backend is None else {"dim": backend.encoder.dim}

    install_openapi(app, settings.limits, loaded_model)
    guarded = [Depends(require_api_key)]
    for router in (images.router, texts.router, search.router, embed.router, ops.info_router):
        app.include_router(router, prefix="/v1", dependencies=guarded)
    app.include_router(ops.ops_router)
    if ops.STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=ops.STATIC_DIR), name="static")
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(CancelOnDisconnect)
    app.add_middleware(BodyLimitMiddleware, limit=settings.limits.max_request_bytes)
    app.add_middleware(LatencyMiddleware)
    return app
