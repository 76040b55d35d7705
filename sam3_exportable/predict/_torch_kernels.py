"""The torch kernels of :mod:`.processing` for artifacts that compute with torch: upstream
``Sam3Processor``'s transform and post-processing calls, verbatim, so a ``.pt2`` predicts
upstream's numbers bit for bit. Imported by name from :mod:`.processing` only when the
artifact's arrays are torch tensors."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..contract import NORMALIZE_MEAN, NORMALIZE_STD
from .images import rgb_array

__all__ = ["cxcywh_to_pixel_xyxy", "preprocess", "run_inference", "upsample_probabilities"]


@lru_cache(maxsize=8)
def _transform(size: int) -> Any:
    from torchvision.transforms import v2

    # Upstream Sam3Processor's transform, verbatim.
    return v2.Compose(
        [
            v2.ToDtype(torch.uint8, scale=True),
            v2.Resize(size=(size, size)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(NORMALIZE_MEAN), std=list(NORMALIZE_STD)),
        ]
    )


def preprocess(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """``images`` float32 ``[B, 3, size, size]`` as upstream's processor makes them."""
    transform = _transform(size)
    # the transform sees a channels-last view of one copy of the pixels: the values of
    # torchvision's to_image, without its two extra copies of a large image
    return torch.stack(
        [transform(torch.from_numpy(np.asarray(rgb_array(img))).permute(2, 0, 1)) for img in images]
    )


def cxcywh_to_pixel_xyxy(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Normalised cxcywh boxes ``[K, 4]`` to pixel xyxy, as upstream converts and scales them."""
    from torchvision.ops import box_convert

    scale = torch.tensor([width, height, width, height])
    return box_convert(boxes, "cxcywh", "xyxy") * scale[None, :]


def upsample_probabilities(low: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Mask logits ``[K, h, w]`` to probabilities ``[K, 1, height, width]`` (upstream's
    ``F.interpolate`` bilinear, ``align_corners=False``, then sigmoid)."""
    return F.interpolate(low.unsqueeze(1), (height, width), mode="bilinear", align_corners=False).sigmoid_()


def run_inference(artifact: Any, images: Any, token_ids: Any, **boxes: Any) -> Any:
    """``artifact(images, token_ids, **boxes)`` under ``torch.inference_mode`` (token ids and
    box inputs as tensors)."""
    with torch.inference_mode():
        tensors = {name: torch.as_tensor(value) for name, value in boxes.items()}
        return artifact(images, torch.as_tensor(token_ids), **tensors)


def run_encode(artifact: Any, images: Any) -> tuple[Any, ...]:
    """``artifact.encode_images(images)`` under ``torch.inference_mode``."""
    with torch.inference_mode():
        return artifact.encode_images(images)


def run_ground(artifact: Any, features: Sequence[Any], token_ids: Any, **boxes: Any) -> Any:
    """``artifact.ground(features, token_ids, **boxes)`` under ``torch.inference_mode`` (token
    ids and box inputs as tensors)."""
    with torch.inference_mode():
        tensors = {name: torch.as_tensor(value) for name, value in boxes.items()}
        return artifact.ground(features, torch.as_tensor(token_ids), **tensors)


def concat_batch(parts: Sequence[Sequence[Any]]) -> tuple[Any, ...]:
    """Each feature of ``parts`` (one tuple of tensors per group of images) concatenated
    along the batch dim."""
    return tuple(torch.cat(list(column)) for column in zip(*parts, strict=True))
