"""The pipeline's I/O contract, shared by every artifact kind and by the eager wrapper.

Inputs: ``images`` float32 ``[B, 3, S, S]`` (resized to ``S`` and normalised with mean and
std :data:`NORMALIZE_MEAN` / :data:`NORMALIZE_STD`, as upstream's ``Sam3Processor`` does),
``token_ids`` int64 ``[P, L]`` (upstream tokenizer, 0 is padding); ``B >= 1``, ``P >= 1``.

Outputs, for the ``B * P`` image-prompt pairs in image-major order (pair ``b * P + p``),
all float32: ``pred_logits [B*P, Q, 1]``, ``pred_boxes [B*P, Q, 4]`` (cxcywh, normalised),
``pred_masks [B*P, Q, H, W]`` (logits), ``presence_logit_dec [B*P, 1]``.

The score of query ``q`` of a pair is :func:`pair_scores`: the one rule post-processing,
parity checks and benchmarks use.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import InputSpecError

__all__ = [
    "DYNAMIC_DIMS",
    "INPUT_NAMES",
    "NORMALIZE_MEAN",
    "NORMALIZE_STD",
    "OUTPUT_NAMES",
    "check_inputs",
    "pair_scores",
    "synthetic_inputs",
]

#: Names of the two inputs, in order.
INPUT_NAMES = ("images", "token_ids")

#: Names of the four outputs, in order.
OUTPUT_NAMES = ("pred_logits", "pred_boxes", "pred_masks", "presence_logit_dec")

#: (input index, dim, name) of every dim that stays dynamic with range [1, inf).
DYNAMIC_DIMS: tuple[tuple[int, int, str], ...] = ((0, 0, "batch"), (1, 0, "num_prompts"))

#: Per-channel normalisation of ``images`` (upstream ``Sam3Processor``).
NORMALIZE_MEAN = (0.5, 0.5, 0.5)
NORMALIZE_STD = (0.5, 0.5, 0.5)


def pair_scores(logits: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """Upstream's instance scores ``sigmoid(logits) * sigmoid(presence)``.

    ``logits`` ``[N, Q, 1]`` and ``presence`` ``[N, 1]`` (any float dtype) give ``[N, Q]``
    in the dtype of ``logits``, computed exactly as upstream's ``Sam3Processor`` does.
    """
    probs = logits.sigmoid()
    presence_score = presence.sigmoid().unsqueeze(1)
    return (probs * presence_score).squeeze(-1)


def _describe(value: Any) -> str:
    return type(value).__name__


def check_inputs(
    images: Any, token_ids: Any, *, image_size: int, context_length: int, vocab_size: int | None
) -> None:
    """Raise :class:`InputSpecError` naming the input, what was expected and what came.

    Checks type (torch.Tensor), rank, sizes, dtype, a non-empty batch and prompt list,
    finite pixels, and token ids in ``[0, vocab_size)`` (skipped when ``vocab_size`` is
    None, e.g. for artifacts whose manifest does not record it).
    """
    s, length = image_size, context_length
    if not isinstance(images, torch.Tensor):
        raise InputSpecError(f"images: expected a torch.Tensor, got {_describe(images)}")
    if not isinstance(token_ids, torch.Tensor):
        raise InputSpecError(f"token_ids: expected a torch.Tensor, got {_describe(token_ids)}")
    if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
        raise InputSpecError(f"images: expected shape [B, 3, {s}, {s}], got {list(images.shape)}")
    if images.shape[0] < 1:
        raise InputSpecError("images: expected a batch of at least one image, got B=0")
    if images.dtype != torch.float32:
        raise InputSpecError(f"images: expected dtype torch.float32, got {images.dtype}")
    if token_ids.dim() != 2 or token_ids.shape[1] != length:
        raise InputSpecError(f"token_ids: expected shape [P, {length}], got {list(token_ids.shape)}")
    if token_ids.shape[0] < 1:
        raise InputSpecError("token_ids: expected at least one prompt, got P=0")
    if token_ids.dtype != torch.int64:
        raise InputSpecError(f"token_ids: expected dtype torch.int64, got {token_ids.dtype}")
    if not bool(torch.isfinite(images).all()):
        bad = int((~torch.isfinite(images)).sum())
        raise InputSpecError(f"images: expected finite values, got {bad} NaN or infinite values")
    if vocab_size is not None:
        low, high = int(token_ids.min()), int(token_ids.max())
        if low < 0 or high >= vocab_size:
            raise InputSpecError(f"token_ids: expected values in [0, {vocab_size}), got [{low}, {high}]")


def synthetic_inputs(
    image_size: int, context_length: int, batch: int = 2, prompts: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic inputs for tests and benchmarks: images ``[batch, 3, S, S]`` float32 in
    [-1, 1] and token ids ``[prompts, L]`` int64 (start token, a few word ids, end token, zero
    padding). The same arguments give the same tensors in any process."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, image_size, image_size, generator=generator) * 2 - 1
    tokens = torch.zeros(prompts, context_length, dtype=torch.int64)
    for p in range(prompts):
        words = torch.randint(256, 49406, (2 + p % 3,), generator=generator)
        row = [49406, *words.tolist(), 49407]
        tokens[p, : len(row)] = torch.tensor(row)
    return images, tokens
