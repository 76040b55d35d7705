"""Shared fixtures: one tiny model and one exported tiny pipeline per test session."""

from __future__ import annotations

import warnings

import pytest
import torch

import sam3_exportable as s3e
from sam3_exportable.export import example_inputs, export_full_pipeline

warnings.filterwarnings("ignore", message=r".*CUDA is not available.*")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model() -> torch.nn.Module:
    return s3e.build_model("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_wrapper(tiny_model: torch.nn.Module) -> s3e.FullSam3PipelineWrapper:
    return s3e.FullSam3PipelineWrapper(tiny_model).eval()


@pytest.fixture(scope="session")
def tiny_ep(tiny_model: torch.nn.Module) -> torch.export.ExportedProgram:
    return export_full_pipeline(tiny_model)


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


__all__ = ["assert_bitwise", "eager", "example_inputs"]
