"""Bad input gets a clear 4xx, never a 5xx, and the stored data stays as it was."""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import AppFactory, image_bytes, upload


def _state(client: TestClient) -> tuple[int, int, list[int]]:
    info = client.get("/v1/info").json()
    ids = [i["id"] for i in client.get("/v1/images").json()["items"]]
    return info["counts"]["images"], info["counts"]["texts"], ids


@pytest.fixture
def seeded(client: TestClient) -> TestClient:
    for i in range(3):
        assert upload(client, image_bytes(i)).status_code == 201
    client.post("/v1/texts", json={"items": [{"text": "one"}, {"text": "two"}]})
    return client


def _png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header that declares a huge image, with a tiny compressed body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


BAD_UPLOADS = [
    ("not an image", b"hello, I am text", 415),
    ("empty", b"", 422),
    ("truncated jpeg", image_bytes(9, "JPEG", (400, 300))[:600], 422),
    ("truncated png", image_bytes(9, "PNG", (400, 300))[:300], 422),
    ("decompression bomb", _png_bomb(100_000, 100_000), 413),
    ("html", b"<html><script>alert(1)</script></html>", 415),
]


@pytest.mark.parametrize(
    ("label", "content", "status"), BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS]
)
def test_bad_uploads(seeded: TestClient, label: str, content: bytes, status: int) -> None:
    before = _state(seeded)
    r = upload(seeded, content, f"{label}.png")
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and r.json()["error"]["message"]
    assert _state(seeded) == before
    assert not list((seeded.app.state.settings.data_dir / "tmp").iterdir())  # type: ignore[attr-defined]


def test_one_bad_file_stores_nothing_of_the_request(seeded: TestClient) -> None:
    before = _state(seeded)
    files = [
        ("files", ("good.png", image_bytes(50), "image/png")),
        ("files", ("bad.png", b"garbage", "image/png")),
    ]
    r = seeded.post("/v1/images", files=files)
    assert r.status_code == 415 and "bad.png" in r.json()["error"]["message"]
    assert _state(seeded) == before


def test_oversized_upload_refused(make_client: AppFactory) -> None:
    client = make_client(limits={"max_upload_bytes": 4096, "max_request_bytes": 64 * 1024})
    big = image_bytes(1, "PNG", (200, 200))
    assert len(big) > 4096
    assert upload(client, big).status_code == 413
    huge = b"\x89PNG" + b"\x00" * (100 * 1024)
    r = upload(client, huge)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    assert client.get("/v1/info").json()["counts"]["images"] == 0


def test_pixel_limit(make_client: AppFactory) -> None:
    client = make_client(limits={"max_image_pixels": 100 * 100})
    assert upload(client, image_bytes(1, "PNG", (101, 100))).status_code == 413
    assert upload(client, image_bytes(1, "PNG", (100, 100))).status_code == 201


@pytest.mark.parametrize(
    "body",
    [
        {"query": ""},
        {"query": "   \t\n"},
        {"query": "x" * 20_000},
        {"query": "x" * 1001},
        {"query": "\ud800 lone surrogate"},
        {"query": "ok", "k": 0},
        {"query": "ok", "k": -3},
        {"query": "ok", "k": 10**9},
        {"query": "ok", "k": "many"},
        {"query": "ok", "filter": "album=x"},
        {"query": "ok", "filter": {"album": ["a", "b"]}},
        {"query": "ok", "filter": {"album": {"$regex": "a"}}},
        {"query": "ok", "filter": {"bad key!": 1}},
        {"query": "ok", "filter": {"n": {"$in": "notalist"}}},
        {"query": "ok", "filter": {"n": None}},
        {"query": "ok", "unknown": 1},
        {"query": "ok", "k": True},
        {"query": "ok", "k": 2.5},
        {"query": "ok", "rerank_k": 0},
        {"query": "ok", "rerank": True, "rerank_k": 0},
        {"k": 3},
    ],
)
def test_bad_text_queries(seeded: TestClient, body: dict) -> None:
    raw = json.dumps(body)  # lone surrogates survive as \ud800 escapes
    r = seeded.post("/v1/search/text", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_field"


def test_k_larger_than_collection(seeded: TestClient) -> None:
    r = seeded.post("/v1/search/text", json={"query": "ok", "k": 1000})
    assert r.status_code == 200 and len(r.json()["results"]) == 3


@pytest.mark.parametrize(
    ("data", "status"),
    [
        ({"image_id": "999999"}, 404),
        ({"image_id": "-1"}, 422),
        ({"image_id": "abc"}, 422),
        ({}, 422),
        ({"image_id": "1", "k": "0"}, 422),
        ({"image_id": "1", "filter": "{not json"}, 422),
        ({"image_id": "1", "filter": "[1, 2]"}, 422),
    ],
)
def test_bad_image_queries(seeded: TestClient, data: dict, status: int) -> None:
    r = seeded.post("/v1/search/image", data=data)
    assert r.status_code == status, r.text
    r = seeded.post("/v1/search/image-to-text", data=data)
    assert r.status_code == status, r.text


def test_both_file_and_image_id_is_refused(seeded: TestClient) -> None:
    r = seeded.post(
        "/v1/search/image",
        files={"file": ("q.png", image_bytes(1), "image/png")},
        data={"image_id": "1"},
    )
    assert r.status_code == 422


@pytest.mark.parametrize(
    "metadata",
    ["[1, 2]", "not json", '"a string"', "null", json.dumps({"k": "v" * 20_000})],
)
def test_bad_metadata(seeded: TestClient, metadata: str) -> None:
    before = _state(seeded)
    r = upload(seeded, image_bytes(77), metadata=metadata)
    assert r.status_code in (413, 422), r.text
    assert _state(seeded) == before


def test_unknown_ids(seeded: TestClient) -> None:
    for path in ("/v1/images/424242", "/v1/images/424242/content", "/v1/images/424242/thumbnail",
                 "/v1/texts/424242"):  # fmt: skip
        assert seeded.get(path).status_code == 404
    assert seeded.delete("/v1/images/424242").status_code == 404
    assert seeded.get("/v1/images/not-a-number").status_code == 422


def test_malformed_multipart(seeded: TestClient) -> None:
    before = _state(seeded)
    r = seeded.post(
        "/v1/images",
        content=b'--xyz\r\nContent-Disposition: form-data; name="files"\r\n\r\nabc',
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert 400 <= r.status_code < 500
    r = seeded.post("/v1/images", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert _state(seeded) == before


def test_bad_texts(seeded: TestClient) -> None:
    before = _state(seeded)
    for body in [
        {"items": []},
        {"items": [{"text": ""}]},
        {"items": [{"text": "   "}]},
        {"items": [{"text": "ok", "metadata": [1]}]},
        {"items": [{"text": "x" * 5000}]},
        {"texts": ["wrong shape"]},
    ]:
        r = seeded.post("/v1/texts", json=body)
        assert r.status_code == 422, (body, r.text)
    assert _state(seeded) == before


def test_awkward_but_valid_images(client: TestClient) -> None:
    """Modes and encodings people really upload: each is stored and searchable."""
    cases: dict[str, bytes] = {}
    out = io.BytesIO()
    Image.new("I;16", (40, 30), 40000).save(out, "PNG")
    cases["16-bit png"] = out.getvalue()
    out = io.BytesIO()
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(out, "JPEG")
    cases["cmyk jpeg"] = out.getvalue()
    out = io.BytesIO()
    palette = Image.new("P", (40, 30), 0)
    palette.putpalette([255, 0, 0] * 256)
    palette.save(out, "PNG", transparency=0)
    cases["palette with transparency"] = out.getvalue()
    out = io.BytesIO()
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100)
    cases["animated gif"] = out.getvalue()
    out = io.BytesIO()
    frames[0].save(out, "WEBP", save_all=True, append_images=frames[1:], duration=100)
    cases["animated webp"] = out.getvalue()
    for label, content in cases.items():
        r = upload(client, content, f"{label}.img")
        assert r.status_code == 201, (label, r.text)
    assert client.get("/v1/info").json()["counts"]["images"] == len(cases)
