"""Patches for ``sam3/model/position_encoding.py`` (``PositionEmbeddingSine``)."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..engine import Patch
from ..when import always, without_cuda


def _precompute_on_available_device(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Run upstream ``__init__``; do its cache precompute on CPU when CUDA is absent.

    Upstream precomputes with ``torch.zeros(..., device="cuda")``; the cached encodings are
    the same math on CPU, and upstream's own cache-miss path computes them there too.
    """
    if torch.cuda.is_available():
        return wrapped(*args, **kwargs)
    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    bound.apply_defaults()
    resolution = bound.arguments["precompute_resolution"]
    result = wrapped(**{**bound.arguments, "precompute_resolution": None})
    if resolution is not None:
        for stride in (4, 8, 16, 32):
            size = (resolution // stride, resolution // stride)
            instance.forward(torch.zeros((1, 1, *size), device="cpu"))
            instance.cache[size] = instance.cache[size].clone().detach()
    return result


PRECOMPUTE_ON_AVAILABLE_DEVICE = Patch(
    name="position_encoding.precompute_on_available_device",
    target="sam3.model.position_encoding.PositionEmbeddingSine.__init__",
    why=(
        "building the model without CUDA fails in the cache precompute "
        "(torch.zeros(..., device='cuda')): 'RuntimeError: Found no NVIDIA driver on "
        "your system'"
    ),
    when="model build on a machine without CUDA (any torch, any export mode)",
    fingerprint="adb2c948a6239f94",
    wrapper=_precompute_on_available_device,
    needed=without_cuda,
    fixed_upstream=lambda src: 'device="cuda"' not in src,
)


def _encode_xy(self: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Same ops as upstream; only the length check differs: torch._check on sizes instead
    # of ``len()``, which concretises a symbolic dim.
    torch._check(x.ndim == 1 and y.ndim == 1, lambda: "_encode_xy: x and y must be 1-D")
    torch._check(x.shape[0] == y.shape[0], lambda: f"_encode_xy: len(x)={x.shape[0]} != len(y)={y.shape[0]}")
    x_embed = x * self.scale
    y_embed = y * self.scale

    dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
    dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)

    pos_x = x_embed[:, None] / dim_t
    pos_y = y_embed[:, None] / dim_t
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
    return pos_x, pos_y


SYMINT_SAFE_ENCODE_XY = Patch(
    name="position_encoding.symint_safe_encode_xy",
    target="sam3.model.position_encoding.PositionEmbeddingSine._encode_xy",
    why=(
        "silent specialization: 'assert len(x) == len(y)' calls len() on a tensor whose "
        "length is batch*num_prompts, which concretises it; the exported graph then "
        "carries a hidden runtime assert Eq(batch*num_prompts, <traced value>) and fails "
        "at every other shape"
    ),
    when="every torch.export with dynamic batch or prompts (strict and non-strict)",
    fingerprint="5383a96613a54e27",
    wrapper=lambda wrapped, instance, args, kwargs: _encode_xy(instance, *args, **kwargs),
    needed=always,
    replaces=True,
    rationale="the len() assert sits inside the function body; no hook can reach it",
    fixed_upstream=lambda src: "assert len(x) == len(y)" not in src,
)


class _BypassCache(dict):
    """A cache that never hits and never stores, and never hashes its (maybe symbolic) key."""

    def __contains__(self, key: object) -> bool:
        return False

    def __setitem__(self, key: object, value: object) -> None:
        pass


def _trace_safe_cache(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Eager: upstream unchanged. Tracing: compute in the graph, never touch the cache.

    Upstream stores ``pos[0]`` in ``self.cache`` on a miss; during tracing that value is a
    fake tensor which would poison later eager calls, and a symbolic (H, W) key cannot be
    hashed. The in-graph value is the same computation the cache would have held.
    """
    if not torch.compiler.is_compiling():  # eager: upstream, cache and all
        return wrapped(*args, **kwargs)
    saved = instance.cache
    instance.cache = _BypassCache()
    try:
        return wrapped(*args, **kwargs)
    finally:
        instance.cache = saved


TRACE_SAFE_CACHE = Patch(
    name="position_encoding.trace_safe_cache",
    target="sam3.model.position_encoding.PositionEmbeddingSine.forward",
    why=(
        "a cache miss during tracing stores a FakeTensor in PositionEmbeddingSine.cache "
        "(later eager calls then fail or return a fake value); with a symbolic (H, W) the "
        "lookup fails with 'TypeError: unhashable type: non-nested SymInt'; and whether "
        "the graph embedded a cached constant depended on whether eager ran first"
    ),
    when="every torch.export / torch.compile trace",
    fingerprint="6b031cd6b701ded9",
    wrapper=_trace_safe_cache,
    needed=always,
    fixed_upstream=lambda src: "is_compiling()" in src,
)
