"""ONNX: the whole pipeline as one onnxruntime graph, dynamic batch and prompts, within bounds
of eager, loadable by the one loader and by a process that has only onnxruntime and numpy."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ONNX_BOUNDS, eager, example_inputs, run_in_onnxruntime_only
from PIL import Image

import sam3_exportable as s3e
from sam3_exportable.artifact import load_artifact, manifest_path, read_manifest
from sam3_exportable.artifact.manifest import SourceRef
from sam3_exportable.artifact.onnx import METADATA_KEY, audit_onnx, export_onnx, int8_path_for
from sam3_exportable.cli import main
from sam3_exportable.errors import DynamicShapeAuditError, OutputExistsError
from sam3_exportable.export import export_full_pipeline
from sam3_exportable.patching.selection import patch_by_name
from sam3_exportable.verify import compare_parity, exceeded_bounds, same_instances

BOUNDS = TINY_ONNX_BOUNDS
#: Shapes never used at export time (it traces at B = P = 3).
UNSEEN = [(1, 1), (1, 5), (4, 1), (4, 5)]


def test_the_graph_keeps_named_symbolic_dims(onnx_pair) -> None:
    report = audit_onnx(onnx_pair[0])
    assert report["inputs"] == {"images": ["batch", 3, 224, 224], "token_ids": ["num_prompts", 32]}
    assert {name: dims[0] for name, dims in report["outputs"].items()} == dict.fromkeys(
        s3e.OUTPUT_NAMES, "batch*num_prompts"
    )
    assert report["zero_size_values"] == 0 and report["opsets"]["com.microsoft"] == 1


@pytest.mark.parametrize(("batch", "prompts"), UNSEEN)
def test_unseen_shapes_follow_b_times_p_within_bounds(onnx_pair, tiny_wrapper, batch, prompts) -> None:
    artifact = load_artifact(onnx_pair[0])
    inputs = example_inputs(tiny_wrapper, batch, prompts, seed=17)
    got = artifact(*inputs)
    assert [tuple(o.shape) for o in got] == [
        (batch * prompts, 16, 1),
        (batch * prompts, 16, 4),
        (batch * prompts, 16, 64, 64),
        (batch * prompts, 1),
    ]
    parity = compare_parity(eager(tiny_wrapper, *inputs), got)
    assert exceeded_bounds(parity, BOUNDS) == {}, parity["max_abs_diff"]
    assert same_instances(parity), parity
    assert parity["kept_at_top10"]["kept"] == 10 * batch * prompts


def test_a_process_with_only_onnxruntime_and_numpy_runs_it(onnx_pair, tiny_wrapper, tmp_path: Path) -> None:
    inputs = example_inputs(tiny_wrapper, 4, 5, seed=3)
    (got,) = run_in_onnxruntime_only(onnx_pair[0], [inputs], tmp_path, timeout=300)
    parity = compare_parity(eager(tiny_wrapper, *inputs), got)
    assert exceeded_bounds(parity, BOUNDS) == {} and same_instances(parity)


def test_the_onnx_patch_is_bitwise_neutral_in_eager(tiny_wrapper) -> None:
    # the patch removes the empty point/box encodings from the graph; eager gives the same bits
    patch = patch_by_name("geometry_encoders.empty_first_sequence")
    for batch, prompts in ((1, 1), (2, 3), (4, 5)):
        inputs = example_inputs(tiny_wrapper, batch, prompts, seed=29)
        with s3e.exportable_sam3():
            without = tiny_wrapper(*inputs)
        with s3e.exportable_sam3(include=[patch.name]):
            within = tiny_wrapper(*inputs)
        assert all(torch.equal(a, b) for a, b in zip(without, within, strict=True))


def test_without_the_onnx_patch_the_graph_has_empty_values(tiny_model, tmp_path: Path) -> None:
    ep = export_full_pipeline(
        tiny_model, target="onnx", patches={"exclude": ["geometry_encoders.empty_first_sequence"]}
    )
    with pytest.raises(DynamicShapeAuditError, match="expected no zero-size values"):
        export_onnx(ep, tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []  # refused before anything was published


def _graph_bytes(path: Path) -> bytes:
    """The graph with its weights, less each node's Python stack trace (it names the n-th
    module torch generated in this process, so two conversions never share it)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=True).graph
    for node in graph.node:
        kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    return graph.SerializeToString()


def test_the_optimizer_patch_leaves_the_graph_byte_for_byte(onnx_record, tmp_path: Path, monkeypatch) -> None:
    """The recipe's graph (optimized with the onnxscript matcher's patch held) against the same
    program optimized by the unpatched onnxscript: the same graph and weights, byte for byte."""
    from onnxscript.rewriter._matcher import SimplePatternMatcher

    from sam3_exportable.artifact import onnx as onnx_export
    from sam3_exportable.artifact.onnx_optimizer import optimizer_scope
    from sam3_exportable.patching import is_patched

    held: list[bool] = []

    @contextlib.contextmanager
    def unpatched():
        held.append(is_patched(vars(SimplePatternMatcher)["match"]))
        yield

    monkeypatch.setattr(onnx_export, "optimizer_scope", unpatched)
    export_onnx(onnx_record.program, tmp_path / "unpatched.onnx")
    assert held == [False]
    assert _graph_bytes(tmp_path / "unpatched.onnx") == _graph_bytes(onnx_record.paths["onnx"])
    with optimizer_scope() as session:
        assert session.held == ("onnxscript.multi_output_match_prefilter",) and not session.skipped
        assert is_patched(vars(SimplePatternMatcher)["match"])
    assert not is_patched(vars(SimplePatternMatcher)["match"])
    with pytest.raises(RuntimeError, match="conversion failed"), optimizer_scope():
        raise RuntimeError("conversion failed")
    assert not is_patched(vars(SimplePatternMatcher)["match"])  # reverted on the exception too


def test_the_optimizer_patch_skips_the_graph_index_only_for_a_node_of_another_op(monkeypatch) -> None:
    """The default rule set's two-output pattern (two Slices -> Split) tried on an Add: the
    patched matcher answers without walking the graph; on a Slice it runs the original."""
    import onnx_ir as ir
    from onnxscript import rewriter

    from sam3_exportable.artifact.onnx_optimizer import optimizer_scope

    (rule,) = [r for r in rewriter._DEFAULT_REWRITE_RULES if not r._target_pattern.has_single_output_node]
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4]))
    add, piece = ir.Node("", "Add", [x, x]), ir.Node("", "Slice", [x, x, x])
    graph = ir.Graph([x], [add.outputs[0], piece.outputs[0]], nodes=[add, piece], opset_imports={"": 18})
    model = ir.Model(graph, ir_version=10)
    walks: list[int] = []
    walk = ir.Graph.__iter__
    monkeypatch.setattr(ir.Graph, "__iter__", lambda self: (walks.append(1), walk(self))[1])

    def tried(node: ir.Node) -> tuple[bool, int]:
        walks.clear()
        return bool(rule._matcher.match(model, graph, node, verbose=0, remove_nodes=True)), len(walks)

    unpatched = tried(add)
    assert not unpatched[0] and unpatched[1] > 0  # the original indexes the graph for every node
    with optimizer_scope():
        assert tried(add) == (False, 0)
        assert tried(piece) == unpatched


def test_another_onnxscript_runs_the_optimizer_unpatched(monkeypatch, caplog) -> None:
    import dataclasses

    from onnxscript.rewriter._matcher import SimplePatternMatcher

    from sam3_exportable.artifact import onnx_optimizer
    from sam3_exportable.patching import is_patched

    stale = dataclasses.replace(onnx_optimizer.ONNX_OPTIMIZER_PATCH, fingerprint="0" * 16)
    monkeypatch.setattr(onnx_optimizer, "ONNX_OPTIMIZER_PATCH", stale)
    with caplog.at_level("WARNING"), onnx_optimizer.optimizer_scope() as session:
        assert session.skipped == [stale.name] and session.held == ()
        assert not is_patched(vars(SimplePatternMatcher)["match"])
    assert f"skipping mismatched patch {stale.name}" in caplog.text


def test_the_manifest_lives_in_the_graph_and_names_its_weights(onnx_pair) -> None:
    import onnx

    graph, _ = onnx_pair
    manifest = read_manifest(graph)
    model = onnx.load(str(graph), load_external_data=False)
    embedded = json.loads(next(p.value for p in model.metadata_props if p.key == METADATA_KEY))
    assert embedded["artifact_id"] == manifest.artifact_id and manifest.kind == "onnx"
    (data,) = manifest.data_files
    assert embedded["data_files"] == [data.to_json()]  # the weights' hash travels inside the graph
    assert data.name == f"{graph.name}.{manifest.artifact_id[:12]}.data"
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert manifest.onnx is not None and manifest.onnx.session["providers"] == ["CPUExecutionProvider"]
    assert locations == {data.name}


def test_replacing_a_graph_never_breaks_the_old_one_and_drops_its_weights(
    onnx_record, tmp_path: Path
) -> None:
    # the recipe's program, converted again (twice): a program converts any number of times
    path, ep = tmp_path / "r.onnx", onnx_record.program
    first = export_onnx(ep, path, optimize=False)
    with pytest.raises(OutputExistsError, match="exists; pass --force"):
        export_onnx(ep, path, optimize=False)
    second = export_onnx(ep, path, force=True, optimize=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["r.onnx", "r.onnx.json", second.data_files[0].name])
    assert first.data_files[0].name != second.data_files[0].name
    assert load_artifact(path).manifest.artifact_id == second.artifact_id


def test_int8_is_recorded_and_compared_by_verify(onnx_pair, tmp_path: Path, capsys) -> None:
    graph, int8 = onnx_pair
    assert int8 == int8_path_for(graph)
    manifest = read_manifest(int8)
    source = read_manifest(graph)
    assert manifest.onnx is not None and manifest.onnx.quantization is not None
    assert manifest.onnx.quantization["weight_type"] == "QInt8" and source.file is not None
    assert manifest.source == SourceRef("onnx", source.artifact_id, graph.name, source.file.sha256)
    images = []
    for i, size in enumerate([(120, 90), (64, 200)]):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(
            images[-1]
        )
    args = ["verify", "--reference", str(graph), "--candidate", str(int8), "--prompt", "a dog"]
    args += [a for image in images for a in ("--image", str(image))]
    status = main(args)
    out = capsys.readouterr().out
    assert "t.int8.onnx" not in out and "2 image(s) x 1 phrase(s)" in out and "max|diff|" in out
    assert status == (0 if "keeps the same instances as the reference at 0.5: True" in out else 1)
    assert main([*args[:2], str(graph), "--candidate", str(graph), *args[5:]]) == 0  # itself: identical
    assert "bitwise equal: True" in capsys.readouterr().out


def test_predictor_and_cli_predict_run_the_graph(onnx_pair, tiny_ep, tmp_path: Path) -> None:
    image = Image.fromarray(np.random.default_rng(5).integers(0, 255, (90, 130, 3), dtype=np.uint8))
    by_program = s3e.Predictor(tiny_ep)
    pixels, ids = by_program.preprocess([image]), by_program.tokenize(["a dog", "a cat"])
    ours = s3e.Predictor(onnx_pair[0]).artifact(pixels.numpy(), ids)
    assert all(isinstance(o, np.ndarray) for o in ours)  # numpy in, numpy out: no torch needed
    reference = by_program.artifact(pixels, torch.from_numpy(ids))
    parity = compare_parity(reference, ours)
    assert exceeded_bounds(parity, BOUNDS) == {} and same_instances(parity)
    image.save(tmp_path / "a.png")
    out = tmp_path / "out"
    args = ["predict", "--model", str(onnx_pair[0]), "--image", str(tmp_path / "a.png"), "--prompt", "a dog"]
    assert main([*args, "--out", str(out), "--threshold", "0.0", "--malloc", "default"]) == 0
    assert any(out.iterdir())


def test_the_manifest_copy_beside_the_graph_is_checked(onnx_pair, tmp_path: Path) -> None:
    graph, _ = onnx_pair
    copy = tmp_path / graph.name
    copy.write_bytes(graph.read_bytes())
    (data,) = read_manifest(graph).data_files
    (tmp_path / data.name).write_bytes((graph.parent / data.name).read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(s3e.ArtifactError, match="sha256 mismatch"):
        load_artifact(copy)  # the embedded manifest carries the weights' hash: no copy needed
    manifest_path(copy).write_text(manifest_path(graph).read_text())
    with pytest.raises(s3e.ArtifactError, match="sha256 mismatch"):
        load_artifact(copy)
