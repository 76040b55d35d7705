"""Parity between two sets of pipeline outputs: the one comparison ``export --verify``,
``verify``, the bench and the tests use.

Outputs are ``(pred_logits, pred_boxes, pred_masks, presence_logit_dec)`` for the same
image-prompt pairs (:mod:`.contract`). :func:`compare_parity` gives, JSON-ready, the max
absolute difference and bitwise equality per output, and whether post-processing keeps the
same instances (upstream's score rule, :func:`.contract.pair_scores`) with the same binary
masks: at threshold 0.5, and at the threshold midway between the reference's ``top_k``-th
and next score per pair, so the reference keeps exactly ``top_k`` there even with random
weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .contract import OUTPUT_NAMES, is_torch_tensor, pair_scores

__all__ = [
    "combine_parity",
    "compare_parity",
    "exceeded_bounds",
    "format_parity",
    "kept_instances",
    "kept_label",
    "same_instances",
    "to_numpy",
]


def to_numpy(array: Any) -> np.ndarray:
    """A torch tensor (any dtype, as float32 when it is a floating bf16/fp16 one) or an
    array as a numpy array, sharing memory where it can."""
    if is_torch_tensor(array):
        array = array.detach().cpu()
        if array.is_floating_point() and array.dtype.itemsize < 4:
            array = array.float()
        return array.numpy()
    return np.asarray(array)


def _scores(outputs: Sequence[Any]) -> np.ndarray:
    logits, presence = outputs[0], outputs[3]
    if is_torch_tensor(logits):
        logits, presence = logits.float(), presence.float()
    else:
        logits, presence = to_numpy(logits).astype(np.float32), to_numpy(presence).astype(np.float32)
    return to_numpy(pair_scores(logits, presence))


def kept_instances(outputs: Sequence[Any], threshold: float | Sequence[float]) -> list[list[int]]:
    """Per pair, the query indices whose score exceeds the threshold (upstream's keep rule);
    ``threshold`` is one value for all pairs or one per pair. Outputs are torch tensors or
    numpy arrays."""
    scores = _scores(outputs)
    per_pair = [float(threshold)] * len(scores) if isinstance(threshold, (int, float)) else list(threshold)
    return [np.flatnonzero(row > t).tolist() for row, t in zip(scores, per_pair, strict=True)]


def kept_label(threshold: float) -> str:
    """The key of the kept-instance check at ``threshold`` in a :func:`compare_parity` result."""
    return f"kept_at_{threshold:g}"


def compare_parity(
    reference: Sequence[Any], other: Sequence[Any], top_k: int = 10, threshold: float = 0.5
) -> dict[str, Any]:
    """``{"max_abs_diff": {output: float}, "bitwise": {output: bool}, "kept_at_0.5": {...},
    "kept_at_top<k>": {...}}``; each ``kept_at_*`` holds ``identical`` (the same query
    indices in every pair), ``kept`` (how many the reference keeps) and
    ``mask_pixels_differing`` (over the instances both keep). Outputs of different shapes
    compare as ``inf`` and not bitwise. Outputs are torch tensors or numpy arrays."""
    out: dict[str, Any] = {"max_abs_diff": {}, "bitwise": {}}
    for name, a, b in zip(OUTPUT_NAMES, reference, other, strict=True):
        a, b = to_numpy(a).astype(np.float32, copy=False), to_numpy(b).astype(np.float32, copy=False)
        if a.shape != b.shape:
            out["max_abs_diff"][name], out["bitwise"][name] = float("inf"), False
            continue
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        out["max_abs_diff"][name] = float(diff.max()) if a.size else 0.0
        out["bitwise"][name] = bool(np.array_equal(a, b))
    top = -np.sort(-_scores(reference), axis=1)
    ref_masks, other_masks = to_numpy(reference[2]), to_numpy(other[2])
    k = min(top_k, top.shape[1] - 1)
    checks: dict[str, float | list[float]] = {
        f"{threshold:g}": threshold,
        f"top{k}": ((top[:, k - 1] + top[:, k]) / 2).tolist(),
    }
    for label, thresholds in checks.items():
        ref_kept, got_kept = kept_instances(reference, thresholds), kept_instances(other, thresholds)
        same, pixels, kept = True, 0, 0
        for i, (ref_keep, got_keep) in enumerate(zip(ref_kept, got_kept, strict=True)):
            if ref_keep != got_keep:
                same = False
                continue
            kept += len(ref_keep)
            pixels += int(((ref_masks[i, ref_keep] > 0) != (other_masks[i, ref_keep] > 0)).sum())
        out[f"kept_at_{label}"] = {"identical": same, "kept": kept, "mask_pixels_differing": pixels}
    return out


def combine_parity(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One :func:`compare_parity` result for several calls (images compared one at a time):
    the largest difference, bitwise only if every part is, instances identical only if in
    every part, counts summed. ``kept_at_top<k>`` checks are combined by position."""
    if not parts:
        raise ValueError("combine_parity: expected at least one result, got none")
    out: dict[str, Any] = {
        "max_abs_diff": {n: max(p["max_abs_diff"][n] for p in parts) for n in OUTPUT_NAMES},
        "bitwise": {n: all(p["bitwise"][n] for p in parts) for n in OUTPUT_NAMES},
    }
    for key in (k for k in parts[0] if k.startswith("kept_at_")):
        checks = [p[key] for p in parts]
        out[key] = {
            "identical": all(c["identical"] for c in checks),
            "kept": sum(c["kept"] for c in checks),
            "mask_pixels_differing": sum(c["mask_pixels_differing"] for c in checks),
        }
    return out


def same_instances(parity: Mapping[str, Any]) -> bool:
    """True when every ``kept_at_*`` check of a :func:`compare_parity` result is identical."""
    return all(v["identical"] for k, v in parity.items() if k.startswith("kept_at_"))


def exceeded_bounds(parity: Mapping[str, Any], bounds: Mapping[str, float]) -> dict[str, float]:
    """The outputs whose max |diff| exceeds its bound (``{name: diff}``; empty if none)."""
    diffs = parity["max_abs_diff"]
    return {name: diffs[name] for name, bound in bounds.items() if not diffs[name] <= bound}


def format_parity(parity: Mapping[str, Any], label: str = "") -> list[str]:
    """Report lines: max |diff| and bitwise flag per output, then the kept-instance checks."""
    prefix = f"{label} " if label else ""
    lines = [
        f"{prefix}{name:20s} max|diff| {parity['max_abs_diff'][name]:.3g}  bitwise equal: "
        f"{parity['bitwise'][name]}"
        for name in OUTPUT_NAMES
    ]
    for key, check in parity.items():
        if key.startswith("kept_at_"):
            lines.append(
                f"{prefix}kept instances {key[len('kept_at_') :]:>6s}: "
                f"{'same' if check['identical'] else 'DIFFER'} ({check['kept']} kept, "
                f"{check['mask_pixels_differing']} mask pixels differ)"
            )
    return lines
