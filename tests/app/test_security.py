"""Limits and exposure: streamed bodies are cut at the limit, CORS is off unless configured,
uploads are limited in count, and stored files never use client names."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import AppFactory, image_bytes, upload


def test_files_per_request_limit(make_client: AppFactory) -> None:
    client = make_client(limits={"max_files_per_request": 2})
    files = [("files", (f"{i}.png", image_bytes(i), "image/png")) for i in range(3)]
    r = client.post("/v1/images", files=files)
    # a bound the OpenAPI document states (maxItems), so a field error
    assert r.status_code == 422 and "at most 2 files" in r.json()["error"]["message"]
    assert client.get("/v1/info").json()["counts"]["images"] == 0


def test_cors_off_by_default_and_on_when_configured(
    make_client: AppFactory, tmp_path: Path
) -> None:
    plain = make_client(tmp_path / "a")
    r = plain.get("/v1/info", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    plain.__exit__(None, None, None)
    allowed = make_client(tmp_path / "b", cors_origins=["https://photos.example"])
    ok = allowed.get("/v1/info", headers={"Origin": "https://photos.example"})
    assert ok.headers["access-control-allow-origin"] == "https://photos.example"
    other = allowed.get("/v1/info", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_stored_names_are_content_addresses(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    content = image_bytes(5)
    item = upload(client, content, "../../../../tmp/owned.png").json()["items"][0]
    stored = list((tmp_path / "data" / "media").rglob("*.png"))
    assert [p.name for p in stored] == [f"{item['sha256']}.png"]
    assert not Path("/tmp/owned.png").exists()


def test_exif_rotated_upload_is_stored_upright(client) -> None:  # type: ignore[no-untyped-def]
    from tests.models.test_decode import _jpeg_with_orientation

    item = upload(client, _jpeg_with_orientation(6), "rotated.jpg").json()["items"][0]
    assert (item["width"], item["height"]) == (20, 40)
