"""bf16 at B >= 2: no attention in-projection takes matmul's bmm path (a per-token copy of the
weight) any more, and the fix keeps every numerical contract."""

from __future__ import annotations

import torch
from conftest import assert_bitwise, eager
from torch.profiler import ProfilerActivity, profile

import sam3_exportable as s3e
from sam3_exportable.artifact.program import synthetic_inputs
from sam3_exportable.export import export_full_pipeline
from sam3_exportable.patching.upstream.model_misc import _contiguous_in_projection_under_autocast

FIX = "model_misc.contiguous_in_projection_under_autocast"


def _token_bmm_calls(fn) -> int:
    """aten::bmm calls batched over the 256 image tokens of the tiny model: what F.linear on a
    seq-first (256, N, 64) view of batch-first memory turns into under bf16 autocast."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return sum(
        1
        for e in prof.events()
        if e.name == "aten::bmm" and e.input_shapes and e.input_shapes[0][:1] == [256]
    )


def test_in_projections_take_addmm_at_batch_2(tiny_model) -> None:
    wrapper = s3e.FullSam3PipelineWrapper(tiny_model, autocast_dtype=torch.bfloat16).eval()
    inputs = synthetic_inputs(wrapper.image_size, wrapper.context_length, batch=2, prompts=1)
    with s3e.exportable_sam3(exclude=[FIX]):
        before = _token_bmm_calls(lambda: wrapper(*inputs))
    with s3e.exportable_sam3():
        after = _token_bmm_calls(lambda: wrapper(*inputs))
    assert before == 14  # encoder self/cross, decoder cross and geometry cross in-projections
    assert after == 0


def test_the_bf16_program_keeps_its_contract(tiny_model, tiny_ep, tiny_bf16_ep) -> None:
    inputs = synthetic_inputs(224, 32, batch=2, prompts=1)
    assert _token_bmm_calls(lambda: tiny_bf16_ep.module()(*inputs)) == 0
    twin = s3e.FullSam3PipelineWrapper(tiny_model, autocast_dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        assert_bitwise(eager(twin, *inputs), tiny_bf16_ep.module()(*inputs))
    # fp32: the patch passes every call through, so the graph is the one without it
    without = export_full_pipeline(tiny_model, patches={"exclude": [FIX]})
    assert tiny_ep.graph_module.print_readable(print_output=False) == without.graph_module.print_readable(
        print_output=False
    )


def test_fp32_calls_pass_through_and_identity_is_kept() -> None:
    from sam3.model.model_misc import MultiheadAttentionWrapper

    calls: list[tuple[tuple, dict]] = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))

    q, v = torch.randn(2, 256, 64), torch.randn(2, 256, 64)
    for batch_first in (True, False):
        mha = MultiheadAttentionWrapper(embed_dim=64, num_heads=4, batch_first=batch_first).eval()
        calls.clear()
        _contiguous_in_projection_under_autocast(record, mha, (q, q), {"value": v, "attn_mask": None})
        ((a, k),) = calls
        assert a[0] is q and a[1] is q and k["value"] is v  # fp32: the very same objects
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _contiguous_in_projection_under_autocast(record, mha, (q, q), {"value": v, "attn_mask": None})
        ((a, k),) = calls
        assert a[0] is a[1] and k["value"] is not a[0]  # `is` relations kept
        for t, want in ((a[0], q), (k["value"], v)):
            seq_first = t.transpose(0, 1) if batch_first else t
            assert seq_first.is_contiguous() and torch.equal(t, want)
