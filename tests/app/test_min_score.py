"""`min_score`: results whose cosine score is below it are dropped, on every search endpoint."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.cli import main
from tests.conftest import image_bytes, upload


def _seed(client: TestClient) -> list[int]:
    ids = [upload(client, image_bytes(i), f"i{i}.png").json()["items"][0]["id"] for i in range(8)]
    client.post("/v1/texts", json={"items": [{"text": f"caption {i}"} for i in range(8)]})
    return ids


def test_min_score_on_every_endpoint(client: TestClient) -> None:
    ids = _seed(client)
    every = client.post("/v1/search/text", json={"query": "a photo", "k": 8}).json()["results"]
    floor = sorted(h["score"] for h in every)[4]
    body = {"query": "a photo", "k": 8, "min_score": floor}
    kept = client.post("/v1/search/text", json=body).json()["results"]
    assert [h["id"] for h in kept] == [h["id"] for h in every if h["score"] >= floor]
    assert len(kept) == 4

    form = {"image_id": str(ids[0]), "k": "8"}
    images = client.post("/v1/search/image", data=form).json()["results"]
    assert images[0]["id"] == ids[0] and images[0]["score"] > 0.99
    only_self = client.post("/v1/search/image", data={**form, "min_score": "0.999"})
    assert [h["id"] for h in only_self.json()["results"]] == [ids[0]]

    texts = client.post("/v1/search/image-to-text", data=form).json()["results"]
    cut = sorted(h["score"] for h in texts)[2]
    kept_texts = client.post("/v1/search/image-to-text", data={**form, "min_score": str(cut)})
    assert [h["id"] for h in kept_texts.json()["results"]] == [
        h["id"] for h in texts if h["score"] >= cut
    ]
    nothing = client.post("/v1/search/text", json={**body, "min_score": 1.0}).json()
    assert nothing["results"] == []


def test_min_score_is_bounded(client: TestClient) -> None:
    _seed(client)
    for bad in (1.5, -1.01, "x"):
        r = client.post("/v1/search/text", json={"query": "q", "min_score": bad})
        assert r.status_code == 422, r.text
    r = client.post("/v1/search/image", data={"image_id": "1", "min_score": "2"})
    assert r.status_code == 422


def test_cli_min_score(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    photos = tmp_path / "p"
    photos.mkdir()
    for i in range(4):
        (photos / f"p{i}.png").write_bytes(image_bytes(i))
    data = str(tmp_path / "d")
    tiny = ["--model", "xmodal-tiny", "--pretrained", "none", "--device", "cpu"]
    assert main(["index", str(photos), "--data-dir", data, "--workers", "0", "--quiet", *tiny]) == 0
    capsys.readouterr()
    assert main(["search", "q", "--json", "--data-dir", data, "--min-score", "1", *tiny]) == 0
    assert capsys.readouterr().out.strip() == "[]"
