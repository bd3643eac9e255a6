"""Operations: /v1/info, /healthz, /readyz, /metrics and the web page."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from anyio import to_thread
from fastapi import APIRouter, Response
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import BackendDep, RuntimeDep
from app.schemas import ErrorBody, Health, IndexInfo, Info, ModelInfo

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# /v1/info: the API key (401) and readiness (503) apply to it as to every /v1 route
info_router = APIRouter(tags=["ops"], responses={code: {"model": ErrorBody} for code in (401, 503)})
ops_router = APIRouter(tags=["ops"])


def _version() -> str:
    try:
        return metadata.version("xmodal")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@info_router.get("/info", response_model=Info)
async def info(backend: BackendDep) -> Info:
    library = backend.library
    encoder = library.encoder
    limits = library.settings.limits
    return Info(
        version=_version(),
        model=ModelInfo(
            name=encoder.name,
            pretrained=encoder.pretrained,
            fingerprint=encoder.fingerprint,
            dim=encoder.dim,
            device=str(encoder.device),
            precision=encoder.precision,
            image_size=encoder.image_size,
            has_reranker=encoder.has_reranker,
        ),
        counts=backend.counts(),
        index={
            "images": IndexInfo(**library.images.info()),
            "texts": IndexInfo(**library.texts.info()),
        },
        limits={
            "max_upload_bytes": limits.max_upload_bytes,
            "max_image_pixels": limits.max_image_pixels,
            "max_files_per_request": limits.max_files_per_request,
            "max_query_chars": limits.max_query_chars,
            "max_k": limits.max_k,
            "max_rerank_k": limits.max_rerank_k,
        },
    )


@ops_router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health(status="ok")


@ops_router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(runtime: RuntimeDep) -> Response:
    if runtime.ready:
        problem = await to_thread.run_sync(runtime.storage_problem)
        if problem is None:
            return JSONResponse(Health(status="ready").model_dump())
        # Reads may still work, writes answer 507: take this instance out of rotation.
        detail = f"{problem}; writes fail (507) until it is fixed and the server restarted"
        body = Health(status="degraded", detail=detail)
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "30"})
    detail = runtime.startup_error or "loading the model and indexes"
    body = Health(status="failed" if runtime.startup_error else "starting", detail=detail)
    return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "2"})


@ops_router.get("/metrics", response_class=Response)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@ops_router.get("/", response_class=FileResponse, include_in_schema=False)
async def index_page() -> Response:
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        return Response("xmodal: the web page is not installed", media_type="text/plain")
    return FileResponse(page, media_type="text/html")
