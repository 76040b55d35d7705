"""Pre- and post-processing of every artifact kind: the one path, with the arithmetic of
the artifact's array library.

What is computed is upstream ``Sam3Processor``'s: images resized to ``S x S`` (bilinear,
antialiased, on 8-bit pixels) and normalised with mean and std 0.5; per pair, scores by
:func:`..contract.pair_scores`, kept above the threshold, boxes cxcywh -> pixel xyxy, mask
logits upsampled to the image size (bilinear, ``align_corners=False``), sigmoid, then
``> 0.5``. For an artifact that computes with torch (``pt2``, ``aoti``) the kernels are
torch's and torchvision's, exactly upstream's numbers (:mod:`._torch_kernels`). For ONNX
they are numpy's, the same whether or not torch is installed: the 8-bit resize is torch's
fixed-point algorithm (:func:`resize_uint8`, equal to torchvision's on x86 CPUs), the
normalisation the same float32 operations, so the graph gets the same pixels; sigmoid and
the mask upsampling differ from torch's in the last bits (the README states the bounds).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..contract import NORMALIZE_MEAN, NORMALIZE_STD, is_torch_tensor, pair_scores, sigmoid
from .images import rgb_array

__all__ = ["preprocess", "resize_uint8", "run_graph", "select_kept", "upsample_probabilities"]

#: The torch kernels, imported by name so that the runtime install never needs them.
_TORCH_KERNELS = "sam3_exportable.predict._torch_kernels"


def _torch_kernels() -> Any:
    return importlib.import_module(_TORCH_KERNELS)


def run_graph(artifact: Any, images: Any, token_ids: Any, **boxes: Any) -> Any:
    """``artifact(images, token_ids, **boxes)`` (``boxes``: the box inputs by name, numpy,
    or none); for torch kinds under ``torch.inference_mode`` as upstream's processor runs
    its model."""
    if artifact.array_library == "torch":
        return _torch_kernels().run_inference(artifact, images, token_ids, **boxes)
    return artifact(images, token_ids, **boxes)


def run_encode(artifact: Any, images: Any) -> tuple[Any, ...]:
    """``artifact.encode_images(images)``, for torch kinds under ``torch.inference_mode`` as
    :func:`run_graph` runs the one graph."""
    if artifact.array_library == "torch":
        return _torch_kernels().run_encode(artifact, images)
    return artifact.encode_images(images)


def run_ground(artifact: Any, features: Sequence[Any], token_ids: Any, **boxes: Any) -> Any:
    """``artifact.ground(features, token_ids, **boxes)``, as :func:`run_graph` runs the graph."""
    if artifact.array_library == "torch":
        return _torch_kernels().run_ground(artifact, features, token_ids, **boxes)
    return artifact.ground(features, token_ids, **boxes)


def concat_batch(parts: Sequence[Sequence[Any]], library: str) -> tuple[Any, ...]:
    """Features of groups of images (``parts``, each a tuple of arrays ``[b, ...]``) as one
    batch, in order; one part is returned as it is."""
    if len(parts) == 1:
        return tuple(parts[0])
    if library == "torch":
        return _torch_kernels().concat_batch(parts)
    return tuple(np.concatenate(list(column)) for column in zip(*parts, strict=True))


def preprocess(images: Sequence[Image.Image], size: int, library: str) -> Any:
    """8-bit RGB images to ``images [B, 3, size, size]`` float32 of ``library``
    (``"torch"``: torchvision's transform, upstream's; ``"numpy"``: Pillow's resize)."""
    if library == "torch":
        return _torch_kernels().preprocess(images, size)
    scale = np.float32(1.0 / 255)  # torchvision's ToDtype(float32, scale=True): a float32 product
    mean = np.asarray(NORMALIZE_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(NORMALIZE_STD, dtype=np.float32)[:, None, None]
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, img in enumerate(images):
        pixels = resize_uint8(rgb_array(img), size).transpose(2, 0, 1).astype(np.float32) * scale
        out[i] = (pixels - mean) / std
    return out


def _aa_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Source indices ``[out, K]``, int32 weights ``[out, K]`` and their fixed-point precision
    of the antialiased bilinear filter from ``in_size`` to ``out_size`` samples."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    centers = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    lo = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    hi = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    taps = int((hi - lo).max())
    offsets = np.arange(taps)
    index = lo[:, None] + offsets[None, :]
    valid = index < hi[:, None]
    x = np.abs((index - centers[:, None] + 0.5) * inv)
    weights = np.where(valid, np.maximum(1.0 - x, 0.0), 0.0)
    totals = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, totals, out=np.zeros_like(weights), where=totals != 0)
    # the largest precision whose rounded largest weight still fits 15 bits
    precision = 0
    for bits in range(22):
        if int(0.5 + weights.max() * (1 << (bits + 1))) >= 1 << 15:
            break
        precision = bits + 1
    scaled = weights * (1 << precision)
    fixed = np.where(scaled >= 0, np.floor(scaled + 0.5), np.ceil(scaled - 0.5)).astype(np.int32)
    return np.minimum(index, in_size - 1), fixed, precision


def _resize_axis(pixels: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One separable pass of :func:`resize_uint8` along ``axis`` (0 rows, 1 columns)."""
    index, weights, precision = _aa_weights(pixels.shape[axis], out_size)
    moved = np.moveaxis(pixels, axis, 0)  # [in, other, C]
    out = np.empty((out_size, *moved.shape[1:]), dtype=np.uint8)
    bias = np.int32(1 << (precision - 1)) if precision else np.int32(0)
    step = max(1, (1 << 22) // max(1, weights.shape[1] * int(np.prod(moved.shape[1:]))))
    for start in range(0, out_size, step):  # bounded memory for any image size
        rows = slice(start, start + step)
        gathered = moved[index[rows]].astype(np.int32)  # [rows, K, other, C]
        acc = np.einsum("rk...,rk->r...", gathered, weights[rows], dtype=np.int32) + bias
        out[rows] = np.clip(acc >> precision, 0, 255)
    return np.moveaxis(out, 0, axis)


def resize_uint8(pixels: np.ndarray, size: int) -> np.ndarray:
    """8-bit ``[H, W, C]`` pixels resized to ``[size, size, C]`` (bilinear, antialiased):
    torch's fixed-point uint8 algorithm (Pillow-SIMD's: per output sample normalised filter
    weights in 15-bit fixed point, columns first, each pass rounded to 8 bits), so the result
    equals ``torchvision.transforms.v2.Resize`` on an 8-bit tensor."""
    out = pixels
    if out.shape[1] != size:
        out = _resize_axis(out, size, 1)
    if out.shape[0] != size:
        out = _resize_axis(out, size, 0)
    return np.ascontiguousarray(out)


def select_kept(
    logits: Any, boxes: Any, masks: Any, presence: Any, *, threshold: float, height: int, width: int
) -> tuple[Any, Any, Any]:
    """Scores ``[K]``, pixel xyxy boxes ``[K, 4]`` and mask logits ``[K, h, w]`` of the queries
    of one pair (inputs with a leading pair dim of 1) whose score exceeds ``threshold``;
    arrays of the inputs' library, copies of the outputs' rows."""
    probs = pair_scores(logits, presence)
    keep = probs > threshold
    probs, boxes, low = probs[keep], boxes[keep], masks[keep]
    if is_torch_tensor(boxes):
        return probs, _torch_kernels().cxcywh_to_pixel_xyxy(boxes, height, width), low
    cx, cy, w, h = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    half = np.float32(0.5)
    xyxy = np.stack([cx - half * w, cy - half * h, cx + half * w, cy + half * h], axis=-1)
    scale = np.asarray([width, height, width, height], dtype=np.float32)
    return probs, xyxy * scale[None, :], low


def _interpolation(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices ``i0``, ``i1`` and weights of ``i1`` per output index (bilinear,
    ``align_corners=False``, as torch computes them in float32)."""
    scale = np.float32(size_in / size_out)
    src = (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, size_in - 1)
    return i0, i1, (src - i0.astype(np.float32)).astype(np.float32)


def upsample_probabilities(low: Any, height: int, width: int) -> Any:
    """Mask logits ``[K, h, w]`` to probabilities ``[K, 1, height, width]`` (bilinear
    upsampling, then sigmoid), in the array's library."""
    if is_torch_tensor(low):
        return _torch_kernels().upsample_probabilities(low, height, width)
    low = np.asarray(low, dtype=np.float32)
    r0, r1, ry = _interpolation(low.shape[1], height)
    c0, c1, cx = _interpolation(low.shape[2], width)
    one = np.float32(1.0)
    cols = low[:, :, c0] * (one - cx) + low[:, :, c1] * cx  # [K, h, width]
    rows = cols[:, r0, :] * (one - ry)[:, None] + cols[:, r1, :] * ry[:, None]  # [K, height, width]
    del cols
    return sigmoid(rows)[:, None]
