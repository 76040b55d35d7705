"""Patches for ``sam3/model/decoder.py`` (``TransformerDecoder``)."""

from __future__ import annotations

from typing import Any

import torch

from ..engine import Patch
from ..when import always, without_cuda


def _init_has_no_hardcoded_cuda() -> bool:
    import inspect

    from sam3.model.decoder import TransformerDecoder

    src = inspect.getsource(TransformerDecoder.__init__)
    return 'device="cuda"' not in src or "cuda.is_available()" in src


def _coords_on_available_device(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Map the hard-coded ``device="cuda"`` to CPU when CUDA is absent; same values."""
    device = kwargs.get("device", args[2] if len(args) > 2 else None)
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        if "device" in kwargs:
            kwargs = {**kwargs, "device": "cpu"}
        else:
            args = (*args[:2], "cpu", *args[3:])
    return wrapped(*args, **kwargs)


COORDS_ON_AVAILABLE_DEVICE = Patch(
    name="decoder.coords_on_available_device",
    target="sam3.model.decoder.TransformerDecoder._get_coords",
    why=(
        "TransformerDecoder.__init__ precomputes its box-RPB coordinate cache with "
        "_get_coords(..., device='cuda'): without CUDA the build fails with "
        "'RuntimeError: Found no NVIDIA driver on your system'"
    ),
    when="model build on a machine without CUDA (any torch, any export mode)",
    fingerprint="f49da3babd2e5fd2",
    wrapper=_coords_on_available_device,
    needed=without_cuda,
    fixed_upstream=lambda src: _init_has_no_hardcoded_cuda(),
)


def _static_size(value: Any, expected: int | None, what: str) -> Any:
    """Turn a 0-d size tensor into an int; under tracing pin it to the cached size."""
    if not isinstance(value, torch.Tensor):
        return value
    size = value.item()
    if isinstance(size, torch.SymInt) and expected is not None:
        torch._check(
            size == expected,
            lambda: f"decoder box-RPB: feature {what} must equal the cached {expected}",
        )
        return expected
    return size


def _rpb_args(reference_boxes: torch.Tensor, feat_size: Any) -> tuple[torch.Tensor, Any]:
    return reference_boxes, feat_size


def _static_rpb_feat_size(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Call upstream ``_get_rpb_matrix`` with python-int (H, W) instead of 0-d tensors.

    The decoder passes ``(spatial_shapes[0, 0], spatial_shapes[0, 1])``; comparing those
    with the cached size is data-dependent. In eager mode the ints are the tensors' values
    (same branch, same math); under tracing they are checked equal to the cached size with
    ``torch._check`` (a runtime assert on data, not on batch or prompts).
    """
    reference_boxes, feat_size = _rpb_args(*args, **kwargs)
    stored = instance.compilable_stored_size or (None, None)
    h, w = feat_size
    feat_size = (_static_size(h, stored[0], "height"), _static_size(w, stored[1], "width"))
    return wrapped(reference_boxes, feat_size)


STATIC_RPB_FEAT_SIZE = Patch(
    name="decoder.static_rpb_feat_size",
    target="sam3.model.decoder.TransformerDecoder._get_rpb_matrix",
    why=(
        "'self.compilable_stored_size == (H, W)' with H, W 0-d tensors taken from "
        "spatial_shapes is data-dependent: torch.export fails with "
        "'GuardOnDataDependentSymNode: Could not guard on data-dependent expression "
        "Eq(u0, 1)'"
    ),
    when="every torch.export (non-strict; strict export takes the dynamo branch, harmless there)",
    fingerprint="7d261355015d5d9d",
    wrapper=_static_rpb_feat_size,
    needed=always,
    fixed_upstream=lambda src: ".item()" in src or "_static_size" in src,
)
