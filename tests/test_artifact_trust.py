"""Loading an artifact runs no code from it; integrity travels inside it."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

from sam3_exportable.artifact import load_artifact, manifest_path, read_manifest
from sam3_exportable.artifact.files import sha256_file
from sam3_exportable.cli import main
from sam3_exportable.errors import ArtifactError


class _Payload:
    """Unpickling it creates ``marker``: proof that the loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rewrite(source: Path, target: Path, change) -> None:
    """Copy the archive ``source`` to ``target`` with ``change(name, data) -> data`` applied
    to each entry, and a manifest copy whose file hash is updated (as an attacker would)."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info, change(info.filename, src.read(info.filename)))
    doc = json.loads(manifest_path(source).read_text())
    doc["file"].update(sha256=sha256_file(target), size_bytes=target.stat().st_size)
    manifest_path(target).write_text(json.dumps(doc))


def _pickled(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    return buffer.getvalue()


def test_a_constant_marked_use_pickle_is_refused_before_it_runs(tiny_artifact: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    crafted = tmp_path / "crafted.pt2"

    def change(name: str, data: bytes) -> bytes:
        if name.endswith("data/constants/model_constants_config.json"):
            doc = json.loads(data)
            first = next(iter(doc["config"].values()))
            first["use_pickle"] = True
            self_path = first["path_name"]
            change.target = self_path  # type: ignore[attr-defined]
            return json.dumps(doc).encode()
        if name.endswith(f"data/constants/{getattr(change, 'target', 'tensor_0')}"):
            return _pickled(marker)
        return data

    _rewrite(tiny_artifact, crafted, change)
    assert read_manifest(crafted).file is not None  # the copy "belongs": its hash was updated
    with pytest.raises(ArtifactError, match=r"pickled object .* loading would run code from the file"):
        load_artifact(crafted)
    assert not marker.exists()
    images = tmp_path / "i.png"
    from PIL import Image

    Image.new("RGB", (40, 30)).save(images)
    args = ["predict", "--model", str(crafted), "--image", str(images), "--prompt", "a dog"]
    assert main([*args, "--out", str(tmp_path / "out"), "--malloc", "default"]) == 2
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_sample_inputs_that_need_a_full_unpickler_are_refused(tiny_artifact: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    crafted = tmp_path / "crafted.pt2"
    _rewrite(
        tiny_artifact,
        crafted,
        lambda name, data: _pickled(marker) if name.endswith("data/sample_inputs/model.pt") else data,
    )
    with pytest.raises(ArtifactError, match="sample inputs of plain tensors"):
        load_artifact(crafted)
    assert not marker.exists()


def test_the_programs_we_export_pass_the_check(tiny_artifact: Path) -> None:
    from sam3_exportable.artifact.pt2 import check_no_pickles

    check_no_pickles(tiny_artifact)
    assert load_artifact(tiny_artifact).kind == "pt2"


def test_a_copy_that_disagrees_with_the_file_is_refused_naming_the_field(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "t.pt2"
    copy.write_bytes(tiny_artifact.read_bytes())
    for field, value in (("image_size", 448), ("model", {"size": "full", "random_weights": False})):
        doc = json.loads(manifest_path(tiny_artifact).read_text())
        doc[field] = value
        manifest_path(copy).write_text(json.dumps(doc))
        with pytest.raises(ArtifactError, match=f"expected the same '{field}' as the manifest inside"):
            load_artifact(copy)


def test_a_truncated_pt2_is_called_truncated(tiny_artifact: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(tiny_artifact.read_bytes()[: tiny_artifact.stat().st_size // 2])
    manifest_path(cut).write_text(manifest_path(tiny_artifact).read_text())
    with pytest.raises(ArtifactError, match=r"size mismatch: .* the file is truncated or damaged"):
        load_artifact(cut)
