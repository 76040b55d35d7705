"""Shared fixtures: one tiny model and one exported tiny pipeline per test session."""

from __future__ import annotations

import contextlib
import io
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import sam3_exportable as s3e
from sam3_exportable.export import example_inputs, export_full_pipeline

warnings.filterwarnings("ignore", message=r".*CUDA is not available.*")
torch.set_num_threads(2)
# A shell without job control starts background jobs (`pytest ... &` in a script) with SIGINT
# ignored; Python keeps it ignored and so would every child a test starts, and the tests that
# interrupt a child would wait for one that never hears it. Children get SIGINT at its
# default, as an interactive user's commands have it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _malloc_policy_untouched():
    """The malloc policy is process-wide: tests that run commands in this process pass
    ``--malloc default``, so that no test changes malloc for the tests after it."""
    from sam3_exportable.allocator import current_malloc_policy

    yield
    record = current_malloc_policy()
    assert not any(record.get("settings", {}).values()), f"a test changed this process's malloc: {record}"


@pytest.fixture(scope="session")
def tiny_model() -> torch.nn.Module:
    return s3e.build_model("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_wrapper(tiny_model: torch.nn.Module) -> s3e.FullSam3PipelineWrapper:
    return s3e.FullSam3PipelineWrapper(tiny_model).eval()


@pytest.fixture(scope="session")
def tiny_ep(tiny_model: torch.nn.Module) -> torch.export.ExportedProgram:
    return export_full_pipeline(tiny_model)


@pytest.fixture(scope="session")
def box_ep(tiny_model: torch.nn.Module) -> torch.export.ExportedProgram:
    """The tiny box-capable program (exemplar boxes as inputs); shared, never modify it."""
    return export_full_pipeline(tiny_model, boxes=True)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_ep: torch.export.ExportedProgram, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny program saved as a ``.pt2`` (with its manifest); shared, so never modify it."""
    from sam3_exportable.artifact import save_pipeline

    path = tmp_path_factory.mktemp("artifact") / "tiny.pt2"
    save_pipeline(tiny_ep, path)
    return path


@pytest.fixture(scope="session")
def onnx_record(tiny_model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory):
    """The tiny graph and its int8 quantization, written by the export recipe (one trace);
    shared, so never modify them."""
    from sam3_exportable.export import build_artifact

    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    return build_artifact(out, model=tiny_model, formats=["onnx"], quantize="int8")


@pytest.fixture(scope="session")
def onnx_pair(onnx_record) -> tuple[Path, Path]:
    """(the tiny ONNX graph, its int8 quantization)."""
    return onnx_record.paths["onnx"], onnx_record.paths["onnx-int8"]


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """``sam3-exportable ARGS`` in this process: (exit status, stdout, stderr)."""
    from sam3_exportable.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(args)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def box_onnx_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the tiny box-capable ONNX graph, its int8 quantization), written as a user writes them:
    ``export --boxes --format onnx --quantize int8 --verify 1,2,2``; shared, never modify."""
    out = tmp_path_factory.mktemp("boxes-onnx") / "tiny-boxes.onnx"
    args = ["export", "--size", "tiny", "--random-weights", "--malloc", "default", "--boxes"]
    args += ["--format", "onnx", "--quantize", "int8", "--out", str(out), "--verify", "1,2,2"]
    status, _, err = run_cli([*args, "--threads", str(torch.get_num_threads())])
    assert status == 0, err
    return out, out.with_name("tiny-boxes.int8.onnx")


@pytest.fixture(scope="session")
def tiny_bf16_ep(tiny_model: torch.nn.Module) -> torch.export.ExportedProgram:
    """The tiny pipeline exported under bf16 autocast (fp32 in and out)."""
    return export_full_pipeline(tiny_model, autocast_dtype=torch.bfloat16)


def eager(wrapper: torch.nn.Module, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run the eager wrapper the way the library does: inside exportable_sam3()."""
    with s3e.exportable_sam3():
        return wrapper(*inputs)


def assert_bitwise(expected, got) -> None:
    assert len(expected) == len(got)
    for name, a, b in zip(s3e.OUTPUT_NAMES, expected, got, strict=True):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        assert torch.equal(a, b), f"{name}: max |diff| {float((a - b).abs().max())}"


_FRESH_PROCESS = textwrap.dedent(
    """
    import sys, torch, torchvision
    torch.set_num_threads(int(sys.argv[4]))  # the parent's count: the same reduction order
    ep = torch.export.load(sys.argv[1])
    outs = ep.module()(*torch.load(sys.argv[2]))
    torch.save(tuple(outs), sys.argv[3])
    assert "sam3" not in sys.modules and "sam3_exportable" not in sys.modules, "imported sam3"
    """
)


def run_in_fresh_process(artifact: Path, inputs, tmp_path: Path, timeout: int = 900):
    """Load ``artifact`` in a new Python that imports only torch and torchvision, run it
    on ``inputs`` and return its outputs."""
    torch.save(tuple(inputs), tmp_path / "in.pt")
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            _FRESH_PROCESS,
            str(artifact),
            str(tmp_path / "in.pt"),
            str(tmp_path / "out.pt"),
            str(torch.get_num_threads()),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


#: Bounds of the graph against eager on the tiny model (measured on torch 2.14.1, onnxruntime
#: 1.32, CPU: 3e-7 / 1.2e-7 / 3.3e-6 / 9.5e-7 at (1,1)-(4,5)): onnxruntime's kernels round
#: differently, so the graph is close to eager, not bitwise equal.
TINY_ONNX_BOUNDS = {"pred_logits": 1e-5, "pred_boxes": 1e-5, "pred_masks": 1e-4, "presence_logit_dec": 1e-5}

_ONNXRUNTIME_ONLY = textwrap.dedent(
    """
    import sys
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    for i, name in enumerate(sys.argv[2:-1]):
        outputs = session.run(None, dict(np.load(name)))  # every input by its name
        np.savez(f"{sys.argv[-1]}-{i}.npz", *outputs)
        print([o.shape for o in outputs], flush=True)
    assert "torch" not in sys.modules and "sam3_exportable" not in sys.modules, "imported torch"
    """
)


def run_in_onnxruntime_only(graph: Path, shapes_inputs, tmp_path: Path, timeout: int = 900):
    """Run the ``.onnx`` at ``graph`` in a new Python that imports only onnxruntime and numpy,
    on each ``(images, token_ids[, boxes, box_labels, box_valid])`` of ``shapes_inputs``;
    return each call's four outputs."""
    from sam3_exportable.contract import input_names

    names = []
    for i, inputs in enumerate(shapes_inputs):
        names.append(str(tmp_path / f"ort-in-{i}.npz"))
        feeds = dict(zip(input_names(len(inputs) == 5), (t.numpy() for t in inputs), strict=True))
        np.savez(names[-1], **feeds)
    out = tmp_path / "ort-out"
    run = subprocess.run(
        [sys.executable, "-c", _ONNXRUNTIME_ONLY, str(graph), *names, str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return [[torch.from_numpy(a) for a in np.load(f"{out}-{i}.npz").values()] for i in range(len(names))]


__all__ = [
    "TINY_ONNX_BOUNDS",
    "assert_bitwise",
    "eager",
    "example_inputs",
    "run_cli",
    "run_in_fresh_process",
    "run_in_onnxruntime_only",
]
