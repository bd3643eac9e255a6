"""A real `xmodal serve` process on loopback, driven by the Python client."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.client import APIError, AsyncXmodalClient, XmodalClient
from tests.conftest import image_bytes
from tests.e2e.server import ServerProcess


def _write_images(folder: Path, seeds: range) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        fmt = "JPEG" if seed % 3 == 0 else "PNG"
        path = folder / f"img{seed}.{fmt.lower()}"
        path.write_bytes(image_bytes(seed, fmt))
        paths.append(path)
    return paths


@pytest.mark.slow
def test_serve_upload_search_delete_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    photos = _write_images(tmp_path / "photos", range(30))
    server = ServerProcess(data).start()
    try:
        with XmodalClient(server.url) as client:
            uploaded = list(client.upload([tmp_path / "photos"], metadata={"set": "a"}, batch=8))
            assert len(uploaded) == 30 and not any(u.duplicate for u in uploaded)
            by_name = {u.filename: u.id for u in uploaded}
            text_ids = client.add_texts([f"caption {i}" for i in range(10)])
            for path in photos[:5]:
                assert client.search_image(path, k=3)[0].id == by_name[path.name]
            assert len(client.search_text("a photo", k=5, filter={"set": "a"})) == 5
            assert len(client.search_image_to_text(photos[0], k=3)) == 3
            client.delete_image(by_name[photos[1].name])
            client.delete_text(text_ids[0])
            with pytest.raises(APIError) as bad:
                client.search_text("   ")
            assert bad.value.status == 422
            with pytest.raises(APIError) as bad_upload:
                list(client.upload([tmp_path / "photos" / "img0.jpeg", __file__]))
            assert bad_upload.value.status == 415
        # uvicorn re-raises SIGTERM after a graceful shutdown, so -15 is a clean exit too
        assert server.stop() in (0, -15)
        assert "Application shutdown complete" in server.log_tail()
        server.start()
        with XmodalClient(server.url) as client:
            info = client.info()
            assert info["counts"] == {"images": 29, "texts": 9}
            for path in photos[2:6]:
                assert client.search_image(path, k=1)[0].id == by_name[path.name]
            assert all(h.id != by_name[photos[1].name] for h in client.search_text("x", k=50))
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.anyio
async def test_async_client_and_model_mismatch(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write_images(tmp_path / "p", range(3))
    server = ServerProcess(data).start()
    try:
        async with AsyncXmodalClient(server.url) as client:
            items = await client.upload([tmp_path / "p"])
            hits = await client.search_image(image_id=items[0].id, k=1)
            assert hits[0].id == items[0].id
    finally:
        server.stop()
    # Same data dir, different weights: refuse clearly instead of mixing vectors.
    weights = tmp_path / "other.pt"
    import torch

    from models.factory import EncoderSpec, load_encoder

    model = load_encoder(EncoderSpec(name="xmodal-tiny", pretrained="none", device="cpu")).model
    torch.save({k: v * 1.5 for k, v in model.state_dict().items()}, weights)
    other = ServerProcess(data, "--pretrained", str(weights))
    with pytest.raises(RuntimeError, match="fingerprint"):
        other.start(timeout=60)
    reembedded = ServerProcess(data, "--pretrained", str(weights), "--reembed").start()
    try:
        with XmodalClient(reembedded.url) as client:
            assert client.info()["counts"]["images"] == 3
            first = client.search_image(tmp_path / "p" / "img1.png", k=1)[0]
            assert first.filename == "img1.png" and first.score > 0.999
    finally:
        reembedded.stop()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
