"""One artifact contract: one manifest owner, one loader, the same interface for every kind."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import assert_bitwise, eager, example_inputs

import sam3_exportable as s3e
from sam3_exportable.artifact import load_artifact, manifest_path, read_manifest, save_pipeline
from sam3_exportable.artifact.manifest import EMBEDDED_NAME, FORMAT, FORMAT_VERSION, Manifest
from sam3_exportable.errors import ArtifactError, InputSpecError
from sam3_exportable.export import build_artifact

#: Keys every manifest copy of a program exported by this package carries.
COMPLETE = {
    "format", "format_version", "kind", "artifact_id", "created", "exported_by", "versions", "model",
    "patches", "inputs", "outputs", "image_size", "context_length", "vocab_size", "normalize",
    "tokenizer", "autocast_dtype", "audit", "size_hints", "strict", "source", "data_files", "aoti",
    "onnx", "stages", "file",
}  # fmt: skip


@pytest.fixture(scope="module")
def python_path_artifact(tiny_model, tmp_path_factory) -> tuple[Path, Manifest, torch.export.ExportedProgram]:
    """The README's Python path: export_full_pipeline + save_pipeline, nothing else."""
    with s3e.exportable_sam3() as session:
        held = session.held
    ep = s3e.export_full_pipeline(tiny_model)
    path = tmp_path_factory.mktemp("py") / "tiny.pt2"
    manifest = save_pipeline(ep, path)
    assert held  # what a default session holds is what the export recorded
    return path, manifest, ep


def test_python_path_writes_the_complete_manifest(python_path_artifact) -> None:
    path, manifest, _ = python_path_artifact
    doc = json.loads(manifest_path(path).read_text())
    assert set(doc) == COMPLETE, set(doc) ^ COMPLETE
    assert (doc["format"], doc["format_version"]) == (FORMAT, FORMAT_VERSION)
    assert manifest.kind == "pt2" and manifest.file is not None and manifest.file.name == "tiny.pt2"
    assert manifest.model.size == "tiny" and manifest.model.random_weights is True
    assert manifest.model.parameters is not None and manifest.model.parameters > 3_000_000
    assert manifest.vocab_size == 49408
    with s3e.exportable_sam3() as session:
        assert manifest.patches == tuple(session.held)
    assert manifest.audit is not None
    assert manifest.audit["ranges"] == {"batch": [1, "inf"], "num_prompts": [1, "inf"]}
    assert [i.name for i in manifest.inputs] == ["images", "token_ids"]
    assert [o.name for o in manifest.outputs] == list(s3e.OUTPUT_NAMES)
    assert Manifest.from_json(doc) == manifest == read_manifest(path)


def test_the_recipe_and_the_python_path_write_the_same_fields(python_path_artifact, tmp_path: Path) -> None:
    _, manifest, _ = python_path_artifact
    record = build_artifact(tmp_path / "r.pt2", size="tiny")  # what `sam3-exportable export` runs
    assert record.stages.keys() >= {"build", "export", "audit", "save"}
    for key in (
        "model",
        "patches",
        "audit",
        "image_size",
        "context_length",
        "vocab_size",
        "bpe_vocab_sha256",
    ):
        assert getattr(record.manifests["pt2"], key) == getattr(manifest, key), key


def test_load_artifact_interface_and_bitwise_outputs(python_path_artifact, tiny_wrapper) -> None:
    path, manifest, ep = python_path_artifact
    artifact = load_artifact(path)
    assert artifact.kind == "pt2" and artifact.manifest == manifest and artifact.path == path
    assert (artifact.image_size, artifact.context_length) == (224, 32)
    inputs = example_inputs(tiny_wrapper, 2, 3, seed=5)
    got = artifact(*inputs)
    assert isinstance(got, tuple) and len(got) == 4
    assert_bitwise(ep.module()(*inputs), got)
    assert_bitwise(eager(tiny_wrapper, *inputs), got)
    predicted = s3e.Predictor(path).predict([torch.zeros(3, 50, 60, dtype=torch.uint8)], ["a dog"], 0.0)
    assert predicted[0][0].masks.shape == (16, 1, 50, 60)


def test_loading_inside_inference_mode_keeps_outputs_bitwise(python_path_artifact, tiny_wrapper) -> None:
    # weights made under inference_mode are inference tensors, and the program then ran other
    # kernels than eager (last bits differed): the loader loads outside it
    path, _, _ = python_path_artifact
    with torch.inference_mode():
        artifact = load_artifact(path)
    inputs = example_inputs(tiny_wrapper, 1, 2, seed=1)
    assert not any(t.is_inference() for t in artifact.program.state_dict.values())
    assert_bitwise(eager(tiny_wrapper, *inputs), artifact(*inputs))


@pytest.mark.parametrize(
    ("images", "tokens", "message"),
    [
        (torch.rand(1, 3, 224, 224, dtype=torch.float64), None, "images: expected dtype float32"),
        (torch.rand(0, 3, 224, 224), None, "images: expected a batch of at least one image, got B=0"),
        (torch.full((1, 3, 224, 224), float("nan")), None, "images: expected finite values"),
        (None, torch.ones(0, 32, dtype=torch.int64), "token_ids: expected at least one prompt, got P=0"),
        (None, torch.full((1, 32), 49408), r"token_ids: expected values in \[0, 49408\)"),
        (None, torch.ones(1, 32, dtype=torch.int32), "token_ids: expected dtype int64"),
        ([[0.0]], None, "images: expected a numpy array or torch.Tensor, got list"),
    ],
)
def test_artifacts_check_inputs_like_the_eager_wrapper(
    python_path_artifact, tiny_wrapper, images, tokens, message
) -> None:
    artifact = load_artifact(python_path_artifact[0])
    good_images, good_tokens = example_inputs(tiny_wrapper, 1, 1)
    args = (good_images if images is None else images, good_tokens if tokens is None else tokens)
    with pytest.raises(InputSpecError, match=message):
        artifact(*args)
    if isinstance(args[0], torch.Tensor):
        with pytest.raises(InputSpecError, match=message):
            tiny_wrapper(*args)


def test_the_file_alone_is_the_artifact(python_path_artifact, tmp_path: Path, caplog) -> None:
    path, manifest, _ = python_path_artifact
    copy = tmp_path / "moved.pt2"
    copy.write_bytes(path.read_bytes())  # copied without its manifest copy
    with caplog.at_level(logging.WARNING):
        doc = read_manifest(copy)
    assert "manifest copy moved.pt2.json is missing" in caplog.text and doc.file is None
    assert doc.artifact_id == manifest.artifact_id and load_artifact(copy).kind == "pt2"
    stale = dataclasses.replace(manifest, artifact_id="0" * 32)
    manifest_path(copy).write_text(stale.dumps())  # a copy that belongs to another file
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert read_manifest(copy).artifact_id == manifest.artifact_id
    assert "is for another file" in caplog.text


def test_a_manifest_copy_without_its_file_is_refused(python_path_artifact, tmp_path: Path) -> None:
    path, _, ep = python_path_artifact
    plain = tmp_path / "plain.pt2"
    torch.export.save(ep, plain)
    manifest_path(plain).write_text(manifest_path(path).read_text())
    with pytest.raises(ArtifactError, match="carries no manifest inside: the file was replaced"):
        load_artifact(plain)


def test_manifests_of_version_0_1_are_read(python_path_artifact, tmp_path: Path) -> None:
    _, manifest, ep = python_path_artifact
    old = tmp_path / "old.pt2"
    torch.export.save(ep, old)  # 0.1 wrote no manifest inside the file
    from sam3_exportable.artifact.files import sha256_file

    legacy = {
        "format": "sam3-exportable/pt2",
        "format_version": 1,
        "sha256": sha256_file(old),
        "inputs": [
            {"name": "images", "shape": ["s0", 3, 224, 224]},
            {"name": "token_ids", "shape": ["s1", 32]},
        ],
        "outputs": [o.to_json() for o in manifest.outputs],
    }
    manifest_path(old).write_text(json.dumps(legacy))
    artifact = load_artifact(old)
    assert (artifact.kind, artifact.image_size, artifact.context_length) == ("pt2", 224, 32)
    assert artifact.manifest.file is not None and artifact.manifest.file.name == "old.pt2"


def test_the_embedded_manifest_lives_in_the_archive(python_path_artifact) -> None:
    import zipfile

    path, manifest, _ = python_path_artifact
    with zipfile.ZipFile(path) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(EMBEDDED_NAME)]
        embedded = json.loads(archive.read(name))
    assert "/extra/" in name
    assert Manifest.from_json(embedded) == manifest.embedded and "file" not in embedded
