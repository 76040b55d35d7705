"""Patches for ``sam3/model/model_misc.py`` (``MultiheadAttentionWrapper``): contiguous
in-projection inputs under autocast (default), SDPA box-RPB cross-attention (opt-in)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from ..engine import Patch
from ..when import always, never_by_default

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


def _contiguous_in_projection_under_autocast(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Under autocast, hand ``nn.MultiheadAttention`` a query/key/value whose seq-first
    ``(L, N, E)`` form (what its in-projection ``F.linear`` receives) is contiguous in memory.

    Outside autocast the call goes to upstream with the very same arguments (fp32 eager and
    fp32 graphs are untouched). ``is`` relations between query, key and value are kept (they
    choose the packed in-projection and the fast path); only strides change: ``.contiguous()``
    copies values exactly, and the layer's outputs are contiguous in every path.
    """
    query = args[0] if args else kwargs.get("query")
    if not isinstance(query, torch.Tensor) or not torch.is_autocast_enabled(query.device.type):
        return wrapped(*args, **kwargs)
    converted: dict[int, torch.Tensor] = {}

    def seq_first_contiguous(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            return x
        if id(x) not in converted:
            # a batch_first layer transposes (N, L, E) to (L, N, E) itself before projecting
            converted[id(x)] = (
                x.transpose(0, 1).contiguous().transpose(0, 1) if instance.batch_first else x.contiguous()
            )
        return converted[id(x)]

    args, kwargs = list(args), dict(kwargs)
    for i, name in enumerate(("query", "key", "value")):
        if i < len(args):
            args[i] = seq_first_contiguous(args[i])
        elif name in kwargs:
            kwargs[name] = seq_first_contiguous(kwargs[name])
    return wrapped(*args, **kwargs)


CONTIGUOUS_IN_PROJECTION_UNDER_AUTOCAST = Patch(
    name="model_misc.contiguous_in_projection_under_autocast",
    target="sam3.model.model_misc.MultiheadAttentionWrapper.forward",
    why=(
        "upstream keeps image tokens as seq-first (L, N, E) views of batch-first memory "
        "(encoder.py ~449, and nn.MultiheadAttention(batch_first=True)'s own transpose), "
        "contiguous only at N=1. Under autocast in inference mode the bf16 copy of the weight "
        "does not require grad, so aten::matmul does not fold the >2-D input: it runs bmm over "
        "L=5184 with the weight expanded and materialised per token (5184x256x256 bf16, 680 MB "
        "per in-projection, 42 in the full model), and B=2 cost 2.4-2.5x B=1. A contiguous "
        "input takes F.linear's 2-D addmm path at every N"
    ),
    when=(
        "speed under autocast (bf16/fp16) at B*P >= 2; acts only while autocast is enabled for "
        "the query's device, fp32 calls pass through unchanged"
    ),
    fingerprint="84ebef8eb9676b44",
    wrapper=_contiguous_in_projection_under_autocast,
    needed=always,
    stack_order=1,  # outside the opt-in SDPA patch, so its masked calls get contiguous inputs too
    fixed_upstream=lambda src: "is_autocast_enabled" in src,
)
