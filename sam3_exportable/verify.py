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

import torch

from .contract import OUTPUT_NAMES, pair_scores

__all__ = [
    "combine_parity",
    "compare_parity",
    "exceeded_bounds",
    "format_parity",
    "kept_instances",
    "same_instances",
]


def kept_instances(outputs: Sequence[torch.Tensor], threshold: float | Sequence[float]) -> list[list[int]]:
    """Per pair, the query indices whose score exceeds the threshold (upstream's keep rule);
    ``threshold`` is one value for all pairs or one per pair."""
    scores = pair_scores(outputs[0].float(), outputs[3].float())
    per_pair = [float(threshold)] * len(scores) if isinstance(threshold, (int, float)) else list(threshold)
    return [torch.nonzero(row > t).flatten().tolist() for row, t in zip(scores, per_pair, strict=True)]


def compare_parity(
    reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor], top_k: int = 10
) -> dict[str, Any]:
    """``{"max_abs_diff": {output: float}, "bitwise": {output: bool}, "kept_at_0.5": {...},
    "kept_at_top<k>": {...}}``; each ``kept_at_*`` holds ``identical`` (the same query
    indices in every pair), ``kept`` (how many the reference keeps) and
    ``mask_pixels_differing`` (over the instances both keep). Outputs of different shapes
    compare as ``inf`` and not bitwise."""
    out: dict[str, Any] = {"max_abs_diff": {}, "bitwise": {}}
    for name, a, b in zip(OUTPUT_NAMES, reference, other, strict=True):
        a, b = a.detach().float(), b.detach().float()
        if a.shape != b.shape:
            out["max_abs_diff"][name], out["bitwise"][name] = float("inf"), False
            continue
        out["max_abs_diff"][name] = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        out["bitwise"][name] = bool(torch.equal(a, b))
    top = pair_scores(reference[0].float(), reference[3].float()).sort(dim=1, descending=True).values
    k = min(top_k, top.shape[1] - 1)
    checks: dict[str, float | list[float]] = {
        "0.5": 0.5,
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
            pixels += int(((reference[2][i, ref_keep] > 0) != (other[2][i, ref_keep] > 0)).sum())
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
