"""Shared fixtures: the tiny model (loaded once), real image bytes, apps on temp data dirs."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from models.encoder import Encoder
from models.factory import EncoderSpec, load_encoder

# Two threads per process on a 2-core machine; one when pytest-xdist runs two workers side by
# side (`make pytest`), or four OpenMP threads would spin against each other on two cores.
torch.set_num_threads(1 if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 else 2)

TINY = {"name": "xmodal-tiny", "pretrained": "none", "device": "cpu", "precision": "fp32"}


@pytest.fixture(scope="session")
def encoder() -> Encoder:
    return load_encoder(EncoderSpec(**TINY))


def tiny_clip() -> str:
    """Register and name xmodal-tiny's towers as a plain CLIP (no caption decoder, no CLS
    token): the model kind that serves search but cannot re-rank."""
    import open_clip

    from models.factory import register_builtin_configs, register_config

    register_builtin_configs()
    cfg = open_clip.get_model_config("xmodal-tiny")
    assert cfg is not None
    drop = ("embed_cls", "output_tokens", "attentional_pool")
    register_config(
        "xmodal-tiny-clip",
        {
            "embed_dim": cfg["embed_dim"],
            "vision_cfg": {k: v for k, v in cfg["vision_cfg"].items() if k not in drop},
            "text_cfg": {k: v for k, v in cfg["text_cfg"].items() if k not in drop},
        },
    )
    return "xmodal-tiny-clip"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (96, 72)) -> bytes:
    """A distinct, real image: smooth random colour blobs (noise would be meaningless)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    picture = Image.fromarray(small, "RGB").resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    picture.save(out, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return out.getvalue()


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"data_dir": data_dir, "model": dict(TINY)}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return Settings(**values)


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/readyz")
        if response.status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"not ready after {timeout}s: {client.get('/readyz').text}")


AppFactory = Callable[..., TestClient]


@pytest.fixture
def make_client(encoder: Encoder, tmp_path: Path) -> Iterator[AppFactory]:
    """Open a TestClient (real ASGI stack, lifespan included) on a data dir; closed at the end."""
    opened: list[TestClient] = []

    def factory(data_dir: Path | None = None, **overrides: Any) -> TestClient:
        settings = make_settings(data_dir or tmp_path / "data", **overrides)
        client = TestClient(create_app(settings, encoder=encoder))
        client.__enter__()
        opened.append(client)
        wait_ready(client)
        return client

    yield factory
    for client in opened:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: AppFactory) -> TestClient:
    return make_client()


def upload(client: TestClient, content: bytes, name: str = "x.png", **data: str) -> Any:
    return client.post("/v1/images", files={"files": (name, content, "image/png")}, data=data)
