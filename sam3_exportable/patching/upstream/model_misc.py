"""Opt-in patch for ``sam3/model/model_misc.py`` (``MultiheadAttentionWrapper``)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from ..engine import Patch
from ..when import never_by_default

_sdpa = F.scaled_dot_product_attention  # module-level so tests can observe the calls


def _sdpa_box_rpb_cross_attention(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Cross-attention with a 3-D float box-RPB mask as SDPA over a 4-D (B, heads, Q, HW) bias.

    Other calls (no mask, boolean masks, key padding, batch-first, training dropout) go
    to upstream unchanged.
    """
    # upstream's forward is (*args, **kwargs); bind against nn.MultiheadAttention's
    a = inspect.signature(torch.nn.MultiheadAttention.forward).bind(instance, *args, **kwargs).arguments
    mask = a.get("attn_mask")
    if (
        mask is None
        or mask.dim() != 3
        or not mask.is_floating_point()
        or a.get("key_padding_mask") is not None
        or instance.batch_first
        or not instance._qkv_same_embed_dim
        or instance.bias_k is not None
        or (instance.training and instance.dropout > 0)
    ):
        return wrapped(*args, **kwargs)
    query, key, value = a["query"], a["key"], a["value"]
    tgt_len, bsz, embed = query.shape
    src_len = key.shape[0]
    heads = instance.num_heads
    head_dim = embed // heads
    q, k, v = F._in_projection_packed(query, key, value, instance.in_proj_weight, instance.in_proj_bias)
    q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1).view(bsz, heads, tgt_len, head_dim)
    k = k.reshape(src_len, bsz * heads, head_dim).transpose(0, 1).view(bsz, heads, src_len, head_dim)
    v = v.reshape(src_len, bsz * heads, head_dim).transpose(0, 1).view(bsz, heads, src_len, head_dim)
    bias = mask.view(bsz, heads, tgt_len, src_len)
    out = _sdpa(q, k, v, attn_mask=bias)
    out = out.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, embed)
    out = F.linear(out, instance.out_proj.weight, instance.out_proj.bias)
    return out.view(tgt_len, bsz, embed), None


SDPA_BOX_RPB_CROSS_ATTENTION = Patch(
    name="model_misc.sdpa_box_rpb_cross_attention",
    target="sam3.model.model_misc.MultiheadAttentionWrapper.forward",
    why=(
        "a fork needed a 4-D (B, heads, Q, HW) box relative-position bias with a direct "
        "scaled-dot-product cross-attention on torch 2.10 with CUDA bf16; kept opt-in"
    ),
    when=(
        "opt-in: not needed on torch 2.14.1 CPU non-strict export (nn.MultiheadAttention "
        "with the 3-D float mask exports and matches eager bitwise); reported needed on "
        "torch 2.10 + CUDA bf16, not reproducible here (no GPU)"
    ),
    fingerprint="84ebef8eb9676b44",
    wrapper=_sdpa_box_rpb_cross_attention,
    needed=never_by_default,
    fixed_upstream=lambda src: "scaled_dot_product_attention" in src,
)
