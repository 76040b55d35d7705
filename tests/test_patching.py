"""The transactional patch layer: undo stack, nesting, loud failure on upstream drift."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from conftest import assert_bitwise, eager, example_inputs

import sam3_exportable as s3e
from sam3_exportable.errors import UpstreamMismatchError
from sam3_exportable.patching import Patch, PatchContext, PatchSession, resolve_target
from sam3_exportable.patching.selection import default_context, patch_by_name, select_patches
from sam3_exportable.patching.upstream import ALL_PATCHES


def _current() -> dict[str, object]:
    return {p.name: resolve_target(p.target)[2] for p in ALL_PATCHES}


def _owned(p: Patch) -> bool:
    parent, attribute, _ = resolve_target(p.target)
    return attribute in vars(parent)


ORIGINALS = _current()


def test_every_patch_is_declared() -> None:
    names = [p.name for p in ALL_PATCHES]
    assert len(names) == len(set(names))
    for p in ALL_PATCHES:
        assert p.target.startswith("sam3.model."), p.name
        assert p.name.split(".")[0] in p.target, f"{p.name}: module name must match the upstream file"
        assert len(p.why) > 40 and p.when and len(p.fingerprint) == 16
        assert not p.replaces or p.rationale, f"{p.name}: a replacement must say why"
        assert p.current_fingerprint() == p.fingerprint, p.name


def test_patches_active_inside_and_originals_restored_on_exit() -> None:
    opt_in = ["model_misc.sdpa_box_rpb_cross_attention", "geometry_encoders.empty_first_sequence"]
    with s3e.exportable_sam3(include=opt_in) as session:
        assert set(session.active) == {p.name for p in ALL_PATCHES}
        for p in ALL_PATCHES:
            value = resolve_target(p.target)[2]
            assert s3e.is_patched(value), p.name
            assert s3e.original_of(value) is ORIGINALS[p.name]
            if sum(q.target == p.target for q in ALL_PATCHES) == 1:  # else stacked on another
                assert value.__wrapped__ is ORIGINALS[p.name]
    assert _current() == ORIGINALS
    assert all(_owned(p) for p in ALL_PATCHES)


def test_reverted_when_the_body_raises() -> None:
    with pytest.raises(KeyError, match="boom"), s3e.exportable_sam3():
        assert s3e.is_patched(resolve_target(ALL_PATCHES[1].target)[2])
        raise KeyError("boom")
    assert _current() == ORIGINALS


def test_nesting_keeps_the_true_original_and_outer_state() -> None:
    with s3e.exportable_sam3():
        outer = _current()
        with s3e.exportable_sam3() as inner:
            assert inner.active == ()  # nothing wrapped twice
            assert _current() == outer
            for p in select_patches():
                assert s3e.original_of(resolve_target(p.target)[2]) is ORIGINALS[p.name]
        assert _current() == outer
    assert _current() == ORIGINALS


def test_a_copy_of_an_applied_patch_does_not_wrap_twice() -> None:
    patch = patch_by_name("decoder.static_rpb_feat_size")
    with PatchSession([patch]), PatchSession([dataclasses.replace(patch)]) as inner:
        assert inner.active == ()
        value = resolve_target(patch.target)[2]
        assert value.__wrapped__ is ORIGINALS[patch.name]
    assert _current() == ORIGINALS


def test_interleaved_sessions_revert_in_reverse_order() -> None:
    a = PatchSession([patch_by_name("decoder.static_rpb_feat_size")])
    b = PatchSession(select_patches())
    a.apply()
    b.apply()
    b.revert()
    assert s3e.is_patched(resolve_target("sam3.model.decoder.TransformerDecoder._get_rpb_matrix")[2])
    a.revert()
    a.revert()  # idempotent
    assert _current() == ORIGINALS


def test_fingerprint_mismatch_raises_named_error_and_changes_nothing() -> None:
    good = patch_by_name("position_encoding.symint_safe_encode_xy")
    bad = dataclasses.replace(patch_by_name("decoder.static_rpb_feat_size"), fingerprint="0" * 16)
    with pytest.raises(UpstreamMismatchError) as err:
        PatchSession([good, bad]).apply()
    message = str(err.value)
    assert "decoder.static_rpb_feat_size" in message and "sam3 0.1" in message
    assert _current() == ORIGINALS


def test_mismatch_can_be_skipped_explicitly_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    bad = dataclasses.replace(patch_by_name("decoder.static_rpb_feat_size"), fingerprint="0" * 16)
    with caplog.at_level(logging.WARNING), PatchSession([bad], skip_mismatched=[bad.name]) as session:
        assert session.skipped == [bad.name] and session.active == ()
    assert "skipping mismatched patch decoder.static_rpb_feat_size" in caplog.text
    with pytest.raises(ValueError, match="unknown patch names"):
        PatchSession([bad], skip_mismatched=["nope"])


def test_missing_target_raises_named_error() -> None:
    gone = dataclasses.replace(
        patch_by_name("decoder.static_rpb_feat_size"),
        target="sam3.model.decoder.TransformerDecoder._no_such_method",
    )
    with pytest.raises(UpstreamMismatchError, match=r"decoder.static_rpb_feat_size.*missing"):
        PatchSession([gone]).apply()


def test_failure_while_applying_reverts_what_was_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    first = patch_by_name("position_encoding.symint_safe_encode_xy")
    second = patch_by_name("decoder.static_rpb_feat_size")
    session = PatchSession([first, second])
    calls = []
    real = PatchSession._apply_one

    def flaky(self: PatchSession, patch: Patch) -> None:
        calls.append(patch.name)
        if patch is second:
            raise RuntimeError("simulated failure")
        real(self, patch)

    monkeypatch.setattr(PatchSession, "_apply_one", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        session.apply()
    assert calls == [first.name, second.name]
    assert _current() == ORIGINALS


def test_selection_by_context_and_names() -> None:
    cpu = PatchContext(cuda_available=False)
    gpu = dataclasses.replace(cpu, cuda_available=True)
    cpu_names = {p.name for p in select_patches(context=cpu)}
    gpu_names = {p.name for p in select_patches(context=gpu)}
    build_only = {"position_encoding.precompute_on_available_device", "decoder.coords_on_available_device"}
    assert build_only <= cpu_names and not build_only & gpu_names
    assert "model_misc.sdpa_box_rpb_cross_attention" not in cpu_names
    onnx = dataclasses.replace(cpu, export_target="onnx")
    onnx_only = {p.name for p in select_patches(context=onnx)} - cpu_names
    assert onnx_only == {"geometry_encoders.empty_first_sequence"}
    assert [p.name for p in select_patches(only=["decoder.static_rpb_feat_size"])] == [
        "decoder.static_rpb_feat_size"
    ]
    excluded = select_patches(exclude="decoder.static_rpb_feat_size", context=cpu)
    assert "decoder.static_rpb_feat_size" not in {p.name for p in excluded}
    included = select_patches(include="model_misc.sdpa_box_rpb_cross_attention", context=cpu)
    assert "model_misc.sdpa_box_rpb_cross_attention" in {p.name for p in included}
    with pytest.raises(ValueError, match="unknown patch 'nope'"):
        select_patches(exclude=["nope"])
    with pytest.raises(ValueError, match="not both"):
        select_patches(only=["decoder.static_rpb_feat_size"], include=["decoder.static_rpb_feat_size"])
    assert default_context().cuda_available == torch.cuda.is_available()


def test_eager_outputs_unchanged_by_having_patched_before(tiny_wrapper) -> None:
    inputs = example_inputs(tiny_wrapper, 2, 2, seed=3)
    # The image backbone runs without any patch; the same numbers before, inside, after.
    with torch.no_grad():
        before = tiny_wrapper.model.backbone.forward_image(inputs[0])["vision_features"]
    first = eager(tiny_wrapper, *inputs)
    with s3e.exportable_sam3(), pytest.raises(RuntimeError):
        raise RuntimeError("leave through an exception")
    second = eager(tiny_wrapper, *inputs)
    with torch.no_grad():
        after = tiny_wrapper.model.backbone.forward_image(inputs[0])["vision_features"]
    assert torch.equal(before, after)
    assert_bitwise(first, second)
    assert _current() == ORIGINALS


def test_doctor_names_a_torch_outside_the_tested_versions() -> None:
    from sam3_exportable.patching.doctor import TESTED_TORCH, torch_note

    for torch_version, vision_version in TESTED_TORCH:
        assert torch_note(torch_version + "+cu130", vision_version).endswith("this is one of them")
    note = torch_note("2.16.0+cpu", "0.30.0")
    assert note.startswith("torch 2.16.0 / torchvision 0.30.0 is outside the tested versions"), note
    assert "bash scripts/test_torch.sh 2.16.0 0.30.0" in note
    assert "outside" in torch_note("2.15.0", "0.29.1")  # a pair, not two independent ranges


def test_doctor_table_on_the_pinned_upstream(capsys) -> None:
    from sam3_exportable.cli import main

    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "sam3 0.1" in out
    assert "tested versions (torch 2.14.1 / torchvision 0.29.1, torch 2.15.0 / torchvision 0.29.2)" in out
    for p in ALL_PATCHES:
        line = next(line for line in out.splitlines() if line.startswith(p.name + " "))
        assert line.split()[-1] == "ok" and "needs patch" in line, line
    bad = dataclasses.replace(patch_by_name("decoder.static_rpb_feat_size"), fingerprint="0" * 16)
    from sam3_exportable.patching.doctor import doctor_rows

    (row,) = doctor_rows([bad])
    assert row.fingerprint.startswith("MISMATCH") and not row.applied
