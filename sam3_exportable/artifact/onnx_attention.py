"""How the ONNX export translates attention: unmasked ``scaled_dot_product_attention`` as
onnxruntime's ``com.microsoft.MultiHeadAttention``.

torchlib's opset-18 lowering of SDPA is MatMul -> Softmax -> MatMul, which materialises the
whole ``[B, heads, L, L]`` score matrix of every global ViT block, several alive at once
(``docs/performance.md`` has the peak memory it cost). onnxruntime's CPU
``MultiHeadAttention`` runs MLAS flash attention (tiles sized for the cache) when it has no
mask, bias or past state, and never builds the matrix. Calls with a mask, causal, dropout or
grouped-query attention keep torchlib's lowering. Used only as a ``custom_translation_table``
entry of ``torch.onnx.export``: eager and ``.pt2`` programs are untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from onnx.defs import OpSchema
from onnxscript import opset18 as op
from onnxscript import values
from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention as _default
from onnxscript.function_libs.torch_lib.tensor_typing import TFloat

__all__ = ["sdpa_as_multi_head_attention", "translation_table"]

_param, _optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
_MULTI_HEAD_ATTENTION = values.Op(
    values.Opset("com.microsoft", 1),
    "MultiHeadAttention",
    OpSchema(
        "MultiHeadAttention",
        "com.microsoft",
        1,
        inputs=[
            _param("query", "T"),
            _param("key", "T", param_option=_optional),
            _param("value", "T", param_option=_optional),
        ],
        outputs=[_param("output", "T")],
        type_constraints=[("T", ["tensor(float)"], "")],
        attributes=[
            OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
            OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "", required=False),
        ],
    ),
)


def sdpa_as_multi_head_attention(
    query: TFloat,
    key: TFloat,
    value: TFloat,
    attn_mask: TFloat | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> TFloat:
    """SDPA on ``[B, heads, S, head_dim]``: MultiHeadAttention when unmasked, with static head
    count and size; torchlib's own lowering otherwise."""
    heads, head_dim = query.shape[1], query.shape[3]
    static = isinstance(heads, int) and isinstance(head_dim, int)
    plain = attn_mask is None and not is_causal and dropout_p == 0.0 and not enable_gqa
    if not (plain and static and key.shape[1] == heads and value.shape[3] == head_dim):
        return _default(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    hidden = heads * head_dim

    def to_bsd(x: TFloat) -> TFloat:  # [B, N, S, H] -> [B, S, N*H]
        return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, hidden]))

    kwargs = {} if scale is None else {"scale": float(scale)}
    out = _MULTI_HEAD_ATTENTION(to_bsd(query), to_bsd(key), to_bsd(value), num_heads=heads, **kwargs)
    return op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, heads, head_dim])), perm=[0, 2, 1, 3])


def translation_table() -> dict[Any, Any]:
    """``{aten.scaled_dot_product_attention.default: ...}`` for ``torch.onnx.export``."""
    return {torch.ops.aten.scaled_dot_product_attention.default: sdpa_as_multi_head_attention}
