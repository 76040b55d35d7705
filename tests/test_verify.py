"""Parity of two sets of outputs: decided at the threshold asked, numpy or torch alike."""

from __future__ import annotations

import numpy as np
import torch

from sam3_exportable.verify import compare_parity, kept_instances, kept_label, same_instances


def _outputs(logits: list[float]) -> tuple[np.ndarray, ...]:
    n = len(logits)
    return (
        np.asarray(logits, dtype=np.float32).reshape(1, n, 1),
        np.zeros((1, n, 4), dtype=np.float32),
        np.ones((1, n, 2, 2), dtype=np.float32),
        np.full((1, 1), 20.0, dtype=np.float32),  # presence ~ 1
    )


def test_the_kept_check_is_at_the_threshold_asked() -> None:
    # query 1 scores ~0.62 in the reference and ~0.38 in the candidate: they differ at 0.5,
    # and agree at 0.3 (both keep queries 0 and 1) and at 0.9 (both keep query 0)
    reference = _outputs([5.0, 0.5, -5.0])
    candidate = _outputs([5.0, -0.5, -5.0])
    assert not compare_parity(reference, candidate)[kept_label(0.5)]["identical"]
    for threshold in (0.3, 0.9):
        parity = compare_parity(reference, candidate, top_k=1, threshold=threshold)
        assert parity[kept_label(threshold)]["identical"], threshold
        assert kept_label(0.5) not in parity
    assert not same_instances(compare_parity(reference, candidate, top_k=1, threshold=0.5))


def test_numpy_and_torch_outputs_compare_alike() -> None:
    reference = _outputs([5.0, 0.5, -5.0])
    as_torch = tuple(torch.from_numpy(o) for o in reference)
    assert kept_instances(reference, 0.5) == kept_instances(as_torch, 0.5) == [[0, 1]]
    parity = compare_parity(as_torch, reference, top_k=2)
    assert all(parity["bitwise"].values()) and same_instances(parity)
