"""The typed manifest: every field of every kind round-trips, every field is validated, old
schemas upgrade, and a predict run reads it once. Runs without any model."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sam3_exportable.artifact import manifest as manifest_module
from sam3_exportable.artifact.manifest import (
    FORMAT,
    FORMAT_VERSION,
    AotiInfo,
    FileRecord,
    Manifest,
    ModelInfo,
    OnnxInfo,
    SourceRef,
    StagesInfo,
    TensorSpec,
)
from sam3_exportable.errors import ArtifactError

SHA = "ab" * 32


def _full(kind: str) -> Manifest:
    """A manifest of ``kind`` with every field set to a value other than its default."""
    return Manifest(
        kind=kind,
        artifact_id="0123456789abcdef0123456789abcdef",
        created="2026-12-06T04:00:00+00:00",
        exported_by="sam3-exportable 0.2.0",
        versions={"python": "3.11.7", "torch": "2.14.1", "sam3": None},
        model=ModelInfo(
            size="tiny",
            parameters=4_300_000,
            checkpoint="hf://facebook/sam3",
            random_weights=False,
            seed=7,
            missing_keys=2,
            unexpected_keys=1,
        ),
        patches=("decoder.static_rpb_feat_size", "encoder.feat_sizes_dim_check"),
        inputs=(
            TensorSpec("images", ("s34", 3, 224, 224), "float32"),
            TensorSpec("token_ids", ("s69", 32), "int64"),
        ),
        outputs=(
            TensorSpec("pred_logits", ("s34*s69", 16, 1), "float32"),
            TensorSpec("pred_boxes", ("s34*s69", 16, 4), "float32"),
            TensorSpec("pred_masks", ("s34*s69", 16, 64, 64), "float32"),
            TensorSpec("presence_logit_dec", ("s34*s69", 1), "float32"),
        ),
        image_size=224,
        context_length=32,
        vocab_size=49408,
        normalize_mean=(0.25, 0.5, 0.75),
        normalize_std=(0.1, 0.2, 0.3),
        tokenizer_kind="some.Tokenizer",
        bpe_vocab_sha256=SHA,
        autocast_dtype="bf16",
        audit={"symbols": {"batch": "s34"}, "ranges": {"batch": [1, "inf"]}},
        size_hints={"batch": 3, "num_prompts": 3},
        strict=True,
        source=SourceRef(kind="pt2", artifact_id="f" * 32, artifact="sam3.pt2", sha256=SHA),
        data_files=(FileRecord("sam3.onnx.0123.data", SHA, 123),) if kind == "onnx" else (),
        aoti=AotiInfo(12.5, {"freezing": True}, 2) if kind == "aoti" else None,
        onnx=OnnxInfo(18, True, {"providers": ["CPUExecutionProvider"]}, ("com.microsoft.X",), {"w": "QInt8"})
        if kind == "onnx"
        else None,
        stages=StagesInfo(
            features=(TensorSpec("backbone_fpn_0", ("batch", 64, 64, 64), "float32"),),
            audits={"ground": {"ranges": {"batch": [1, "inf"]}}},
        )
        if kind == "pt2"
        else None,
        file=FileRecord(f"sam3.{kind}", SHA, 4567),
    )


@pytest.mark.parametrize("kind", ["pt2", "aoti", "onnx"])
def test_every_field_of_every_kind_round_trips(kind: str) -> None:
    manifest = _full(kind)
    defaults = Manifest(
        kind=kind,
        artifact_id="x",
        created="",
        exported_by="",
        versions={},
        model=ModelInfo("x"),
        patches=(),
        inputs=(),
        outputs=(),
        image_size=1,
        context_length=1,
    )
    for field in dataclasses.fields(Manifest):  # the fixture sets every field
        if field.name != "kind" and (
            field.name not in ("data_files", "aoti", "onnx", "stages") or getattr(manifest, field.name)
        ):
            assert getattr(manifest, field.name) != getattr(defaults, field.name), field.name
    doc = manifest.to_json()
    assert (doc["format"], doc["format_version"]) == (FORMAT, FORMAT_VERSION)
    assert Manifest.from_json(doc) == manifest
    assert Manifest.loads(manifest.dumps()) == manifest
    assert Manifest.from_json(json.loads(json.dumps(doc))) == manifest
    assert manifest.embedded.file is None and "file" not in manifest.embedded.to_json()


_V2_ONNX = {
    "format": "sam3-exportable",
    "format_version": 2,
    "kind": "onnx",
    "artifact_id": "a" * 32,
    "created": "2026-12-01T00:00:00+00:00",
    "exported_by": "sam3-exportable 0.2.0",
    "versions": {"python": "3.11.7"},
    "model": {"size": "full", "parameters": 1, "checkpoint": None, "random_weights": True, "seed": 0,
              "missing_keys": 0, "unexpected_keys": 0},
    "patches": ["a"],
    "inputs": [{"name": "images", "shape": ["s0", 3, 1008, 1008], "dtype": "float32"},
               {"name": "token_ids", "shape": ["s1", 32], "dtype": "int64"}],
    "outputs": [{"name": n, "shape": ["s0*s1"], "dtype": "float32"}
                for n in ("pred_logits", "pred_boxes", "pred_masks", "presence_logit_dec")],
    "image_size": 1008,
    "context_length": 32,
    "vocab_size": 49408,
    "normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    "tokenizer": {"kind": "k", "bpe_vocab_sha256": SHA},
    "autocast_dtype": None,
    "audit": None,
    "size_hints": {"batch": 3},
    "strict": False,
    "opset": 18,
    "onnx_optimized": True,
    "onnxruntime": {"providers": ["CPUExecutionProvider"]},
    "contrib_ops": ["m"],
    "quantization": {"weight_type": "QInt8"},
    "source": {"artifact": "sam3.onnx", "sha256": SHA},
    "artifact": "sam3.int8.onnx",
    "sha256": SHA,
    "size_bytes": 99,
    "data_files": [{"name": "sam3.int8.onnx.aaaa.data", "sha256": SHA, "size_bytes": 5}],
}  # fmt: skip


def test_a_version_2_manifest_upgrades() -> None:
    manifest = Manifest.from_json(_V2_ONNX)
    assert manifest.onnx == OnnxInfo(
        18, True, {"providers": ["CPUExecutionProvider"]}, ("m",), {"weight_type": "QInt8"}
    )
    assert manifest.file == FileRecord("sam3.int8.onnx", SHA, 99)
    assert manifest.source == SourceRef(artifact="sam3.onnx", sha256=SHA)
    assert manifest.data_files == (FileRecord("sam3.int8.onnx.aaaa.data", SHA, 5),)
    assert Manifest.from_json(manifest.to_json()) == manifest  # and writes as version 3


def _broken(path: str, value):
    doc = _full("onnx").to_json()
    node = doc
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    elif value is KeyError:
        del node[last]
    else:
        node[last] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("kind", "tflite", "kind"),
        ("format_version", 9, "format_version"),
        ("format", "other", "format"),
        ("artifact_id", 3, "artifact_id"),
        ("versions.torch", 2, "versions.torch"),
        ("model.size", None, "model.size"),
        ("model.random_weights", "yes", "model.random_weights"),
        ("model.parameters", 1.5, "model.parameters"),
        ("patches", "a", "patches"),
        ("patches.0", 1, "patches[0]"),
        ("inputs", KeyError, "inputs"),
        ("inputs.0.shape", [None], "inputs[0].shape[0]"),
        ("inputs.0.name", "pixels", "inputs"),
        ("outputs.3.name", "presence", "outputs"),
        ("image_size", 0, "image_size"),
        ("image_size", 448, "image_size"),
        ("context_length", True, "context_length"),
        ("vocab_size", -1, "vocab_size"),
        ("normalize.mean", [0.5], "normalize.mean"),
        ("tokenizer.bpe_vocab_sha256", "xyz", "tokenizer.bpe_vocab_sha256"),
        ("autocast_dtype", "int8", "autocast_dtype"),
        ("audit", [], "audit"),
        ("size_hints.batch", 0, "size_hints.batch"),
        ("strict", "no", "strict"),
        ("source.sha256", 5, "source.sha256"),
        ("data_files.0.name", "../escape.data", "data_files[0].name"),
        ("data_files.0.sha256", "0", "data_files[0].sha256"),
        ("data_files.0.size_bytes", -2, "data_files[0].size_bytes"),
        ("onnx.opset", 0, "onnx.opset"),
        ("onnx.optimized", 1, "onnx.optimized"),
        ("onnx", None, "onnx"),
        ("aoti", {"compile_seconds": 1, "inductor_configs": {}, "compile_threads": 1}, "aoti"),
        ("file.size_bytes", "big", "file.size_bytes"),
    ],
)
def test_every_field_is_validated_by_name(path: str, value, named: str) -> None:
    with pytest.raises(ArtifactError, match=f"manifest: {re.escape(named)}:"):
        Manifest.from_json(_broken(path, value))


def test_the_manifest_module_needs_no_torch() -> None:
    code = (
        "import sys; import sam3_exportable.artifact.manifest as m; "
        "import sam3_exportable.artifact.loader, sam3_exportable.predict, sam3_exportable.batch; "
        "bad = [n for n in ('torch', 'sam3', 'onnx') if n in sys.modules]; assert not bad, bad"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_a_predict_run_reads_the_manifest_once(
    onnx_pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    from sam3_exportable.cli import main

    for i in range(3):
        Image.new("RGB", (40 + i, 30), (i * 50, 90, 10)).save(tmp_path / f"{i}.png")
    reads: list[Path] = []
    real = manifest_module._read_embedded_text

    def counted(path: Path):
        reads.append(path)
        return real(path)

    monkeypatch.setattr(manifest_module, "_read_embedded_text", counted)
    args = ["predict", "--model", str(onnx_pair[0]), "--image", str(tmp_path), "--prompt", "a dog"]
    assert main([*args, "--out", str(tmp_path / "out"), "--malloc", "default", "--threads", "2"]) == 0
    assert reads == [onnx_pair[0]]
