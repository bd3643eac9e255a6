"""Python client for the xmodal HTTP API (httpx), sync and async.

    with XmodalClient("http://127.0.0.1:8000") as client:
        client.upload(["photos/"])
        for hit in client.search_text("a dog on a beach", k=5):
            print(hit.id, hit.score)

503 answers (overloaded, starting) are retried, honouring Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.paths import images_under


class APIError(Exception):
    """An error answer from an xmodal server, as the client sees it: status, code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass
class ImageResult:
    id: int
    score: float
    rerank_score: float | None
    metadata: dict[str, Any]
    url: str
    thumbnail_url: str
    filename: str | None = None


@dataclass
class TextResult:
    id: int
    score: float
    rerank_score: float | None
    text: str
    metadata: dict[str, Any]


@dataclass
class Uploaded:
    id: int
    sha256: str
    duplicate: bool
    filename: str | None
    metadata: dict[str, Any] = field(default_factory=dict)


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders recursively (images only), in a stable order."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(images_under(path))
        else:
            out.append(path)
    return out


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        err = response.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:500]
    raise APIError(response.status_code, code, message)


def _retry_delay(response: httpx.Response, attempt: int) -> float:
    try:
        return min(30.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return min(30.0, 0.5 * 2**attempt)


def _image_results(body: dict[str, Any]) -> list[ImageResult]:
    return [
        ImageResult(
            id=r["id"],
            score=r["score"],
            rerank_score=r.get("rerank_score"),
            metadata=r.get("metadata") or {},
            url=r["url"],
            thumbnail_url=r["thumbnail_url"],
            filename=r.get("filename"),
        )
        for r in body["results"]
    ]


def _text_results(body: dict[str, Any]) -> list[TextResult]:
    return [
        TextResult(
            id=r["id"],
            score=r["score"],
            rerank_score=r.get("rerank_score"),
            text=r["text"],
            metadata=r.get("metadata") or {},
        )
        for r in body["results"]
    ]


def _uploaded(body: dict[str, Any]) -> list[Uploaded]:
    return [
        Uploaded(i["id"], i["sha256"], i["duplicate"], i.get("filename"), i.get("metadata") or {})
        for i in body["items"]
    ]


def _file_part(path: Path) -> tuple[str, tuple[str, bytes, str]]:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return ("files", (path.name, path.read_bytes(), mime))


def _query_form(
    image: str | Path | bytes | None, image_id: int | None, fields: dict[str, Any]
) -> tuple[dict[str, str], dict[str, Any] | None]:
    data = {k: (json.dumps(v) if isinstance(v, dict) else str(v).lower() if isinstance(v, bool) else str(v))
            for k, v in fields.items() if v is not None}  # fmt: skip
    if image_id is not None:
        data["image_id"] = str(image_id)
        return data, None
    if image is None:
        raise ValueError("give an image (path or bytes) or an image_id")
    content = image if isinstance(image, bytes) else Path(image).read_bytes()
    name = "query" if isinstance(image, bytes) else Path(image).name
    return data, {"file": (name, content, "application/octet-stream")}


class XmodalClient:
    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=url, headers=headers, timeout=timeout, transport=transport
        )
        self.retries = retries

    def __enter__(self) -> XmodalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            response = self._http.request(method, path, **kwargs)
            if response.status_code != 503 or attempt == self.retries:
                break
            time.sleep(_retry_delay(response, attempt))
        _raise_for(response)
        return response

    def info(self) -> dict[str, Any]:
        body: dict[str, Any] = self._request("GET", "/v1/info").json()
        return body

    def upload(
        self,
        paths: Iterable[str | Path],
        *,
        metadata: dict[str, Any] | None = None,
        batch: int = 16,
    ) -> Iterator[Uploaded]:
        """Upload files and folders, `batch` files per request; yields as batches land."""
        files = expand_paths(paths)
        data = {"metadata": json.dumps(metadata)} if metadata else None
        for start in range(0, len(files), batch):
            parts = [_file_part(p) for p in files[start : start + batch]]
            yield from _uploaded(self._request("POST", "/v1/images", files=parts, data=data).json())

    def add_texts(self, texts: Iterable[str], metadata: dict[str, Any] | None = None) -> list[int]:
        items = [{"text": t, "metadata": metadata or {}} for t in texts]
        body = self._request("POST", "/v1/texts", json={"items": items}).json()
        return [int(i["id"]) for i in body["items"]]

    def search_text(
        self, query: str, *, k: int = 10, filter: dict[str, Any] | None = None,
        rerank: bool = False, rerank_k: int | None = None, min_score: float | None = None,
    ) -> list[ImageResult]:  # fmt: skip
        payload = {"query": query, "k": k, "filter": filter, "rerank": rerank, "rerank_k": rerank_k,
                   "min_score": min_score}  # fmt: skip
        return _image_results(self._request("POST", "/v1/search/text", json=payload).json())

    def search_image(
        self, image: str | Path | bytes | None = None, *, image_id: int | None = None,
        k: int = 10, filter: dict[str, Any] | None = None, min_score: float | None = None,
    ) -> list[ImageResult]:  # fmt: skip
        data, files = _query_form(
            image, image_id, {"k": k, "filter": filter, "min_score": min_score}
        )
        return _image_results(
            self._request("POST", "/v1/search/image", data=data, files=files).json()
        )

    def search_image_to_text(
        self, image: str | Path | bytes | None = None, *, image_id: int | None = None,
        k: int = 10, rerank: bool = False, rerank_k: int | None = None,
        min_score: float | None = None,
    ) -> list[TextResult]:  # fmt: skip
        fields = {"k": k, "rerank": rerank, "rerank_k": rerank_k, "min_score": min_score}
        data, files = _query_form(image, image_id, fields)
        response = self._request("POST", "/v1/search/image-to-text", data=data, files=files)
        return _text_results(response.json())

    def delete_image(self, image_id: int) -> None:
        self._request("DELETE", f"/v1/images/{image_id}")

    def delete_text(self, text_id: int) -> None:
        self._request("DELETE", f"/v1/texts/{text_id}")


class AsyncXmodalClient:
    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=url, headers=headers, timeout=timeout, transport=transport
        )
        self.retries = retries

    async def __aenter__(self) -> AsyncXmodalClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            response = await self._http.request(method, path, **kwargs)
            if response.status_code != 503 or attempt == self.retries:
                break
            await asyncio.sleep(_retry_delay(response, attempt))
        _raise_for(response)
        return response

    async def info(self) -> dict[str, Any]:
        body: dict[str, Any] = (await self._request("GET", "/v1/info")).json()
        return body

    async def upload(
        self,
        paths: Iterable[str | Path],
        *,
        metadata: dict[str, Any] | None = None,
        batch: int = 16,
    ) -> list[Uploaded]:
        files = expand_paths(paths)
        data = {"metadata": json.dumps(metadata)} if metadata else None
        out: list[Uploaded] = []
        for start in range(0, len(files), batch):
            parts = [_file_part(p) for p in files[start : start + batch]]
            response = await self._request("POST", "/v1/images", files=parts, data=data)
            out.extend(_uploaded(response.json()))
        return out

    async def add_texts(
        self, texts: Iterable[str], metadata: dict[str, Any] | None = None
    ) -> list[int]:
        items = [{"text": t, "metadata": metadata or {}} for t in texts]
        body = (await self._request("POST", "/v1/texts", json={"items": items})).json()
        return [int(i["id"]) for i in body["items"]]

    async def search_text(
        self, query: str, *, k: int = 10, filter: dict[str, Any] | None = None,
        rerank: bool = False, rerank_k: int | None = None, min_score: float | None = None,
    ) -> list[ImageResult]:  # fmt: skip
        payload = {"query": query, "k": k, "filter": filter, "rerank": rerank, "rerank_k": rerank_k,
                   "min_score": min_score}  # fmt: skip
        return _image_results((await self._request("POST", "/v1/search/text", json=payload)).json())

    async def search_image(
        self, image: str | Path | bytes | None = None, *, image_id: int | None = None,
        k: int = 10, filter: dict[str, Any] | None = None, min_score: float | None = None,
    ) -> list[ImageResult]:  # fmt: skip
        data, files = _query_form(
            image, image_id, {"k": k, "filter": filter, "min_score": min_score}
        )
        response = await self._request("POST", "/v1/search/image", data=data, files=files)
        return _image_results(response.json())

    async def search_image_to_text(
        self, image: str | Path | bytes | None = None, *, image_id: int | None = None,
        k: int = 10, rerank: bool = False, rerank_k: int | None = None,
        min_score: float | None = None,
    ) -> list[TextResult]:  # fmt: skip
        fields = {"k": k, "rerank": rerank, "rerank_k": rerank_k, "min_score": min_score}
        data, files = _query_form(image, image_id, fields)
        response = await self._request("POST", "/v1/search/image-to-text", data=data, files=files)
        return _text_results(response.json())

    async def delete_image(self, image_id: int) -> None:
        await self._request("DELETE", f"/v1/images/{image_id}")

    async def delete_text(self, text_id: int) -> None:
        await self._request("DELETE", f"/v1/texts/{text_id}")
