"""The exported tiny pipeline: bitwise parity at unseen shapes, audit, artifacts, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_bitwise, eager, example_inputs, run_in_fresh_process
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.export import Dim

import sam3_exportable as s3e
from sam3_exportable.artifact import load_pipeline, manifest_path, read_manifest, save_pipeline
from sam3_exportable.artifact.aoti import size_hints
from sam3_exportable.artifact.program import provenance_of
from sam3_exportable.cli import main
from sam3_exportable.errors import ArtifactError, DynamicShapeAuditError, InputSpecError
from sam3_exportable.export import EXAMPLE_BATCH, EXAMPLE_PROMPTS, audit_dynamic_shapes, export_full_pipeline


@pytest.mark.parametrize(("batch", "prompts"), [(1, 1), (1, 2), (3, 2), (2, 4)])
def test_exported_equals_eager_bitwise(tiny_wrapper, tiny_ep, batch: int, prompts: int) -> None:
    inputs = example_inputs(tiny_wrapper, batch, prompts, seed=11)
    assert_bitwise(eager(tiny_wrapper, *inputs), tiny_ep.module()(*inputs))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 5), prompts=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_exported_equals_eager_at_hypothesis_shapes(tiny_wrapper, tiny_ep, batch, prompts, seed) -> None:
    inputs = example_inputs(tiny_wrapper, batch, prompts, seed=seed)
    assert_bitwise(eager(tiny_wrapper, *inputs), tiny_ep.module()(*inputs))


def test_grad_mode_of_the_caller_does_not_change_numbers(tiny_wrapper, tiny_ep) -> None:
    inputs = example_inputs(tiny_wrapper, 2, 1, seed=4)
    with torch.enable_grad():
        with_grad = tiny_ep.module()(*inputs)
    with torch.inference_mode():
        without = tiny_ep.module()(*inputs)
    assert_bitwise(with_grad, without)


def test_audit_of_the_exported_pipeline(tiny_ep) -> None:
    report = audit_dynamic_shapes(tiny_ep)
    assert report.ranges == {"batch": (1, float("inf")), "num_prompts": (1, float("inf"))}
    assert "batch=" in report.summary()


class _Toy(torch.nn.Module):
    def __init__(self, check=None) -> None:
        super().__init__()
        self.check = check

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.check is not None:
            self.check(images.shape[0], tokens.shape[0])
        return images.sum() + tokens.sum()


def _toy_export(check=None, dynamic=True, batch_max=None, **kw):
    args = (torch.rand(2, 3), torch.ones(3, 4, dtype=torch.int64))
    batch = Dim("batch", min=1, max=batch_max) if batch_max else Dim("batch", min=1)
    shapes = ({0: batch}, {0: Dim("num_prompts", min=1)}) if dynamic else None
    return torch.export.export(_Toy(check), args, dynamic_shapes=shapes, **kw)


def test_audit_rejects_specialized_programs() -> None:
    audit_dynamic_shapes(_toy_export())
    with pytest.raises(DynamicShapeAuditError, match=r"'batch'.*specialized to the constant 2"):
        audit_dynamic_shapes(_toy_export(dynamic=False))
    with pytest.raises(DynamicShapeAuditError, match=r"'batch'.*range \[1, 8\]"):
        audit_dynamic_shapes(_toy_export(batch_max=8))
    hidden = _toy_export(
        lambda b, p: torch._check(b * p != 5), prefer_deferred_runtime_asserts_over_guards=True
    )
    with pytest.raises(
        DynamicShapeAuditError, match=r"runtime constraint .*dim\(s\) \['batch', 'num_prompts'\]"
    ):
        audit_dynamic_shapes(hidden)


def test_export_rejects_size_one_examples(tiny_model) -> None:
    with pytest.raises(ValueError, match=">= 2"):
        export_full_pipeline(tiny_model, example_batch=1)


@pytest.mark.parametrize(
    ("images", "tokens", "message"),
    [
        (torch.rand(3, 224, 224), None, r"images: expected shape \[B, 3, 224, 224\], got \[3, 224, 224\]"),
        (torch.rand(1, 3, 200, 224), None, r"images: expected shape .* got \[1, 3, 200, 224\]"),
        (torch.rand(0, 3, 224, 224), None, "at least one image, got B=0"),
        (torch.rand(1, 3, 224, 224, dtype=torch.float64), None, "expected dtype float32"),
        (None, torch.ones(1, 16, dtype=torch.int64), r"token_ids: expected shape \[P, 32\], got \[1, 16\]"),
        (None, torch.ones(0, 32, dtype=torch.int64), "at least one prompt, got P=0"),
        (None, torch.ones(1, 32, dtype=torch.int32), "expected dtype int64"),
        (None, torch.full((1, 32), 49408), r"values in \[0, 49408\)"),
    ],
)
def test_wrapper_rejects_bad_inputs(tiny_wrapper, images, tokens, message) -> None:
    good_images, good_tokens = example_inputs(tiny_wrapper, 1, 1)
    with pytest.raises(InputSpecError, match=message):
        tiny_wrapper(good_images if images is None else images, good_tokens if tokens is None else tokens)


def test_bf16_autocast_equals_its_eager_twin_with_fp32_io(tiny_model, tiny_bf16_ep) -> None:
    ep = tiny_bf16_ep
    twin = s3e.FullSam3PipelineWrapper(tiny_model, autocast_dtype=torch.bfloat16)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    dtypes = [placeholders[name].meta["val"].dtype for name in ep.graph_signature.user_inputs]
    assert dtypes == [torch.float32, torch.int64]
    fp32 = s3e.FullSam3PipelineWrapper(tiny_model)
    for batch, prompts in ((1, 1), (2, 1), (3, 2)):
        inputs = example_inputs(twin, batch, prompts, seed=7)
        got = ep.module()(*inputs)
        assert all(o.dtype == torch.float32 for o in got)
        assert_bitwise(eager(twin, *inputs), got)
        assert not all(torch.equal(a, b) for a, b in zip(eager(fp32, *inputs), got, strict=True))


def test_save_then_load_in_fresh_process_with_only_torch(tiny_wrapper, tiny_ep, tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt2"
    manifest = save_pipeline(tiny_ep, path)
    assert manifest.file is not None and manifest.versions["sam3"].startswith("0.1")  # type: ignore[union-attr]
    assert json.loads(manifest_path(path).read_text())["image_size"] == 224
    # symbolic, not the trace sizes
    assert [i.shape[0] for i in manifest.inputs] != [EXAMPLE_BATCH, EXAMPLE_PROMPTS]
    inputs = example_inputs(tiny_wrapper, 3, 5, seed=9)  # shape used nowhere in tracing
    assert_bitwise(eager(tiny_wrapper, *inputs), run_in_fresh_process(path, inputs, tmp_path))
    loaded = load_pipeline(path)
    assert_bitwise(eager(tiny_wrapper, *inputs), loaded.module()(*inputs))
    # the trace sizes survive as size hints: AOTInductor plans its loops by them
    assert size_hints(loaded.program) == {"batch": EXAMPLE_BATCH, "num_prompts": EXAMPLE_PROMPTS}


def test_artifact_refuses_overwrite_and_detects_tampering(tiny_ep, tmp_path: Path) -> None:
    path = tmp_path / "a.pt2"
    save_pipeline(tiny_ep, path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="force"):
        save_pipeline(tiny_ep, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt2", "a.pt2.json"]  # no temp files
    save_pipeline(tiny_ep, path, force=True)
    with path.open("ab") as fh:
        fh.write(b"x")
    with pytest.raises(ArtifactError, match="size mismatch"):
        load_pipeline(path)
    changed = bytearray(path.read_bytes()[:-1])
    changed[len(changed) // 2] ^= 0xFF  # the same size, one byte of the weights changed
    path.write_bytes(bytes(changed))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load_pipeline(path)
    plain = tmp_path / "plain.pt2"
    torch.export.save(tiny_ep, plain)  # a program without our manifest
    with pytest.raises(ArtifactError, match="not a sam3-exportable artifact"):
        load_pipeline(plain)
    with pytest.raises(ArtifactError, match="found none"):
        load_pipeline(tmp_path / "missing.pt2")
    foreign = tmp_path / "f.pt2"
    foreign.write_bytes(b"x")
    manifest_path(foreign).write_text('{"format": "other"}')
    with pytest.raises(ArtifactError, match="carries no manifest inside"):
        load_pipeline(foreign)
    transformed = tiny_ep.run_decompositions()  # a new program object: no provenance on it
    with pytest.raises(ArtifactError, match="expected the provenance export_full_pipeline attaches"):
        save_pipeline(transformed, tmp_path / "t.pt2")
    assert not (tmp_path / "t.pt2").exists()
    saved = save_pipeline(transformed, tmp_path / "t.pt2", provenance=provenance_of(tiny_ep))
    assert saved.model.size == "tiny" and saved.patches == read_manifest(path).patches


def test_cli_export_tiny_verifies_bitwise(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tiny.pt2"
    args = ["export", "--size", "tiny", "--random-weights", "--out", str(out), "--verify", "1,3"]
    args += ["--malloc", "default"]  # keep this test process's malloc as it is
    assert main(args) == 0
    text = capsys.readouterr().out
    for stage in ("build", "export", "audit", "save", "verify"):
        assert f"[{stage}] done in" in text
    assert text.count("bitwise equal: True") == 4 and "exported == eager, bitwise" in text
    manifest = read_manifest(out)
    assert manifest.model.random_weights and manifest.context_length == 32
    assert manifest.image_size == 224 and "decoder.static_rpb_feat_size" in manifest.patches
    assert main(args) == 2
    assert "exists; pass --force" in capsys.readouterr().err
