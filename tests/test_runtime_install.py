"""The runtime install: ``pip install sam3-exportable`` with no extra runs ONNX artifacts
(load, predict over folders, the batch API, verify) in a fresh venv where torch and sam3 are
not importable, with the full install's results; what needs an extra says which one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sam3_exportable.cli import main

REPO = Path(__file__).resolve().parents[1]
#: What the package's build needs from the checkout (nothing generated, no tests).
SOURCES = ("pyproject.toml", "README.md", "sam3_exportable")


def _run(args: list[str], timeout: int = 600, **kwargs) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (no system site-packages) with ``pip install <this package>`` only."""
    root = tmp_path_factory.mktemp("runtime")
    source = root / "src"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    env_dir = root / "venv"
    made = _run([sys.executable, "-m", "venv", str(env_dir)])
    assert made.returncode == 0, made.stderr[-2000:]
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    installed = _run([*pip, str(source)], timeout=1200)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return env_dir


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("runtime-images")
    rng = np.random.default_rng(11)
    for i, (h, w) in enumerate([(90, 130), (200, 150), (64, 64)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_torch_and_sam3_are_not_importable(venv: Path) -> None:
    for module in ("torch", "torchvision", "sam3", "open_clip", "onnx"):
        probe = _run([str(venv / "bin" / "python"), "-c", f"import {module}"])
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, module


PHRASES = ("a dog", "a cat")


def _predict_args(model: Path, images: Path, out: Path, phrases: tuple[str, ...] = PHRASES) -> list[str]:
    prompts = [a for phrase in phrases for a in ("--prompt", phrase)]
    return [
        "predict", "--model", str(model), "--image", str(images), *prompts,
        "--out", str(out), "--threshold", "0.02", "--threads", "2", "--malloc", "default",
    ]  # fmt: skip


def _assert_alike(runtime_out: Path, full_out: Path, count: int) -> int:
    """The runtime install's results.jsonl against the full install's, line by line; returns
    the instances kept."""
    ours = (runtime_out / "results.jsonl").read_text().splitlines()
    full = (full_out / "results.jsonl").read_text().splitlines()
    assert len(ours) == len(full) == count
    kept = 0
    for a, b in zip(ours, full, strict=True):
        # the same numpy path and threads; the venv may resolve another numpy or onnxruntime
        # release than the full install, so the README's bounds are asserted (bitwise equal
        # when both resolve the same releases, as measured)
        a, b = json.loads(a), json.loads(b)
        assert {k: v for k, v in a.items() if k != "phrases"} == {
            k: v for k, v in b.items() if k != "phrases"
        }
        for pa, pb in zip(a["phrases"], b["phrases"], strict=True):
            assert len(pa["instances"]) == len(pb["instances"]) and pa["phrase"] == pb["phrase"]
            assert pa.get("prompt_boxes") == pb.get("prompt_boxes")
            for ia, ib in zip(pa["instances"], pb["instances"], strict=True):
                assert abs(ia["score"] - ib["score"]) <= 1e-6
                assert max(abs(x - y) for x, y in zip(ia["box_xyxy"], ib["box_xyxy"], strict=True)) <= 1e-3
                mask_a, mask_b = mask_utils.decode(ia["rle"]), mask_utils.decode(ib["rle"])
                assert int((mask_a != mask_b).sum()) <= max(1, mask_a.size // 1000)
        kept += sum(len(p["instances"]) for p in a["phrases"])
    return kept


def test_predict_over_a_folder_gives_the_full_installs_results(
    venv: Path, onnx_pair, images: Path, tmp_path: Path
) -> None:
    graph = onnx_pair[0]
    runtime = _run([str(venv / "bin" / "sam3-exportable"), *_predict_args(graph, images, tmp_path / "rt")])
    assert runtime.returncode == 0, runtime.stderr[-3000:]
    assert main(_predict_args(graph, images, tmp_path / "full")) == 0
    kept = _assert_alike(tmp_path / "rt", tmp_path / "full", 3)
    assert kept > 0
    coco = json.loads((tmp_path / "rt" / "coco.json").read_text())
    assert len(coco["images"]) == 3 and len(coco["annotations"]) == kept


def test_exemplar_boxes_run_without_torch(venv: Path, box_onnx_pair, images: Path, tmp_path: Path) -> None:
    """A box-capable ONNX artifact with --box / --negative-box, and boxes alone, in the runtime
    install: the full install's results within the same bounds, prompt boxes recorded."""
    for name, phrases in (("text", PHRASES), ("alone", ())):  # alone: no --prompt
        args = _predict_args(box_onnx_pair[0], images, tmp_path / f"rt-{name}", phrases)
        args += ["--box", "5,5,40,40", "--negative-box", "30,10,60,50"]
        runtime = _run([str(venv / "bin" / "sam3-exportable"), *args])
        assert runtime.returncode == 0, runtime.stderr[-3000:]
        full = [*args]
        full[full.index("--out") + 1] = str(tmp_path / f"full-{name}")
        assert main(full) == 0
        assert _assert_alike(tmp_path / f"rt-{name}", tmp_path / f"full-{name}", 3) > 0
        line = json.loads((tmp_path / f"rt-{name}" / "results.jsonl").read_text().splitlines()[0])
        recorded = [p["phrase"] for p in line["phrases"]]
        assert recorded == (list(PHRASES) if name == "text" else ["visual"])
        assert all([b["positive"] for b in p["prompt_boxes"]] == [True, False] for p in line["phrases"])


_PYTHON_API = """
import sys
import sam3_exportable as s3e
artifact = s3e.load_artifact(sys.argv[1])
assert artifact.kind == "onnx" and artifact.array_library == "numpy", artifact
results = s3e.Predictor(artifact).predict([sys.argv[2]], ["a dog"], threshold=0.0)
assert results[0][0].masks.shape[1:] == (1, 90, 130), results[0][0].masks.shape
summary = s3e.segment_images([sys.argv[3]], ["a dog"], artifact=sys.argv[1], out=sys.argv[4], progress=False)
assert summary.segmented == 3 and summary.failed == 0, summary
for name in ("torch", "torchvision", "sam3", "onnx"):
    assert name not in sys.modules, name
print("ok")
"""


def test_the_python_api_runs_an_onnx_artifact(venv: Path, onnx_pair, images: Path, tmp_path: Path) -> None:
    args = [str(onnx_pair[0]), str(images / "0.png"), str(images), str(tmp_path / "api")]
    run = _run([str(venv / "bin" / "python"), "-c", _PYTHON_API, *args])
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_verify_runs_two_onnx_artifacts(venv: Path, onnx_pair, images: Path) -> None:
    graph = str(onnx_pair[0])
    args = ["verify", "--reference", graph, "--candidate", graph, "--image", str(images / "1.png")]
    run = _run([str(venv / "bin" / "sam3-exportable"), *args, "--prompt", "a dog", "--threads", "2"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "keeps the same instances as the reference at 0.5: True" in run.stdout


def _one_line(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    err = run.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_what_needs_an_extra_says_which_one(venv: Path, tiny_artifact: Path, images: Path, tmp_path) -> None:
    cli = str(venv / "bin" / "sam3-exportable")
    export = _one_line(
        _run([cli, "export", "--size", "tiny", "--random-weights", "--out", str(tmp_path / "t.pt2")])
    )
    assert "export: expected torch to be installed" in export and "sam3-exportable[export]" in export
    assert not (tmp_path / "t.pt2").exists()
    assert "sam3-exportable[export]" in _one_line(_run([cli, "doctor"]))
    predict = _one_line(_run([cli, *_predict_args(tiny_artifact, images, tmp_path / "p")]))
    assert "pt2 artifacts: expected torch" in predict and "sam3-exportable[torch]" in predict
    assert not (tmp_path / "p").exists()


def test_the_ray_engine_runs_with_the_ray_extra_and_no_torch(
    venv: Path, onnx_pair, images: Path, tmp_path: Path
) -> None:
    # last in this file: it adds [ray] to the shared venv
    source = venv.parent / "src"
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    installed = _run([*pip, f"{source}[ray]"], timeout=1200)
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert _run([str(venv / "bin" / "python"), "-c", "import torch"]).returncode != 0
    cli = str(venv / "bin" / "sam3-exportable")
    local = _predict_args(onnx_pair[0], images, tmp_path / "local")
    on_ray = _predict_args(onnx_pair[0], images, tmp_path / "ray")
    for args, extra in ((local, []), (on_ray, ["--engine", "ray", "--workers", "1"])):
        args[args.index("--threads") + 1] = "1"
        run = _run([cli, *args, *extra], timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "ray" / "results.jsonl").read_bytes() == (
        tmp_path / "local" / "results.jsonl"
    ).read_bytes()
