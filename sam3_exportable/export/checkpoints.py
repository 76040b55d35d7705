"""Upstream-format SAM3 checkpoints: local files and ``hf://`` references, loaded into a model.

A checkpoint is upstream's format (a ``model`` dict whose image-model keys start with
``detector.``; ``tracker.`` and other keys are ignored) or a plain ``Sam3Image`` state dict
(``model.state_dict()``, e.g. after fine-tuning), saved with ``torch.save`` in the zip
format (memory-mapped while loading) or the legacy format (read into memory).

``hf://<repo>[/<file>][@<revision>]`` names a file on the Hugging Face hub, fetched with
``huggingface_hub.hf_hub_download`` (its cache, its token handling for gated repos, its
offline mode ``HF_HUB_OFFLINE=1``) the way upstream's ``download_ckpt_from_hf`` does;
``hf://facebook/sam3`` is upstream's checkpoint ``sam3.pt``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError

__all__ = ["HF_PREFIX", "CheckpointReport", "load_checkpoint", "resolve_checkpoint"]

log = logging.getLogger(__name__)

HF_PREFIX = "hf://"
#: What ``hf://<repo>`` fetches without a file name (upstream's checkpoint file).
HF_DEFAULT_FILE = "sam3.pt"


@dataclasses.dataclass(frozen=True)
class CheckpointReport:
    """What loading a checkpoint matched."""

    path: str
    loaded: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    ignored: int  # keys for other upstream models in the same file (e.g. ``tracker.``)

    def summary(self) -> str:
        def head(keys: tuple[str, ...]) -> str:
            shown = ", ".join(keys[:5])
            return shown + (f", ... ({len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = [f"loaded {self.loaded} tensors from {self.path}"]
        if self.missing:
            parts.append(f"{len(self.missing)} missing keys: {head(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected keys: {head(self.unexpected)}")
        if self.ignored:
            parts.append(f"{self.ignored} keys of other models ignored")
        return "; ".join(parts)


def _parse_hf(reference: str) -> tuple[str, str, str | None]:
    """``hf://org/repo[/file][@rev]`` -> (repo_id, filename, revision)."""
    body = reference[len(HF_PREFIX) :]
    body, _, revision = body.partition("@")
    parts = [p for p in body.split("/") if p]
    if len(parts) < 2:
        raise CheckpointError(
            f"checkpoint {reference!r}: expected hf://<org>/<repo>[/<file>][@<revision>], "
            f"e.g. hf://facebook/sam3"
        )
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or HF_DEFAULT_FILE
    return repo_id, filename, revision or None


def resolve_checkpoint(checkpoint: str | os.PathLike[str]) -> Path:
    """A local path for ``checkpoint``: the file itself, or the hub cache's copy of an
    ``hf://`` reference (downloaded if needed and allowed).

    Raises :class:`CheckpointError` for a missing file, a malformed reference, a gated or
    unknown repository, a missing file in it, or a hub that cannot be reached (or offline
    mode without a cached copy).
    """
    text = os.fspath(checkpoint)
    if not text.startswith(HF_PREFIX):
        path = Path(text)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {text!r}: expected an existing file, found none")
        return path
    repo_id, filename, revision = _parse_hf(text)
    try:
        import huggingface_hub
        from huggingface_hub import errors as hf_errors
    except ImportError as exc:  # pragma: no cover - a dependency of this package and of sam3
        raise CheckpointError(f"checkpoint {text!r}: huggingface_hub is not installed ({exc})") from exc
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename, revision=revision))
    except hf_errors.GatedRepoError:
        raise CheckpointError(
            f"checkpoint {text!r}: {repo_id} is a gated repository: request access on "
            f"https://huggingface.co/{repo_id}, then log in (`hf auth login`) or set HF_TOKEN"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise CheckpointError(
            f"checkpoint {text!r}: repository {repo_id} not found on the hub (or it is private "
            "and no token with access is set)"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise CheckpointError(f"checkpoint {text!r}: revision {revision!r} not found in {repo_id}") from None
    except hf_errors.LocalEntryNotFoundError:  # before EntryNotFoundError, its base class
        raise CheckpointError(
            f"checkpoint {text!r}: the hub could not be reached and no cached copy of "
            f"{repo_id}/{filename} exists (offline mode: HF_HUB_OFFLINE="
            f"{os.environ.get('HF_HUB_OFFLINE', 'unset')}; cache: {huggingface_hub.constants.HF_HUB_CACHE})"
        ) from None
    except hf_errors.EntryNotFoundError:
        raise CheckpointError(f"checkpoint {text!r}: {repo_id} has no file {filename!r}") from None
    except (hf_errors.HfHubHTTPError, OSError) as exc:
        raise CheckpointError(f"checkpoint {text!r}: download failed: {exc}") from None


def _read_checkpoint(path: Path, shown: str) -> Mapping[str, Any]:
    # zip files (torch.save's default format) are memory-mapped; legacy files cannot be
    try:
        mmap = zipfile.is_zipfile(path)
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises many types for foreign files
        raise CheckpointError(
            f"checkpoint {shown!r}: expected a torch.save file holding a SAM3 state dict, "
            f"but torch.load failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        ) from exc
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("model"), Mapping):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt.items()
    ):
        raise CheckpointError(
            f"checkpoint {shown!r}: expected a mapping of parameter names to tensors "
            f"(optionally under 'model'), got {type(ckpt).__name__}"
        )
    return ckpt


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike[str],
    *,
    strict: bool = False,
    allow_missing_keys: bool = True,
) -> CheckpointReport:
    """Load an upstream-format checkpoint (a path or ``hf://`` reference) into ``model``.

    Raises :class:`CheckpointError` when the file is not a checkpoint, when no key fits the
    model, when a tensor's shape does not fit, when keys are missing and
    ``allow_missing_keys`` is False (the message gives the count and the first names), or
    (``strict=True``) when any key is missing or unexpected. Otherwise missing and
    unexpected keys are logged and returned in the report. :func:`..builders.build_model`
    refuses missing keys by default; this lower-level function reports them by default.
    """
    shown = os.fspath(checkpoint)
    path = resolve_checkpoint(checkpoint)
    ckpt = _read_checkpoint(path, shown)
    if any(k.startswith("detector.") for k in ckpt):
        state = {k[len("detector.") :]: v for k, v in ckpt.items() if k.startswith("detector.")}
        ignored = len(ckpt) - len(state)
    else:
        state, ignored = dict(ckpt), 0
    model_keys = set(model.state_dict())
    if not model_keys & set(state):
        raise CheckpointError(
            f"checkpoint {shown!r}: none of its {len(state)} keys is a parameter of the "
            f"SAM3 image model (expected keys like {sorted(model_keys)[:2]}, "
            f"got {sorted(state)[:2]})"
        )
    report = CheckpointReport(
        path=shown,
        loaded=len(model_keys & set(state)),
        missing=tuple(sorted(model_keys - set(state))),
        unexpected=tuple(sorted(set(state) - model_keys)),
        ignored=ignored,
    )
    if report.missing and (strict or not allow_missing_keys):
        raise CheckpointError(
            f"checkpoint {shown!r}: expected all {len(model_keys)} tensors of the model, "
            f"{report.summary()}; pass --allow-missing-keys (allow_missing_keys=True) to "
            "export with those left at their random initialisation"
        )
    if report.unexpected and strict:
        raise CheckpointError(f"checkpoint {shown!r}: {report.summary()}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {shown!r} does not fit the model: {exc}") from exc
    if report.missing or report.unexpected:
        log.warning("sam3_exportable: %s", report.summary())
    else:
        log.info("sam3_exportable: %s", report.summary())
    return report
