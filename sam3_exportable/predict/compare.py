"""Two artifacts on the same images and phrases: how far apart their outputs are and whether
they keep the same instances (``sam3-exportable verify``; e.g. an int8 graph against its
fp32 source, on the user's own images with real weights)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..verify import combine_parity, compare_parity, kept_instances, to_numpy
from .images import DEFAULT_MAX_PIXELS, ImageInput
from .predictor import Predictor

__all__ = ["compare_artifacts"]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def compare_artifacts(
    reference: str | os.PathLike[str] | Any,
    candidate: str | os.PathLike[str] | Any,
    images: Sequence[ImageInput],
    phrases: Sequence[str],
    *,
    threshold: float = 0.5,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run both artifacts on every image (one at a time, all phrases in one call) and compare.

    Returns ``{"parity": combined :func:`..verify.compare_parity` over the images, "kept":
    {"reference", "candidate", "both", "mean_iou", "min_iou"}, "images", "reference_kind",
    "candidate_kind"}``: instance counts at ``threshold`` and the mask IoU (at the graph's
    mask resolution) of the instances both keep. ``threads``: intra-op threads of artifacts
    loaded from paths. Raises what :class:`.predictor.Predictor`
    raises for bad artifacts, images or phrases.
    """
    ref = Predictor(reference, max_pixels=max_pixels, threads=threads)
    cand = Predictor(candidate, max_pixels=max_pixels, threads=threads)
    parts, ious = [], []
    kept = {"reference": 0, "candidate": 0, "both": 0}
    for image in images:
        rgb = ref.load([image])
        a, b = ref.run(rgb, phrases), cand.run(rgb, phrases)
        parts.append(compare_parity(a, b, threshold=threshold))
        keep_a, keep_b = kept_instances(a, threshold), kept_instances(b, threshold)
        masks_a, masks_b = to_numpy(a[2]), to_numpy(b[2])
        for pair, (ka, kb) in enumerate(zip(keep_a, keep_b, strict=True)):
            both = sorted(set(ka) & set(kb))
            kept["reference"] += len(ka)
            kept["candidate"] += len(kb)
            kept["both"] += len(both)
            ious.extend(_iou(masks_a[pair, q] > 0, masks_b[pair, q] > 0) for q in both)
    return {
        "parity": combine_parity(parts),
        "kept": {
            **kept,
            "mean_iou": sum(ious) / len(ious) if ious else 1.0,
            "min_iou": min(ious, default=1.0),
        },
        "images": len(parts),
        "reference_kind": ref.artifact.kind,
        "candidate_kind": cand.artifact.kind,
    }
