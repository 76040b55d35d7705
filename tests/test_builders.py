"""build_model: deterministic random weights, no NaN, upstream checkpoints."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import torch

import sam3_exportable as s3e
from sam3_exportable.errors import CheckpointError
from sam3_exportable.tokenizer import BPE_VOCAB_SHA256, bpe_vocab_path


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_model_size_and_mode(tiny_model) -> None:
    n = sum(p.numel() for p in tiny_model.parameters())
    assert 3_000_000 < n < 6_000_000
    assert not tiny_model.training
    assert all(p.device.type == "cpu" for p in tiny_model.parameters())


def test_same_seed_is_bitwise_equal_and_finite(tiny_model) -> None:
    again = s3e.build_model("tiny", seed=0)
    assert _same(tiny_model, again)
    assert all(torch.isfinite(t).all() for t in again.state_dict().values() if t.is_floating_point())
    assert not _same(tiny_model, s3e.build_model("tiny", seed=1))
    text = again.backbone.language_backbone.encoder
    assert text.positional_embedding.abs().sum() > 0 and text.text_projection.abs().sum() > 0


def test_build_does_not_disturb_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    s3e.build_model("tiny", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_bpe_vocab_is_upstreams() -> None:
    path = bpe_vocab_path()
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == BPE_VOCAB_SHA256


def test_unknown_size() -> None:
    with pytest.raises(ValueError, match="expected 'full' or 'tiny', got 'huge'"):
        s3e.build_model("huge")  # type: ignore[arg-type]


def test_upstream_checkpoint_format_loads(tiny_model, tmp_path: Path) -> None:
    source = s3e.build_model("tiny", seed=7)
    ckpt = {f"detector.{k}": v for k, v in source.state_dict().items()}
    ckpt["tracker.some.weight"] = torch.zeros(2)
    torch.save({"model": ckpt}, tmp_path / "sam3.pt")
    loaded = s3e.build_model("tiny", checkpoint=tmp_path / "sam3.pt", seed=0)
    assert _same(loaded, source) and not _same(loaded, tiny_model)
    report = s3e.load_checkpoint(s3e.build_model("tiny"), tmp_path / "sam3.pt")
    assert report.missing == () and report.unexpected == () and report.ignored == 1


def test_plain_finetuned_state_dict_loads_and_reports_keys(tmp_path: Path, caplog) -> None:
    state = s3e.build_model("tiny", seed=3).state_dict()
    state.pop("dot_prod_scoring.prompt_proj.weight")
    state["extra.head.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "ft.pt")
    with caplog.at_level(logging.WARNING):
        report = s3e.load_checkpoint(s3e.build_model("tiny"), tmp_path / "ft.pt")
    assert report.missing == ("dot_prod_scoring.prompt_proj.weight",)
    assert report.unexpected == ("extra.head.weight",)
    assert "1 missing keys: dot_prod_scoring.prompt_proj.weight" in caplog.text
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: extra\.head\.weight"):
        s3e.load_checkpoint(s3e.build_model("tiny"), tmp_path / "ft.pt", strict=True)


def test_bad_checkpoints_get_clear_errors(tmp_path: Path) -> None:
    model = s3e.build_model("tiny")
    with pytest.raises(CheckpointError, match="expected an existing file"):
        s3e.load_checkpoint(model, tmp_path / "nope.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"torch\.load failed"):
        s3e.load_checkpoint(model, tmp_path / "text.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"expected a mapping .* got list"):
        s3e.load_checkpoint(model, tmp_path / "list.pt")
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="none of its 1 keys is a parameter"):
        s3e.load_checkpoint(model, tmp_path / "other.pt")
    bad_shape = {"transformer.decoder.query_embed.weight": torch.zeros(3, 3)}
    torch.save(bad_shape, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match="does not fit the model"):
        s3e.load_checkpoint(model, tmp_path / "shape.pt")
