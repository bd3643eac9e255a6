"""Extreme values in every field of every operation, generated from the app's own OpenAPI document.

For each operation a valid request is built from the document (and checked to succeed); then each
field in turn - path and query parameters, JSON body properties (nested: text items, filter
values, metadata values), multipart fields and files - gets each extreme value while the others
stay valid. A field added to the API is covered without touching this file. Every answer must be
below 500, a status the operation declares, and a body that matches the declared schema.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jsonschema
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from models.encoder import Encoder
from tests.conftest import image_bytes, make_settings, wait_ready


class Raw:
    """A JSON literal Python's json module would not write as such (NaN, 1e999)."""

    def __init__(self, literal: str) -> None:
        self.literal = literal

    def __repr__(self) -> str:
        return self.literal


NUMBERS: list[Any] = [
    0, -1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**40, 1.5, 2.0, True, False,
    Raw("NaN"), Raw("1e999"), Raw("-1e999"),
]  # fmt: skip
STRINGS: list[Any] = [
    "", " ", "x" * 1_000_000, "a\x00b", "\ud800", "\udfff lone", "\u202eevil\u202c", "\ufeff",
]  # fmt: skip
URL_MAX = 60_000
EXTREMES: list[Any] = NUMBERS + STRINGS + [None, [], {}]
FILES: list[bytes] = [
    b"",
    b"\x00" * 1_000_000,
    b"\x1c\xf0\xb5\x8d\x9aI",  # what PIL's IPTC parser would claim
    b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,  # a PNG signature and nothing valid after it
    image_bytes(3)[:200],  # truncated
]


def _text(value: Any) -> str:
    """A value as it travels in a path, query or form field."""
    if isinstance(value, Raw):
        return value.literal
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _json(body: Any) -> bytes:
    """JSON text with Raw literals inlined and lone surrogates kept as escapes."""
    marks: dict[str, str] = {}

    def swap(node: Any) -> Any:
        if isinstance(node, Raw):
            mark = f"@@raw{len(marks)}@@"
            marks[f'"{mark}"'] = node.literal
            return mark
        if isinstance(node, dict):
            return {k: swap(v) for k, v in node.items()}
        if isinstance(node, list):
            return [swap(v) for v in node]
        return node

    text = json.dumps(swap(body))
    for mark, literal in marks.items():
        text = text.replace(mark, literal)
    return text.encode("ascii")


@pytest.fixture(scope="module")
def client(encoder: Encoder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    data: Path = tmp_path_factory.mktemp("extremes") / "data"
    with TestClient(create_app(make_settings(data), encoder=encoder)) as c:
        wait_ready(c)
        for seed in range(2):
            r = c.post("/v1/images", files={"files": ("s.png", image_bytes(seed), "image/png")})
        c.known = {"image_id": r.json()["items"][0]["id"]}  # type: ignore[attr-defined]
        r = c.post("/v1/texts", json={"items": [{"text": "a seeded text"}]})
        c.known["text_id"] = r.json()["items"][0]["id"]  # type: ignore[attr-defined]
        yield c


class Doc:
    def __init__(self, doc: dict[str, Any], known: dict[str, int]) -> None:
        self.doc = doc
        self.known = known  # stored ids by parameter name, so the valid request finds its item

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            node: Any = self.doc
            for part in schema["$ref"].lstrip("#/").split("/"):
                node = node[part]
            schema = node
        return schema

    def sample(self, schema: dict[str, Any], name: str = "") -> Any:
        """A valid value for `schema` (enough of it for this API's document)."""
        schema = self.resolve(schema)
        if "anyOf" in schema:
            choices = [c for c in schema["anyOf"] if c.get("type") != "null"]
            return self.sample(choices[0], name)
        kind = schema.get("type")
        if "default" in schema and schema["default"] is not None:
            return schema["default"]
        if kind == "integer":
            return self.known.get(name, max(1, schema.get("minimum", 1)))
        if kind == "number":
            return 1.0
        if kind == "boolean":
            return False
        if kind == "string":
            if schema.get("contentMediaType") == "application/octet-stream":
                return image_bytes(7)
            return "{} a photo" if schema.get("pattern") == r"\{\}" else "a photo"
        if kind == "array":
            count = max(1, schema.get("minItems", 1))
            return [self.sample(schema.get("items", {}), name) for _ in range(count)]
        if kind == "object":
            props = schema.get("properties", {})
            return {
                k: self.sample(v, k) for k, v in props.items() if k in schema.get("required", [])
            }
        return "a"

    def response_schema(self, operation: dict[str, Any], status: int) -> dict[str, Any] | None:
        declared = operation["responses"].get(str(status))
        assert declared is not None, f"status {status} is not declared"
        content = declared.get("content", {}).get("application/json")
        return None if content is None else content.get("schema")


def _cases(doc: Doc) -> Iterator[tuple[str, str, dict[str, Any], str, list[Any]]]:
    """(method, path, operation, field, values) for every field of every operation."""
    for path, item in doc.doc["paths"].items():
        for method, operation in item.items():
            for param in operation.get("parameters", []):
                values = EXTREMES
                if param["in"] == "path":  # an empty segment is another URL, not this field
                    values = [v for v in EXTREMES if _text(v) != ""]
                yield method, path, operation, f"{param['in']}:{param['name']}", values
            body = operation.get("requestBody", {}).get("content", {})
            for media, spec in body.items():
                schema = doc.resolve(spec["schema"])
                for name, prop in schema.get("properties", {}).items():
                    prop = doc.resolve(prop)
                    is_file = "application/octet-stream" in json.dumps(prop)
                    values: list[Any] = FILES if is_file else EXTREMES
                    yield method, path, operation, f"{media}:{name}", values
                    if media == "application/json":
                        yield from _nested(doc, method, path, operation, name, prop)


def _nested(
    doc: Doc, method: str, path: str, operation: dict[str, Any], name: str, prop: dict[str, Any]
) -> Iterator[tuple[str, str, dict[str, Any], str, list[Any]]]:
    """One level in: the properties of array items (texts), and values inside objects."""
    choices = [doc.resolve(c) for c in prop.get("anyOf", [prop]) if c.get("type") != "null"]
    for choice in choices:
        if choice.get("type") == "array":
            items = doc.resolve(choice.get("items", {}))
            if items.get("type") == "object":
                for sub in items.get("properties", {}):
                    yield method, path, operation, f"application/json:{name}[0].{sub}", EXTREMES
            else:
                yield method, path, operation, f"application/json:{name}[0]", EXTREMES
        elif choice.get("type") == "object":
            yield method, path, operation, f"application/json:{name}.key", EXTREMES
            yield method, path, operation, f"application/json:{name}.key.$gt", EXTREMES
            yield method, path, operation, f"application/json:{name}.key.$in", EXTREMES


def _request(
    client: TestClient, doc: Doc, method: str, path: str, operation: dict[str, Any],
    field: str | None, value: Any,
) -> Any:  # fmt: skip
    """Send the operation's valid request with `field` set to `value` (None: unchanged)."""
    url = path
    query: list[str] = []
    for param in operation.get("parameters", []):
        where, name = param["in"], param["name"]
        raw = value if field == f"{where}:{name}" else doc.sample(param["schema"], name)
        if isinstance(raw, str) and len(raw) > URL_MAX:
            raw = raw[:URL_MAX]  # the longest URL the client sends (servers refuse sooner)
        # percent-encoded bytes: a lone surrogate arrives as the invalid UTF-8 it would be
        encoded = quote(_text(raw).encode("utf-8", "surrogatepass"), safe="")
        if where == "path":
            url = url.replace("{" + name + "}", encoded)
        elif where == "query":
            query.append(f"{name}={encoded}")
    if query:
        url += "?" + "&".join(query)
    content = operation.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        body = doc.sample(content["application/json"]["schema"])
        if field is not None and field.startswith("application/json:"):
            _set(body, field.split(":", 1)[1], value)
        return client.request(
            method, url, content=_json(body),
            headers={"content-type": "application/json"},
        )  # fmt: skip
    if "multipart/form-data" in content:
        schema = doc.resolve(content["multipart/form-data"]["schema"])
        values = {k: doc.sample(v, k) for k, v in schema.get("properties", {}).items()}
        required = set(schema.get("required", []))
        if "oneOf" in schema:  # exactly one of file / image_id: the id, unless testing the file
            required.add("image_id")
        if field is not None and field.startswith("multipart/form-data:"):
            name = field.split(":", 1)[1]
            values[name] = value
            required.add(name)
            if name == "file" and "oneOf" in schema:
                required.discard("image_id")
        files: list[tuple[str, Any]] = []
        for name in required:
            for one in values[name] if isinstance(values[name], list) else [values[name]]:
                if isinstance(one, bytes):
                    files.append((name, ("f.png", one, "image/png")))
                else:
                    files.append((name, (None, _text(one).encode("utf-8", "surrogatepass"))))
        return client.request(method, url, files=files)
    return client.request(method, url)


def _set(body: dict[str, Any], where: str, value: Any) -> None:
    """Set body[where]: 'name', 'name[0]', 'name[0].sub', 'name.key', 'name.key.$op'."""
    head, _, rest = where.partition(".")
    if head.endswith("[0]"):
        head = head[:-3]
        if not rest:
            body[head] = [value]
            return
        items = body.setdefault(head, [{}])
        items[0][rest] = value
        return
    if not rest:
        body[head] = value
    elif rest == "key":
        body[head] = {"key": value}
    else:
        op = rest.split(".", 1)[1]
        body[head] = {"key": {op: value}}


def _check(doc: Doc, operation: dict[str, Any], response: Any, what: str) -> None:
    status = response.status_code
    assert status < 500, f"{what}: {status} {response.text[:300]}"
    schema = doc.response_schema(operation, status)
    if schema is not None:
        root = {"allOf": [schema], "components": doc.doc["components"]}
        jsonschema.validate(response.json(), root)


@pytest.mark.slow
def test_every_field_at_its_extremes(client: TestClient) -> None:
    doc = Doc(client.get("/openapi.json").json(), client.known)  # type: ignore[attr-defined]
    seen: set[tuple[str, str]] = set()
    statuses: dict[int, int] = {}
    sent = 0
    for method, path, operation, field, values in _cases(doc):
        if method != "delete" and (method, path) not in seen:
            seen.add((method, path))  # the unchanged request is valid: the extremes mean something
            valid = _request(client, doc, method, path, operation, None, None)
            assert valid.status_code < 300, f"{method} {path}: {valid.status_code} {valid.text}"
        for value in values:
            shown = repr(value)[:40]
            response = _request(client, doc, method, path, operation, field, value)
            _check(doc, operation, response, f"{method.upper()} {path} {field}={shown}")
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            sent += 1
    assert sent > 800, statuses  # every operation, every field, every value
    # most extremes are refused, some are fine (0 as a cursor, 2^31 as an unknown id: 404)
    assert statuses.get(422, 0) > sent / 2 and statuses.get(200, 0) > 20, statuses
    print(statuses)


def test_numbers_beyond_64_bits_are_422_naming_the_field(client: TestClient) -> None:
    big = 2**64
    cases = [
        client.get(f"/v1/images/{big}"),
        client.get(f"/v1/texts/{big}"),
        client.delete(f"/v1/images/{big}"),
        client.get("/v1/images", params={"after": big}),
        client.post("/v1/search/image", data={"image_id": str(big)}),
        client.post("/v1/search/text", json={"query": "a", "filter": {"year": big}}),
        client.post("/v1/search/text", json={"query": "a", "filter": {"year": {"$lt": -big}}}),
        client.post("/v1/search/text", json={"query": "a", "filter": {"y": {"$in": [1, big]}}}),
        client.post(
            "/v1/search/image", data={"image_id": "1", "filter": json.dumps({"year": 1e300})}
        ),
    ]
    for r in cases:
        assert r.status_code == 422, r.text
        message = r.json()["error"]["message"]
        assert any(name in message for name in ("image_id", "text_id", "after", "year", "'y'"))
    nan = client.post(
        "/v1/search/text",
        content=b'{"query": "a", "filter": {"year": NaN}}',
        headers={"content-type": "application/json"},
    )
    assert nan.status_code == 422 and "year" in nan.json()["error"]["message"]


def test_405_names_every_allowed_method(client: TestClient) -> None:
    r = client.put("/v1/images")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    r = client.post("/v1/images/1")
    assert r.status_code == 405 and r.headers["allow"] == "GET, DELETE"
    assert r.json()["error"]["code"] == "method_not_allowed"
