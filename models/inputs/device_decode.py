"""Preprocessing on tensors, for decoding and resizing JPEGs on the GPU (nvJPEG).

The PIL path (`models/inputs/decode.py` + open_clip's transform) is the reference; this path mirrors
it on uint8 CHW tensors: resize the short side with antialiased bicubic, centre crop, scale to
[0, 1], normalise. Results stay within a small tolerance of the PIL path (measured in tests and
bench/index_build.py), not bit-equal: the two resamplers round differently.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def decode_jpegs(datas: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    """Decode JPEG bytes to RGB uint8 [3, H, W] tensors on `device` (nvJPEG on CUDA, batched)."""
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    return list(decoded)


def model_input(
    images: Sequence[torch.Tensor],
    size: int,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> torch.Tensor:
    """uint8 [3, H, W] images -> float [B, 3, size, size], as open_clip's eval transform."""
    out = []
    for image in images:
        resized = TF.resize(
            image, [size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True
        )
        out.append(TF.center_crop(resized, [size, size]))
    batch = torch.stack(out).float().div_(255.0)  # [B, 3, S, S]
    mean_t = torch.tensor(mean, device=batch.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=batch.device).view(1, 3, 1, 1)
    return batch.sub_(mean_t).div_(std_t)


def thumbnail_jpeg(image: torch.Tensor, size_px: int, quality: int = 85) -> bytes:
    """A JPEG thumbnail (longest side `size_px`) from a uint8 [3, H, W] tensor."""
    _, height, width = image.shape
    scale = min(1.0, size_px / max(height, width))
    small = TF.resize(
        image,
        [max(1, round(height * scale)), max(1, round(width * scale))],
        interpolation=TF.InterpolationMode.BICUBIC,
        antialias=True,
    )
    array = small.permute(1, 2, 0).contiguous().cpu().numpy()
    out = io.BytesIO()
    Image.fromarray(array, "RGB").save(out, format="JPEG", quality=quality, optimize=True)
    return out.getvalue()
