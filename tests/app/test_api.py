"""The HTTP API end to end on the tiny model: real ASGI stack, SQLite file, FAISS, PNG/JPEG."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import AppFactory, image_bytes, upload


def _ids(response_json: dict) -> list[int]:
    return [r["id"] for r in response_json["results"]]


def _seed_collection(client: TestClient, n: int = 8) -> list[int]:
    ids = []
    for i in range(n):
        meta = json.dumps({"album": "even" if i % 2 == 0 else "odd", "n": i})
        r = upload(client, image_bytes(i, "PNG" if i % 2 else "JPEG"), f"img{i}.png", metadata=meta)
        assert r.status_code == 201, r.text
        ids.append(r.json()["items"][0]["id"])
    return ids


def test_upload_list_get_content_thumbnail(client: TestClient) -> None:
    content = image_bytes(1, "JPEG", size=(640, 480))
    r = upload(client, content, "../../etc/passwd.jpg", metadata='{"album": "trip"}')
    assert r.status_code == 201
    item = r.json()["items"][0]
    assert item["width"] == 640 and item["height"] == 480
    assert item["mime"] == "image/jpeg" and item["duplicate"] is False
    assert item["filename"] == "passwd.jpg"  # a label only; never a path on disk
    # The width and height read from the file join the metadata (filterable reserved fields).
    assert item["metadata"] == {"album": "trip", "width": 640, "height": 480}

    listed = client.get("/v1/images").json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == item["id"]
    assert client.get(f"/v1/images/{item['id']}").json()["sha256"] == item["sha256"]

    stored = client.get(item["url"])
    assert stored.status_code == 200 and stored.content == content
    thumb = client.get(item["thumbnail_url"])
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256


def test_pagination(client: TestClient) -> None:
    ids = _seed_collection(client, 5)
    first = client.get("/v1/images", params={"limit": 2}).json()
    assert [i["id"] for i in first["items"]] == ids[:2] and first["total"] == 5
    second = client.get("/v1/images", params={"limit": 2, "after": first["next_after"]}).json()
    assert [i["id"] for i in second["items"]] == ids[2:4]


def test_duplicate_upload_returns_existing_id(client: TestClient) -> None:
    content = image_bytes(7)
    first = upload(client, content).json()["items"][0]
    again = upload(client, content, "other-name.png").json()["items"][0]
    assert again["id"] == first["id"] and again["duplicate"] is True
    assert client.get("/v1/images").json()["total"] == 1


def test_multi_file_upload(client: TestClient) -> None:
    files = [("files", (f"f{i}.png", image_bytes(i), "image/png")) for i in range(3)]
    r = client.post("/v1/images", files=files)
    assert r.status_code == 201 and len({i["id"] for i in r.json()["items"]}) == 3


def test_every_search_direction(client: TestClient) -> None:
    ids = _seed_collection(client)
    texts = client.post(
        "/v1/texts", json={"items": [{"text": f"caption number {i}"} for i in range(5)]}
    )
    assert texts.status_code == 201
    text_ids = [t["id"] for t in texts.json()["items"]]

    by_text = client.post("/v1/search/text", json={"query": "a photo", "k": 3})
    assert by_text.status_code == 200 and len(by_text.json()["results"]) == 3
    scores = [r["score"] for r in by_text.json()["results"]]
    assert scores == sorted(scores, reverse=True)

    # An uploaded image queried by itself comes back first, with cosine ~1.
    for seed, image_id in [(3, ids[3]), (4, ids[4])]:
        fmt = "PNG" if seed % 2 else "JPEG"
        r = client.post(
            "/v1/search/image",
            files={"file": ("q", image_bytes(seed, fmt), "image/png")},
            data={"k": "3"},
        )
        assert r.status_code == 200
        assert r.json()["results"][0]["id"] == image_id
        assert r.json()["results"][0]["score"] > 0.999

    by_id = client.post("/v1/search/image", data={"image_id": str(ids[5]), "k": "2"})
    assert _ids(by_id.json())[0] == ids[5]

    to_text = client.post("/v1/search/image-to-text", data={"image_id": str(ids[0]), "k": "4"})
    assert to_text.status_code == 200
    hits = to_text.json()["results"]
    assert len(hits) == 4 and {h["id"] for h in hits} <= set(text_ids)
    assert all(h["text"].startswith("caption number") for h in hits)


def test_search_results_match_numpy_reference(client: TestClient) -> None:
    ids = _seed_collection(client)
    vectors = np.array(
        client.post(
            "/v1/embed/image",
            files=[
                ("files", ("f", image_bytes(i, "PNG" if i % 2 else "JPEG"), "image/png"))
                for i in range(8)
            ],
        ).json()["embeddings"]
    )
    query = np.array(
        client.post("/v1/embed/text", json={"texts": ["blue sky"]}).json()["embeddings"][0]
    )
    expected = [ids[i] for i in np.argsort(-(vectors @ query))[:5]]
    got = client.post("/v1/search/text", json={"query": "blue sky", "k": 5}).json()
    assert _ids(got) == expected


def test_filters_apply_inside_search(client: TestClient) -> None:
    ids = _seed_collection(client)
    even = client.post("/v1/search/text", json={"query": "x", "k": 10, "filter": {"album": "even"}})
    assert sorted(_ids(even.json())) == [ids[i] for i in range(0, 8, 2)]
    ranged = client.post(
        "/v1/search/text", json={"query": "x", "k": 10, "filter": {"n": {"$gte": 5}}}
    )
    assert sorted(_ids(ranged.json())) == ids[5:]
    listed = client.post(
        "/v1/search/image",
        data={"image_id": str(ids[0]), "k": "10", "filter": json.dumps({"n": {"$in": [1, 2]}})},
    )
    assert sorted(_ids(listed.json())) == [ids[1], ids[2]]
    none = client.post("/v1/search/text", json={"query": "x", "filter": {"album": "nope"}})
    assert none.status_code == 200 and none.json()["results"] == []


def test_delete_then_search(client: TestClient) -> None:
    ids = _seed_collection(client, 4)
    assert client.delete(f"/v1/images/{ids[1]}").status_code == 204
    assert client.get(f"/v1/images/{ids[1]}").status_code == 404
    r = client.post("/v1/search/text", json={"query": "x", "k": 10})
    assert ids[1] not in _ids(r.json()) and len(r.json()["results"]) == 3
    assert client.delete(f"/v1/images/{ids[1]}").status_code == 404
    text_id = client.post("/v1/texts", json={"items": [{"text": "gone soon"}]}).json()["items"][0][
        "id"
    ]
    assert client.delete(f"/v1/texts/{text_id}").status_code == 204
    assert client.get(f"/v1/texts/{text_id}").status_code == 404


def test_restart_keeps_everything(make_client: AppFactory, tmp_path: Path) -> None:
    data = tmp_path / "kept"
    first = make_client(data)
    ids = _seed_collection(first, 6)
    first.delete(f"/v1/images/{ids[0]}")
    text_ids = [
        t["id"]
        for t in first.post("/v1/texts", json={"items": [{"text": "hello"}]}).json()["items"]
    ]
    first.__exit__(None, None, None)

    second = make_client(data)
    info = second.get("/v1/info").json()
    assert info["counts"] == {"images": 5, "texts": 1}
    assert info["index"]["images"]["loaded_from"] == "file"
    r = second.post(
        "/v1/search/image", files={"file": ("q", image_bytes(3), "image/png")}, data={"k": "1"}
    )
    assert _ids(r.json()) == [ids[3]]
    assert second.get(f"/v1/images/{ids[0]}").status_code == 404
    assert second.get(f"/v1/texts/{text_ids[0]}").json()["text"] == "hello"


def test_restart_replays_writes_the_saved_index_missed(
    make_client: AppFactory, tmp_path: Path
) -> None:
    data = tmp_path / "replay"
    first = make_client(data)
    ids = _seed_collection(first, 3)
    first.__exit__(None, None, None)  # saves the indexes
    # Simulate a crash after acknowledged writes: rows in SQLite the saved index never saw.
    second = make_client(data)
    more = _seed_collection(second, 6)[3:]
    second.delete(f"/v1/images/{ids[0]}")
    runtime = second.app.state.runtime  # type: ignore[attr-defined]
    library = runtime.backend.library
    runtime.backend = None
    library.store.close()
    library.lock.release()  # the "crash": nothing saved, lock gone with the process
    third = make_client(data)
    info = third.get("/v1/info").json()
    assert info["counts"]["images"] == 5
    for seed, image_id in zip(range(3, 6), more, strict=True):
        r = third.post(
            "/v1/search/image",
            files={"file": ("q", image_bytes(seed, "PNG" if seed % 2 else "JPEG"), "image/png")},
            data={"k": "1"},
        )
        assert _ids(r.json()) == [image_id]
    assert third.get(f"/v1/images/{ids[0]}").status_code == 404


def test_info_and_metrics(client: TestClient) -> None:
    _seed_collection(client, 2)
    client.post("/v1/search/text", json={"query": "hello"})
    info = client.get("/v1/info").json()
    assert info["model"]["name"] == "xmodal-tiny" and info["model"]["dim"] == 128
    assert info["index"]["images"]["type"] == "exact"
    metrics = client.get("/metrics").text
    assert "xmodal_request_seconds_bucket" in metrics
    assert 'xmodal_batch_size_count{batcher="text_encode"}' in metrics
    assert 'xmodal_index_vectors{index="images"} 2.0' in metrics
    assert "xmodal_queue_depth" in metrics
    assert client.get("/healthz").json() == {"status": "ok", "detail": None}


def test_openapi_docs(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path in ("/v1/images", "/v1/search/text", "/v1/search/image", "/v1/search/image-to-text",
                 "/v1/embed/text", "/v1/embed/image", "/v1/classify", "/v1/info", "/v1/texts"):  # fmt: skip
        assert path in schema["paths"], path
    assert client.get("/docs").status_code == 200


def test_classify(client: TestClient) -> None:
    r = client.post(
        "/v1/classify",
        files={"file": ("q.png", image_bytes(2), "image/png")},
        data={"labels": ["cat", "dog", "car"]},
    )
    assert r.status_code == 200
    probs = [lab["probability"] for lab in r.json()["labels"]]
    assert abs(sum(probs) - 1) < 1e-5 and probs == sorted(probs, reverse=True)


def test_api_key_guards_v1(make_client: AppFactory) -> None:
    client = make_client(api_key="s3cret")
    assert client.get("/v1/info").status_code == 401
    assert client.get("/v1/info", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/healthz").status_code == 200  # ops endpoints stay open


def test_list_newest_first_with_a_cursor(client: TestClient) -> None:
    ids = _seed_collection(client, 5)
    seen: list[int] = []
    after = 0
    while True:
        page = client.get("/v1/images", params={"order": "newest", "limit": 2, "after": after})
        body = page.json()
        seen += [i["id"] for i in body["items"]]
        assert body["total"] == 5
        if body["next_after"] is None:
            break
        after = body["next_after"]
    assert seen == sorted(ids, reverse=True)
    oldest = client.get("/v1/images", params={"order": "oldest", "limit": 10}).json()
    assert [i["id"] for i in oldest["items"]] == sorted(ids)
    for bad in ({"order": "random"}, {"after": 2**63}, {"after": -1}):
        assert client.get("/v1/images", params=bad).status_code == 422
