"""The pipeline's I/O contract, shared by every artifact kind and by the eager wrapper.

Inputs: ``images`` float32 ``[B, 3, S, S]`` (resized to ``S`` and normalised with mean and
std :data:`NORMALIZE_MEAN` / :data:`NORMALIZE_STD`, as upstream's ``Sam3Processor`` does),
``token_ids`` int64 ``[P, L]`` (upstream tokenizer, 0 is padding); ``B >= 1``, ``P >= 1``.

A box-capable program (exported with ``boxes=True`` / ``--boxes``) takes three more inputs,
the exemplar boxes of each image-prompt pair (:data:`BOX_INPUT_NAMES`), ``K >= 1``:
``boxes`` float32 ``[B, P, K, 4]`` (normalised cx, cy, w, h, as upstream's ``Prompt``),
``box_labels`` int64 ``[B, P, K]`` (1 positive, 0 negative) and ``box_valid`` bool
``[B, P, K]`` (False = padding: the box is ignored, whatever its values; valid boxes may sit
anywhere along K, the graph moves them to the front in order). A pair with no valid box is
grounded on its phrase alone; :func:`padding_boxes` builds the inputs of "no box anywhere".

Nothing here imports torch: the runtime install checks inputs and scores with numpy.

Outputs, for the ``B * P`` image-prompt pairs in image-major order (pair ``b * P + p``),
all float32: ``pred_logits [B*P, Q, 1]``, ``pred_boxes [B*P, Q, 4]`` (cxcywh, normalised),
``pred_masks [B*P, Q, H, W]`` (logits), ``presence_logit_dec [B*P, 1]``.

The score of query ``q`` of a pair is :func:`pair_scores`: the one rule post-processing,
parity checks and benchmarks use.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InputSpecError

__all__ = [
    "BOX_DYNAMIC_DIMS",
    "BOX_INPUT_NAMES",
    "DYNAMIC_DIMS",
    "INPUT_NAMES",
    "NORMALIZE_MEAN",
    "NORMALIZE_STD",
    "OUTPUT_NAMES",
    "check_box_inputs",
    "check_features",
    "check_image_input",
    "check_inputs",
    "check_token_input",
    "dynamic_dims",
    "input_names",
    "is_torch_tensor",
    "padding_boxes",
    "pair_scores",
    "sigmoid",
]

#: Names of the two inputs, in order.
INPUT_NAMES = ("images", "token_ids")

#: Names of the four outputs, in order.
OUTPUT_NAMES = ("pred_logits", "pred_boxes", "pred_masks", "presence_logit_dec")

#: (input index, dim, name) of every dim that stays dynamic with range [1, inf).
DYNAMIC_DIMS: tuple[tuple[int, int, str], ...] = ((0, 0, "batch"), (1, 0, "num_prompts"))

#: Names of the box-capable program's three extra inputs, in order, after :data:`INPUT_NAMES`.
BOX_INPUT_NAMES = ("boxes", "box_labels", "box_valid")

#: The box-capable program's extra dynamic dim (``boxes`` dim 2; its dims 0 and 1 are
#: ``batch`` and ``num_prompts``, the same symbols as ``images`` and ``token_ids``).
BOX_DYNAMIC_DIMS: tuple[tuple[int, int, str], ...] = ((2, 2, "num_boxes"),)


def input_names(boxes: bool) -> tuple[str, ...]:
    """The program's input names, text-only or box-capable."""
    return INPUT_NAMES + BOX_INPUT_NAMES if boxes else INPUT_NAMES


def dynamic_dims(boxes: bool) -> tuple[tuple[int, int, str], ...]:
    """``(input index, dim, name)`` of every dim that stays dynamic, text-only or box-capable."""
    return DYNAMIC_DIMS + BOX_DYNAMIC_DIMS if boxes else DYNAMIC_DIMS


#: Per-channel normalisation of ``images`` (upstream ``Sam3Processor``).
NORMALIZE_MEAN = (0.5, 0.5, 0.5)
NORMALIZE_STD = (0.5, 0.5, 0.5)


def is_torch_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor (told without importing torch)."""
    return type(value).__module__.split(".", 1)[0] == "torch" and hasattr(value, "dim")


def sigmoid(x: Any) -> Any:
    """``1 / (1 + exp(-x))``: torch's kernel for a torch tensor (upstream's numbers), numpy's
    in the array's dtype for a numpy array (within 2 ulp of torch's)."""
    if is_torch_tensor(x):
        return x.sigmoid()
    x = np.asarray(x)
    with np.errstate(over="ignore"):
        return (x.dtype.type(1) / (x.dtype.type(1) + np.exp(-x))).astype(x.dtype, copy=False)


def pair_scores(logits: Any, presence: Any) -> Any:
    """Upstream's instance scores ``sigmoid(logits) * sigmoid(presence)``: the one score rule.

    ``logits`` ``[N, Q, 1]`` and ``presence`` ``[N, 1]`` (torch tensors or numpy arrays of
    any float dtype) give ``[N, Q]`` of the same kind and dtype as ``logits``; torch tensors
    are computed exactly as upstream's ``Sam3Processor`` does.
    """
    probs = sigmoid(logits)
    if is_torch_tensor(presence):
        presence_score = sigmoid(presence).unsqueeze(1)
    else:
        presence_score = sigmoid(presence)[:, None]
    return (probs * presence_score).squeeze(-1)


def _describe(value: Any) -> str:
    return type(value).__name__


def _dtype(value: Any) -> str:
    return str(value.dtype).replace("torch.", "")


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or is_torch_tensor(value)


def check_inputs(
    images: Any, token_ids: Any, *, image_size: int, context_length: int, vocab_size: int | None
) -> None:
    """Raise :class:`InputSpecError` naming the input, what was expected and what came.

    Accepts numpy arrays or torch tensors. Checks type, rank, sizes, dtype, a non-empty
    batch and prompt list, finite pixels (:func:`check_image_input`), and token ids in
    ``[0, vocab_size)`` (:func:`check_token_input`; the range is skipped when ``vocab_size``
    is None, e.g. for artifacts whose manifest does not record it).
    """
    for name, value in (("images", images), ("token_ids", token_ids)):
        if not _is_array(value):
            raise InputSpecError(f"{name}: expected a numpy array or torch.Tensor, got {_describe(value)}")
    check_image_input(images, image_size=image_size)
    check_token_input(token_ids, context_length=context_length, vocab_size=vocab_size)


def check_image_input(images: Any, *, image_size: int) -> None:
    """Raise :class:`InputSpecError` unless ``images`` is a float32 ``[B, 3, S, S]`` array or
    tensor (``S = image_size``, ``B >= 1``) of finite values."""
    s = image_size
    if not _is_array(images):
        raise InputSpecError(f"images: expected a numpy array or torch.Tensor, got {_describe(images)}")
    if len(images.shape) != 4 or tuple(images.shape[1:]) != (3, s, s):
        raise InputSpecError(f"images: expected shape [B, 3, {s}, {s}], got {list(images.shape)}")
    if images.shape[0] < 1:
        raise InputSpecError("images: expected a batch of at least one image, got B=0")
    if _dtype(images) != "float32":
        raise InputSpecError(f"images: expected dtype float32, got {_dtype(images)}")
    finite = images.isfinite() if is_torch_tensor(images) else np.isfinite(images)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise InputSpecError(f"images: expected finite values, got {bad} NaN or infinite values")


def check_token_input(token_ids: Any, *, context_length: int, vocab_size: int | None) -> None:
    """Raise :class:`InputSpecError` unless ``token_ids`` is an int64 ``[P, context_length]``
    array or tensor, ``P >= 1``, with ids in ``[0, vocab_size)`` (unchecked for None)."""
    length = context_length
    if not _is_array(token_ids):
        raise InputSpecError(f"token_ids: expected a numpy array or torch.Tensor, got {_describe(token_ids)}")
    if len(token_ids.shape) != 2 or token_ids.shape[1] != length:
        raise InputSpecError(f"token_ids: expected shape [P, {length}], got {list(token_ids.shape)}")
    if token_ids.shape[0] < 1:
        raise InputSpecError("token_ids: expected at least one prompt, got P=0")
    if _dtype(token_ids) != "int64":
        raise InputSpecError(f"token_ids: expected dtype int64, got {_dtype(token_ids)}")
    if vocab_size is not None:
        low, high = int(token_ids.min()), int(token_ids.max())
        if low < 0 or high >= vocab_size:
            raise InputSpecError(f"token_ids: expected values in [0, {vocab_size}), got [{low}, {high}]")


def check_features(features: Any, specs: Sequence[tuple[str, Sequence[int | str], str]]) -> int:
    """Raise :class:`InputSpecError` unless ``features`` (a sequence of numpy arrays or torch
    tensors) fits ``specs``: one ``(name, shape, dtype)`` per feature, in order, ``shape``
    with the symbolic ``"batch"`` first and ints after (a staged artifact's manifest, its
    ``stages.features``), every feature with the same batch ``B >= 1``. Returns ``B``."""
    if isinstance(features, (str, bytes)) or not isinstance(features, Sequence):
        raise InputSpecError(
            f"features: expected a sequence of {len(specs)} arrays (encode_images' output), "
            f"got {_describe(features)}"
        )
    if len(features) != len(specs):
        raise InputSpecError(
            f"features: expected {len(specs)} arrays ({', '.join(n for n, _, _ in specs)}), "
            f"got {len(features)}"
        )
    batch: int | None = None
    for value, (name, shape, dtype) in zip(features, specs, strict=True):
        if not _is_array(value):
            raise InputSpecError(
                f"features.{name}: expected a numpy array or torch.Tensor, got {_describe(value)}"
            )
        fixed = list(shape[1:])
        if len(value.shape) != len(shape) or list(value.shape[1:]) != fixed:
            raise InputSpecError(f"features.{name}: expected shape {list(shape)}, got {list(value.shape)}")
        if _dtype(value) != dtype:
            raise InputSpecError(f"features.{name}: expected dtype {dtype}, got {_dtype(value)}")
        b = int(value.shape[0])
        if batch is None:
            batch = b
        elif b != batch:
            raise InputSpecError(f"features.{name}: expected batch {batch} as the other features, got {b}")
    if not batch:
        raise InputSpecError("features: expected a batch of at least one image, got B=0")
    return batch


def padding_boxes(batch: int, prompts: int, like: Any) -> tuple[Any, Any, Any]:
    """``(boxes, box_labels, box_valid)`` of ``batch`` x ``prompts`` pairs with no box: one
    padding slot each (zeros, label 1, not valid), as numpy arrays, or torch tensors on
    ``like``'s device when ``like`` is a torch tensor."""
    boxes = np.zeros((batch, prompts, 1, 4), np.float32)
    labels = np.ones((batch, prompts, 1), np.int64)
    valid = np.zeros((batch, prompts, 1), np.bool_)
    if is_torch_tensor(like):  # torch is loaded already: the caller handed us its tensor
        torch = importlib.import_module("torch")
        return tuple(torch.from_numpy(a).to(like.device) for a in (boxes, labels, valid))  # type: ignore[return-value]
    return boxes, labels, valid


def check_box_inputs(boxes: Any, box_labels: Any, box_valid: Any, *, batch: int, prompts: int) -> None:
    """Raise :class:`InputSpecError` naming the box input, what was expected and what came.

    Accepts numpy arrays or torch tensors: ``boxes`` float32 ``[B, P, K, 4]`` with finite
    values, ``box_labels`` int64 ``[B, P, K]`` of 0 and 1, ``box_valid`` bool ``[B, P, K]``,
    ``K >= 1``, ``B`` and ``P`` those of ``images`` and ``token_ids``.
    """
    for name, value in (("boxes", boxes), ("box_labels", box_labels), ("box_valid", box_valid)):
        if not _is_array(value):
            raise InputSpecError(f"{name}: expected a numpy array or torch.Tensor, got {_describe(value)}")
    if len(boxes.shape) != 4 or tuple(boxes.shape[:2]) != (batch, prompts) or boxes.shape[3] != 4:
        raise InputSpecError(f"boxes: expected shape [{batch}, {prompts}, K, 4], got {list(boxes.shape)}")
    k = int(boxes.shape[2])
    if k < 1:
        raise InputSpecError("boxes: expected at least one box slot per pair (K >= 1), got K=0")
    for name, value, dtype in (
        ("boxes", boxes, "float32"),
        ("box_labels", box_labels, "int64"),
        ("box_valid", box_valid, "bool"),
    ):
        if name != "boxes" and tuple(value.shape) != (batch, prompts, k):
            raise InputSpecError(f"{name}: expected shape [{batch}, {prompts}, {k}], got {list(value.shape)}")
        if _dtype(value) != dtype:
            raise InputSpecError(f"{name}: expected dtype {dtype}, got {_dtype(value)}")
    finite = boxes.isfinite() if is_torch_tensor(boxes) else np.isfinite(boxes)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise InputSpecError(f"boxes: expected finite values (padding too), got {bad} NaN or infinite values")
    labels = box_labels.cpu().numpy() if is_torch_tensor(box_labels) else np.asarray(box_labels)
    if labels.size and not np.isin(labels, (0, 1)).all():
        bad = sorted({int(v) for v in np.unique(labels)} - {0, 1})
        raise InputSpecError(f"box_labels: expected 0 (negative) or 1 (positive), got {bad[:5]}")
