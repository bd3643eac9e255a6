"""The tensor (GPU-ready) JPEG path agrees with the PIL path within a small tolerance."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from models.encoder import Encoder
from models.inputs.decode import decode_image
from models.inputs.device_decode import decode_jpegs, model_input, thumbnail_jpeg
from tests.conftest import image_bytes


def test_tensor_path_matches_pil_path(encoder: Encoder) -> None:
    jpegs = [image_bytes(i, "JPEG", (640, 360)) for i in range(4)]
    tensors = decode_jpegs(jpegs, torch.device("cpu"))
    assert tensors[0].shape == (3, 360, 640) and tensors[0].dtype == torch.uint8
    cfg = encoder.preprocess_cfg
    fast = model_input(tensors, encoder.image_size, cfg["mean"], cfg["std"])
    reference = torch.stack(
        [encoder.preprocess_image(decode_image(j, max_pixels=10**8).image) for j in jpegs]
    )
    assert fast.shape == reference.shape
    assert (fast - reference).abs().mean() < 0.05
    cosine = np.sum(encoder.encode_images(fast) * encoder.encode_images(reference), axis=1)
    assert cosine.min() > 0.995


def test_thumbnail_from_tensor() -> None:
    tensor = decode_jpegs([image_bytes(1, "JPEG", (800, 400))], torch.device("cpu"))[0]
    thumb = Image.open(io.BytesIO(thumbnail_jpeg(tensor, 256)))
    assert thumb.format == "JPEG" and thumb.size == (256, 128)
