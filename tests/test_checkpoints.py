"""Checkpoints: strict by default, partial ones only when asked (and then recorded), legacy
files, and ``hf://`` references through the hub's own cache (tested offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

import sam3_exportable as s3e
from sam3_exportable.artifact import manifest_path
from sam3_exportable.cli import main
from sam3_exportable.errors import CheckpointError
from sam3_exportable.export.checkpoints import resolve_checkpoint


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    return s3e.build_model("tiny", seed=7)


@pytest.fixture(scope="module")
def partial(source, tmp_path_factory) -> Path:
    """An upstream-format checkpoint holding one of the model's tensors."""
    name, tensor = next(iter(source.state_dict().items()))
    path = tmp_path_factory.mktemp("ckpt") / "partial.pt"
    torch.save({"model": {f"detector.{name}": tensor}}, path)
    return path


def test_a_partial_checkpoint_is_refused_by_default(partial) -> None:
    total = len(s3e.build_model("tiny").state_dict())
    with pytest.raises(CheckpointError, match=rf"expected all {total} tensors.*{total - 1} missing keys: "):
        s3e.build_model("tiny", checkpoint=partial)


def test_cli_refuses_a_partial_checkpoint_and_writes_nothing(partial, tmp_path: Path, capsys) -> None:
    out = tmp_path / "p.pt2"
    args = [
        "export",
        "--size",
        "tiny",
        "--checkpoint",
        str(partial),
        "--out",
        str(out),
        "--malloc",
        "default",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing keys" in err and "--allow-missing-keys" in err, err
    assert list(tmp_path.iterdir()) == []
    assert main([*args, "--allow-missing-keys"]) == 0
    printed = capsys.readouterr().out
    assert "tensors missing from the checkpoint keep their random initialisation" in printed
    model = json.loads(manifest_path(out).read_text())["model"]
    total = len(s3e.build_model("tiny").state_dict())
    assert model["missing_keys"] == total - 1 and model["random_weights"] is False
    assert model["checkpoint"] == str(partial)
    # predict says so, as it does for random weights
    image = tmp_path / "i.png"
    Image.new("RGB", (64, 48)).save(image)
    predicted = [*("predict", "--model", str(out), "--image", str(image), "--prompt", "a dog")]
    assert main([*predicted, "--out", str(tmp_path / "pred"), "--malloc", "default"]) == 0
    printed = capsys.readouterr().out
    assert f"NOTE: {total - 1} tensors of this artifact kept their random initialisation" in printed


def test_legacy_non_zip_checkpoints_load(source, tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"model": {f"detector.{k}": v for k, v in source.state_dict().items()}}, path,
               _use_new_zipfile_serialization=False)  # fmt: skip
    assert _same(s3e.build_model("tiny", checkpoint=path), source)


def _hub_cache(root: Path, repo: str, files: dict[str, Path]) -> Path:
    """A hub cache holding ``repo``'s main revision with ``files``, as huggingface_hub lays it out."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    for name, path in files.items():
        (snapshot / name).write_bytes(path.read_bytes())
    return root


_OFFLINE = textwrap.dedent(
    """
    import sys, torch
    import sam3_exportable as s3e
    from sam3_exportable.errors import CheckpointError
    model = s3e.build_model("tiny", checkpoint=sys.argv[1])
    torch.save(model.state_dict(), sys.argv[2])
    try:
        s3e.build_model("tiny", checkpoint="hf://facebook/not-cached")
    except CheckpointError as exc:
        print(exc)
    """
)


def test_hf_references_load_from_the_hub_cache_offline(source, tmp_path: Path) -> None:
    ckpt = tmp_path / "sam3.pt"
    torch.save({"model": {f"detector.{k}": v for k, v in source.state_dict().items()}}, ckpt)
    cache = _hub_cache(tmp_path / "hub", "facebook/sam3", {"sam3.pt": ckpt})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    run = subprocess.run(
        [sys.executable, "-c", _OFFLINE, "hf://facebook/sam3", str(tmp_path / "state.pt")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    state = torch.load(tmp_path / "state.pt")
    assert all(torch.equal(state[k], v) for k, v in source.state_dict().items())
    assert "the hub could not be reached and no cached copy of facebook/not-cached/sam3.pt" in run.stdout
    assert "HF_HUB_OFFLINE=1" in run.stdout


def _http_error(cls, status: int):
    response = httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/x"))
    return cls("hub says no", response=response)


@pytest.mark.parametrize(
    ("error", "message"),
    [
        ("GatedRepoError", r"facebook/sam3 is a gated repository: request access .* HF_TOKEN"),
        ("RepositoryNotFoundError", "repository facebook/sam3 not found on the hub"),
        ("EntryNotFoundError", "facebook/sam3 has no file 'sam3.pt'"),
    ],
)
def test_hub_refusals_are_one_clear_line(monkeypatch: pytest.MonkeyPatch, error: str, message: str) -> None:
    import huggingface_hub
    from huggingface_hub import errors

    cls = getattr(errors, error)
    exc = cls("no such entry") if error == "EntryNotFoundError" else _http_error(cls, 403)

    def download(**kwargs):
        raise exc

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(CheckpointError, match=message):
        resolve_checkpoint("hf://facebook/sam3")


@pytest.mark.parametrize("reference", ["hf://", "hf://facebook", "hf:///sam3"])
def test_malformed_hf_references_are_refused(reference: str) -> None:
    with pytest.raises(CheckpointError, match=r"expected hf://<org>/<repo>\[/<file>\]\[@<revision>\]"):
        resolve_checkpoint(reference)
