"""Exceptions raised by sam3_exportable; each names the input, what was expected and what came."""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "CheckpointError",
    "DynamicShapeAuditError",
    "InputSpecError",
    "UpstreamMismatchError",
]


class UpstreamMismatchError(RuntimeError):
    """A patch's upstream target is missing or its source differs from the fingerprint."""


class CheckpointError(ValueError):
    """A checkpoint file is not an upstream SAM3 checkpoint or does not fit the model."""


class DynamicShapeAuditError(RuntimeError):
    """An exported program specialized (or constrained) a dim that must stay dynamic."""


class InputSpecError(ValueError):
    """A pipeline input has the wrong rank, size, dtype or is empty."""


class ArtifactError(RuntimeError):
    """A .pt2 artifact or its manifest is missing, foreign, or fails its hash check."""
