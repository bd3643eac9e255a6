"""The OpenAPI document, made to say exactly what the server enforces.

FastAPI's document is close; this pass fixes what it cannot express by itself:
- integer bounds come out as floats (its `Schema` model types them `float`), so 2^63-1 became
  9.223372036854776e18 == 2^63, a number the server refuses; they are written back as integers;
- configured limits (`x-xmodal-limits`, see `app.schemas.limit`) take the running settings' values;
- multipart fields are absent or present, never null: the `null` alternatives go, and so does the
  `default: null`;
- form fields that carry a JSON object (`x-xmodal-json`) are described as that object, sent as an
  `application/json` part;
- "exactly one of `file` or `image_id`" becomes a `oneOf`;
- properties of the loaded model (`x-xmodal-model`, e.g. a query vector's length = the model's
  dimension) take its values once it is loaded; until then the document is not cached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.config import LimitSettings
from app.schemas import MAX_ID
from index.filters import filter_json_schema

_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
JSON_PARTS: dict[str, dict[str, Any]] = {
    "metadata": {"type": "object", "description": "JSON object stored with each file"},
    "filter": filter_json_schema(),
}


def _exact_integers(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _BOUNDS and isinstance(value, float) and value.is_integer():
                # float(2**63 - 1) rounds up to 2**63; the only bound of that size is MAX_ID
                node[key] = MAX_ID if value == float(MAX_ID) else int(value)
            else:
                _exact_integers(value)
    elif isinstance(node, list):
        for item in node:
            _exact_integers(item)


def _apply_limits(node: Any, limits: LimitSettings) -> None:
    if isinstance(node, dict):
        for keyword, setting in node.pop("x-xmodal-limits", {}).items():
            configured = int(getattr(limits, setting))
            # an optional field: the bound belongs to its non-null alternative
            targets = [c for c in node.get("anyOf", []) if keyword in c] or [node]
            for target in targets:
                hard = target.get(keyword)
                target[keyword] = configured if hard is None else min(hard, configured)
        for value in node.values():
            _apply_limits(value, limits)
    elif isinstance(node, list):
        for item in node:
            _apply_limits(item, limits)


def _apply_model(node: Any, model: dict[str, int] | None) -> None:
    if isinstance(node, dict):
        for keyword, name in node.pop("x-xmodal-model", {}).items():
            if model is not None:
                targets = [c for c in node.get("anyOf", []) if keyword in c] or [node]
                for target in targets:
                    target[keyword] = model[name]
        for value in node.values():
            _apply_model(value, model)
    elif isinstance(node, list):
        for item in node:
            _apply_model(item, model)


def _without_null(prop: dict[str, Any]) -> dict[str, Any]:
    choices = prop.get("anyOf")
    if isinstance(choices, list) and any(c == {"type": "null"} for c in choices):
        rest = [c for c in choices if c != {"type": "null"}]
        prop = {k: v for k, v in prop.items() if k != "anyOf"}
        if len(rest) == 1:
            prop = {**rest[0], **prop}
        else:
            prop["anyOf"] = rest
    if prop.get("default", 0) is None:
        prop = {k: v for k, v in prop.items() if k != "default"}
    return prop


def _nonempty_files(prop: dict[str, Any]) -> None:
    """An empty file is refused (it is no image): say so with minLength."""
    for node in (prop, prop.get("items") or {}):
        if node.get("contentMediaType") == "application/octet-stream":
            node["minLength"] = 1


def _multipart(doc: dict[str, Any]) -> None:
    schemas = doc.get("components", {}).get("schemas", {})
    for path in doc.get("paths", {}).values():
        for operation in path.values():
            content = operation.get("requestBody", {}).get("content", {})
            media = content.get("multipart/form-data")
            if media is None:
                continue
            ref = media.get("schema", {}).get("$ref", "")
            body = schemas.get(ref.rsplit("/", 1)[-1]) if ref else media.get("schema")
            if not body:
                continue
            props: dict[str, Any] = body.get("properties", {})
            encoding: dict[str, Any] = {}
            for name, prop in list(props.items()):
                what = prop.get("x-xmodal-json")
                if what is not None:
                    title = prop.get("title")
                    props[name] = {**JSON_PARTS[what], **({"title": title} if title else {})}
                    encoding[name] = {"contentType": "application/json"}
                else:
                    props[name] = _without_null(prop)
                _nonempty_files(props[name])
            if {"file", "image_id"} <= props.keys():
                operation["requestBody"]["required"] = True
                body["oneOf"] = [
                    {"required": ["file"], "not": {"required": ["image_id"]}},
                    {"required": ["image_id"], "not": {"required": ["file"]}},
                ]
            if encoding:
                media["encoding"] = encoding


def install_openapi(
    app: FastAPI, limits: LimitSettings, model: Callable[[], dict[str, int] | None]
) -> None:
    """`model`: the loaded model's properties (`dim`), or None while it is loading."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=app.routes,
            )
            _exact_integers(doc)
            _multipart(doc)
            _apply_limits(doc, limits)
            loaded = model()
            _apply_model(doc, loaded)
            if loaded is None:
                return doc
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
