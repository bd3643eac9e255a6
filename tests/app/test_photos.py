"""Real photo collections: HEIC/AVIF/WebP and the other formats, made in the test itself; the
photo's own metadata (reserved fields) on upload and bulk index; the GPS privacy switch."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.library import Library
from app.services.bulk import index_paths
from models.encoder import Encoder
from tests.conftest import AppFactory, image_bytes, make_settings, upload
from tests.models.test_exif import GOOD, photo_jpeg

FORMATS = ["HEIF", "AVIF", "WEBP", "JPEG", "PNG", "GIF", "TIFF", "BMP"]


def encoded(fmt: str, size: tuple[int, int] = (64, 48), exif: bytes | None = None) -> bytes:
    picture = Image.open(io.BytesIO(image_bytes(7, "PNG", size))).convert("RGB")
    out = io.BytesIO()
    extra: dict[str, Any] = {"exif": exif} if exif is not None else {}
    picture.save(out, format=fmt, **extra)
    return out.getvalue()


def _state(client: TestClient) -> tuple[int, list[int]]:
    ids = [i["id"] for i in client.get("/v1/images").json()["items"]]
    return client.get("/v1/info").json()["counts"]["images"], ids


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_uploads_and_truncated_is_422(client: TestClient, fmt: str) -> None:
    data = encoded(fmt)
    r = upload(client, data, f"photo.{fmt.lower()}")
    assert r.status_code == 201, r.text
    item = r.json()["items"][0]
    assert (item["width"], item["height"]) == (64, 48)
    assert item["metadata"]["width"] == 64 and item["metadata"]["height"] == 48
    assert client.get(item["thumbnail_url"]).headers["content-type"] == "image/jpeg"
    assert client.get(item["url"]).content == data
    before = _state(client)
    r = upload(client, data[: len(data) // 2], f"cut.{fmt.lower()}")
    assert r.status_code == 422, (fmt, r.text)
    assert _state(client) == before


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF", "WEBP"])
def test_pixel_limit_is_checked_from_the_header(make_client: AppFactory, fmt: str) -> None:
    client = make_client(limits={"max_image_pixels": 64 * 64})
    r = upload(client, encoded(fmt, (80, 64)), "big")
    assert r.status_code == 413, r.text
    assert _state(client) == (0, [])


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF", "WEBP", "JPEG"])
def test_exif_orientation_and_fields_per_format(client: TestClient, fmt: str) -> None:
    exif = Image.open(io.BytesIO(photo_jpeg(**GOOD))).getexif()
    exif[0x0112] = 6  # rotate 90 degrees: the upright picture is 48 x 64
    item = upload(client, encoded(fmt, (64, 48), exif.tobytes()), "p").json()["items"][0]
    assert (item["width"], item["height"]) == (48, 64)
    meta = item["metadata"]
    assert (meta["width"], meta["height"]) == (48, 64)
    assert meta["taken_at"] == "2023-07-14T18:03:22+02:00"
    assert meta["camera"] == "Apple iPhone 13 mini"
    assert meta["gps"] == {"lat": 48.858267, "lon": -2.2945}
    thumb = Image.open(io.BytesIO(client.get(item["thumbnail_url"]).content))
    assert thumb.width < thumb.height


def test_reserved_fields_filter_and_client_wins(client: TestClient) -> None:
    older = photo_jpeg(exif_ifd={0x9003: "2019:05:01 09:00:00"})
    newer = photo_jpeg(**GOOD)
    assert upload(client, older, "old.jpg").status_code == 201
    r = upload(client, newer, "new.jpg", metadata='{"camera": "mine", "album": "paris"}')
    meta = r.json()["items"][0]["metadata"]
    assert meta["camera"] == "mine" and meta["album"] == "paris"
    assert meta["taken_at"] == "2023-07-14T18:03:22+02:00"

    def found(filter_: dict[str, Any]) -> list[str]:
        body = {"query": "a photo", "k": 10, "filter": filter_}
        results = client.post("/v1/search/text", json=body).json()["results"]
        return sorted(h["filename"] for h in results)

    assert found({"taken_at": {"$gte": "2023-01-01", "$lt": "2024-01-01"}}) == ["new.jpg"]
    assert found({"taken_at": {"$lt": "2020-01-01"}}) == ["old.jpg"]
    assert found({"gps.lat": {"$gte": 48.5, "$lte": 49.5}}) == ["new.jpg"]
    assert found({"gps": {"$exists": True}}) == ["new.jpg"]


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_malformed_exif_never_fails_the_upload(client: TestClient) -> None:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(
        out, format="JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff"
    )
    r = upload(client, out.getvalue(), "broken.jpg")
    assert r.status_code == 201, r.text
    assert r.json()["items"][0]["metadata"] == {"width": 8, "height": 8}


def test_store_gps_off_keeps_the_position_out(make_client: AppFactory) -> None:
    client = make_client(store_gps=False)
    data = photo_jpeg(**GOOD)
    meta = upload(client, data, "p.jpg").json()["items"][0]["metadata"]
    assert "gps" not in meta and meta["camera"] == "Apple iPhone 13 mini"
    # What the client itself sends is its own business.
    sent = upload(client, image_bytes(3), "q.png", metadata='{"gps": "home"}').json()
    assert sent["items"][0]["metadata"]["gps"] == "home"


def test_bulk_index_reads_formats_and_fields(encoder: Encoder, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    exif = Image.open(io.BytesIO(photo_jpeg(**GOOD))).getexif().tobytes()
    (folder / "a.heic").write_bytes(encoded("HEIF", (64, 48), exif))
    (folder / "b.avif").write_bytes(encoded("AVIF", (64, 48)))
    (folder / "c.jpg").write_bytes(photo_jpeg(**GOOD))
    (folder / "d.heic").write_bytes(encoded("HEIF")[:100])
    settings = make_settings(tmp_path / "data", store_gps=False)
    library = Library.open(settings, encoder)
    try:
        report = index_paths(
            library, [folder], batch_size=4, workers=0, progress=False, metadata={"camera": "x"}
        )
        rows = {r.filename: r.metadata for r in library.store.list_items("image")}
    finally:
        library.close()
    assert report.added == 3 and [Path(p).name for p, _ in report.failed] == ["d.heic"]
    assert rows["a.heic"]["taken_at"] == "2023-07-14T18:03:22+02:00"
    assert rows["a.heic"]["camera"] == "x"  # the caller's metadata wins
    assert "gps" not in rows["c.jpg"] and rows["c.jpg"]["source"] == "c.jpg"
    assert (rows["b.avif"]["width"], rows["b.avif"]["height"]) == (64, 48)
