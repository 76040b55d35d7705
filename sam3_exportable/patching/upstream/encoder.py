"""Patches for ``sam3/model/encoder.py`` (``TransformerEncoderFusion``)."""

from __future__ import annotations

import inspect
from typing import Any

from ...errors import InputSpecError
from ..engine import Patch
from ..when import always


def _feat_sizes_dim_check(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Give upstream ``feat_sizes`` when the caller passed none, after a real rank check.

    Upstream's ``feat_sizes is None`` branch asserts ``x.dim == 4`` (a bound method, never
    equal to 4), so it always fails. Here batch-first ``(bs, c, h, w)`` inputs are checked
    with ``x.dim()``, flattened to upstream's seq-first layout (views, no copy) and handed
    to upstream with ``feat_sizes``, which reshapes them straight back: same tensors, same
    math. Calls that pass ``feat_sizes`` (the grounding path) go through untouched.
    """
    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    arguments = bound.arguments
    if arguments.get("feat_sizes") is not None:
        return wrapped(*args, **kwargs)
    src = arguments["src"]
    bad = [i for i, x in enumerate(src) if x.dim() != 4]
    if bad:
        raise InputSpecError(
            f"TransformerEncoderFusion src: expected a list of (bs, c, h, w) tensors, got "
            f"ranks {[x.dim() for x in src]}"
        )
    pos = arguments.get("src_pos")
    masks = arguments.get("src_key_padding_mask")
    arguments["feat_sizes"] = [tuple(x.shape[-2:]) for x in src]
    arguments["src"] = [x.flatten(2).permute(2, 0, 1) for x in src]
    if pos is not None:
        arguments["src_pos"] = [p.flatten(2).permute(2, 0, 1) for p in pos]
    if masks is not None:
        arguments["src_key_padding_mask"] = [
            m.flatten(1).transpose(0, 1) if m is not None else None for m in masks
        ]
    return wrapped(**arguments)


FEAT_SIZES_DIM_CHECK = Patch(
    name="encoder.feat_sizes_dim_check",
    target="sam3.model.encoder.TransformerEncoderFusion.forward",
    why=(
        "'assert all(x.dim == 4 for x in src)' compares a bound method with 4 and always "
        "raises AssertionError when feat_sizes is not given; past it, a None "
        "src_key_padding_mask fails in zip() ('NoneType' object is not iterable). Real "
        "upstream bugs; the grounding path always passes feat_sizes and never reaches them"
    ),
    when="any caller of TransformerEncoderFusion without feat_sizes (any torch, eager too)",
    fingerprint="338e442564fab3c5",
    wrapper=_feat_sizes_dim_check,
    needed=always,
    fixed_upstream=lambda src: "x.dim == 4" not in src,
)
