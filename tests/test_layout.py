"""The architecture: import contracts, a sam3-free loading side, stable public names."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import sam3_exportable as s3e
from sam3_exportable._moved import MOVED

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold() -> None:
    # layers (cli -> bench -> batch -> predict -> export -> verify -> artifact -> patching ->
    # base), a loading side that never imports sam3, a runtime that imports neither torch nor
    # sam3, batch jobs that never import the export side, no import cycle at any depth
    tool = Path(sys.executable).with_name("lint-imports")  # this Python's, not whatever PATH has
    run = subprocess.run([str(tool), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "5 kept, 0 broken" in run.stdout


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_is_clean(command: list[str]) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "sam3_exportable", "tests", "scripts"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_the_loading_side_runs_without_importing_sam3() -> None:
    script = textwrap.dedent(
        """
        import sys
        import sam3_exportable
        from sam3_exportable import Predictor, load_artifact, compare_parity
        import sam3_exportable.artifact, sam3_exportable.predict, sam3_exportable.batch
        import sam3_exportable.artifact.aoti, sam3_exportable.artifact.fast_load
        import sam3_exportable.artifact.onnx
        from sam3_exportable.tokenizer import Tokenizer
        Tokenizer(32)(["a dog"])
        loaded = [m for m in sys.modules if m == "sam3" or m.startswith("sam3.")]
        assert not loaded, loaded
        print("ok")
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()))
def test_old_module_paths_still_import_and_name_the_new_place(old: str, new: str) -> None:
    sys.modules.pop(f"sam3_exportable.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(f"sam3_exportable.{old}")
    assert module is importlib.import_module(f"sam3_exportable.{new}")
    assert any(f"sam3_exportable.{new}" in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_public_names_resolve_and_are_listed() -> None:
    for name in s3e.__all__:
        assert getattr(s3e, name) is not None, name
    assert set(dir(s3e)) >= set(s3e.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        s3e.nope  # noqa: B018
    # the 0.1 names of the loaded artifact classes still work
    from sam3_exportable.artifact import LoadedPipeline, Pt2Artifact
    from sam3_exportable.artifact.aoti import AotiArtifact, LoadedAotiPackage

    assert LoadedPipeline is Pt2Artifact and LoadedAotiPackage is AotiArtifact
