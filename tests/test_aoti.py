"""AOTInductor packages: ``export --aoti`` on the tiny model, parity bounds, Predictor."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import eager
from PIL import Image

import sam3_exportable as s3e
from sam3_exportable import cli
from sam3_exportable.artifact import aoti
from sam3_exportable.artifact.aoti import (
    LoadedAotiPackage,
    aoti_path_for,
    load_aoti,
    narrowed_parallelism,
    size_hints,
)
from sam3_exportable.artifact.manifest import SourceRef, read_manifest
from sam3_exportable.export import EXAMPLE_BATCH, EXAMPLE_PROMPTS, example_inputs
from sam3_exportable.predict import Predictor, load_artifact
from sam3_exportable.verify import compare_parity

# Measured on torch 2.14.1 CPU (tiny): 1.0e-7 / 0 / 2.4e-6 / 3.6e-7. Inductor fuses and
# reorders float ops, so the package is close to, not bitwise equal to, the .pt2.
BOUNDS = {"pred_logits": 1e-5, "pred_boxes": 1e-5, "pred_masks": 1e-4, "presence_logit_dec": 1e-5}


@pytest.fixture(scope="module")
def exported_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """The tiny model exported with ``--aoti --verify 1,2`` by the CLI (one compile)."""
    out = tmp_path_factory.mktemp("aoti") / "tiny.pt2"
    status = cli.main(
        [
            "export",
            "--size",
            "tiny",
            "--random-weights",
            "--out",
            str(out),
            "--aoti",
            "--verify",
            "1,2",
            "--malloc",
            "default",
        ]
    )
    return out, aoti_path_for(out), status


def test_aoti_path_naming() -> None:
    assert aoti_path_for("build/sam3.pt2") == Path("build/sam3.aoti.pt2")
    assert aoti_path_for("model") == Path("model.aoti.pt2")


def test_export_aoti_writes_package_and_manifest(exported_pair: tuple[Path, Path, int]) -> None:
    pt2, package, status = exported_pair
    assert status == 0, "export --aoti --verify reported a mismatch"
    manifest = read_manifest(package)
    source = read_manifest(pt2)
    assert json.loads(Path(f"{package}.json").read_text())["format"] == "sam3-exportable"
    assert manifest.kind == "aoti" and source.file is not None
    assert manifest.source == SourceRef("pt2", source.artifact_id, pt2.name, source.file.sha256)
    for key in ("image_size", "context_length", "bpe_vocab_sha256", "patches", "audit", "model"):
        assert getattr(manifest, key) == getattr(source, key), key
    assert manifest.aoti is not None and manifest.aoti.compile_seconds > 0
    assert manifest.aoti.inductor_configs == {
        "freezing": True,
        "cpp.weight_prepack": False,
        "layout_optimization": False,
    }
    assert manifest.audit is not None
    assert manifest.inputs[0].shape[0] == manifest.audit["symbols"]["batch"]
    assert manifest.size_hints == {"batch": EXAMPLE_BATCH, "num_prompts": EXAMPLE_PROMPTS}
    assert manifest.aoti.compile_threads == torch.get_num_threads()


@pytest.mark.parametrize(
    ("hint", "threads", "narrowed"),
    [
        (2, 2, True),
        (3, 2, False),
        (4, 2, True),
        (3, 3, True),
        (3, 4, False),
        (3, 16, False),
        (16, 16, True),
        (31, 16, False),
        (32, 16, True),
        (2, 1, False),
    ],
)
def test_narrowed_parallelism_follows_inductors_rule(hint: int, threads: int, narrowed: bool) -> None:
    assert narrowed_parallelism({"batch": hint}, threads) == (["batch"] if narrowed else [])


def test_default_trace_sizes_keep_size_one_runs_parallel_on_common_thread_counts() -> None:
    hints = {"batch": EXAMPLE_BATCH, "num_prompts": EXAMPLE_PROMPTS}
    assert [t for t in range(1, 129) if narrowed_parallelism(hints, t)] == [3]


class _WindowNorm(torch.nn.Module):
    """The ViT's pattern: un-partition windows, add, layer-norm; a batch-outer loop nest."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        y = x.view(b, 2, 2, 12, 12, 256).permute(0, 1, 3, 2, 4, 5).reshape(b, 24, 24, 256)
        return self.norm(y + 1.0)


@pytest.mark.parametrize("hint", [2, 3])
def test_inductor_parallelizes_past_the_batch_as_narrowed_parallelism_predicts(
    hint: int, tmp_path: Path
) -> None:
    # Guards the rule aoti.narrowed_parallelism models: if inductor changes it, this fails.
    batch = torch.export.Dim("batch", min=1)
    ep = torch.export.export(
        _WindowNorm().eval(), (torch.randn(hint, 576, 256),), dynamic_shapes=({0: batch},)
    )
    assert size_hints(ep) == {"batch": hint}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "w.pt2"))
    finally:
        torch.set_num_threads(threads)
    with zipfile.ZipFile(package) as archive:
        (kernels,) = [archive.read(n).decode() for n in archive.namelist() if n.endswith("kernel.cpp")]
    narrowed = bool(narrowed_parallelism({"batch": hint}, 2))
    assert ("#pragma omp for collapse(" not in kernels) == narrowed
    x = torch.randn(1, 576, 256)
    runner = torch._inductor.aoti_load_package(package)
    torch.testing.assert_close(runner(x), _WindowNorm().eval()(x), rtol=1e-5, atol=1e-5)


class _Stop(Exception):
    pass


def test_compile_aoti_warns_when_the_trace_sizes_narrow_parallelism(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_artifact: Path
) -> None:
    ep = torch.export.export(
        _WindowNorm().eval(),
        (torch.randn(2, 576, 256),),
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
    )
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)

    def compiler(ep, package_path, inductor_configs):
        Path(package_path).write_bytes(b"half a package")
        raise _Stop  # a compile that fails half-way

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compiler)
    # a toy program stands for the pipeline: its manifest is the tiny pipeline's
    pipeline = read_manifest(tiny_artifact)
    monkeypatch.setattr(
        aoti,
        "describe_program",
        lambda ep, kind, provenance=None, **fields: dataclasses.replace(
            pipeline, kind=kind, file=None, **fields
        ),
    )
    with (
        pytest.warns(UserWarning, match=r"traced at \{'batch': 2\}; with 2 threads .* \['batch'\] alone"),
        pytest.raises(_Stop),
    ):
        aoti.compile_aoti(ep, tmp_path / "w.aoti.pt2")
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left behind
    assert size_hints(ep) == {"batch": 2}


def test_aoti_parity_at_unseen_shapes_within_bounds(
    exported_pair: tuple[Path, Path, int], tiny_wrapper: s3e.FullSam3PipelineWrapper
) -> None:
    _, package, _ = exported_pair
    module = load_aoti(package).module()
    for b, p in [(1, 1), (3, 2), (1, 5)]:
        inputs = example_inputs(tiny_wrapper, b, p, seed=7)
        with torch.no_grad():
            expected = eager(tiny_wrapper, *inputs)
        got = module(*inputs)
        parity = compare_parity(expected, got)
        for name, bound in BOUNDS.items():
            assert parity["max_abs_diff"][name] <= bound, (b, p, name, parity["max_abs_diff"][name])
        for label in ("kept_at_0.5", "kept_at_top10"):
            assert parity[label]["identical"], (b, p, label)
        assert parity["kept_at_top10"]["kept"] == 10 * b * p


def test_aoti_manifest_and_hash_are_checked(exported_pair: tuple[Path, Path, int], tmp_path: Path) -> None:
    pt2, package, _ = exported_pair
    with pytest.raises(s3e.ArtifactError, match="expected a 'aoti' artifact, got a 'pt2' artifact"):
        load_aoti(pt2)  # a .pt2 program, not a package
    copy = tmp_path / "copy.aoti.pt2"
    copy.write_bytes(package.read_bytes() + b"\0")
    Path(f"{copy}.json").write_text(Path(f"{package}.json").read_text())
    with pytest.raises(s3e.ArtifactError, match=r"size mismatch: the manifest expects \d+ bytes"):
        load_aoti(copy)
    changed = bytearray(package.read_bytes())
    changed[len(changed) // 2] ^= 0xFF  # same size, one byte of the compiled code changed
    copy.write_bytes(bytes(changed))
    with pytest.raises(s3e.ArtifactError, match="sha256 mismatch"):
        load_aoti(copy)


def test_export_aoti_refuses_to_overwrite_before_building(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "new.pt2"
    Path(f"{aoti_path_for(out)}").write_bytes(b"keep me")
    status = cli.main(
        ["export", "--size", "tiny", "--random-weights", "--out", str(out), "--aoti", "--malloc", "default"]
    )
    assert status == 2
    assert "new.aoti.pt2: exists; pass --force" in capsys.readouterr().err
    assert aoti_path_for(out).read_bytes() == b"keep me" and not out.exists()


def test_predictor_runs_the_package_like_the_program(exported_pair: tuple[Path, Path, int]) -> None:
    pt2, package, _ = exported_pair
    loaded = load_artifact(package)
    assert isinstance(loaded, LoadedAotiPackage)
    assert isinstance(load_artifact(pt2), s3e.artifact.LoadedPipeline)
    by_package, by_program = Predictor(package), Predictor(pt2)
    assert by_package.program is None and by_package.image_size == by_program.image_size
    images = [Image.new("RGB", (300, 200), (200, 30, 30)), Image.new("RGB", (120, 260), (20, 90, 220))]
    phrases = ["a red square", "a blue thing"]
    ours = by_package.run(images, phrases)
    reference = by_program.run(images, phrases)
    parity = compare_parity(reference, ours)
    assert parity["kept_at_top10"]["identical"] and parity["kept_at_top10"]["kept"] == 40
    results = by_package.predict(images, phrases, threshold=0.0)
    assert [len(row) for row in results] == [2, 2]
    assert results[1][0].masks.shape[-2:] == (260, 120)


def test_load_artifact_names_both_accepted_formats(tmp_path: Path) -> None:
    path = tmp_path / "x.pt2"
    path.write_bytes(b"not a program")
    Path(f"{path}.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(s3e.ArtifactError, match="carries no manifest inside"):
        Predictor(path)
