"""Export Meta's SAM3 text-grounding pipeline with torch.export, without forking upstream."""

from __future__ import annotations

from .builders import build_model, load_checkpoint
from .errors import (
    ArtifactError,
    CheckpointError,
    DynamicShapeAuditError,
    InputSpecError,
    UpstreamMismatchError,
)
from .patch_set import exportable_sam3, select_patches
from .patching import Patch, PatchSession, is_patched, original_of
from .pipeline import OUTPUT_NAMES, FullSam3PipelineWrapper

__version__ = "0.1.0"

__all__ = [
    "OUTPUT_NAMES",
    "ArtifactError",
    "CheckpointError",
    "DynamicShapeAuditError",
    "FullSam3PipelineWrapper",
    "InputSpecError",
    "Patch",
    "PatchSession",
    "UpstreamMismatchError",
    "build_model",
    "exportable_sam3",
    "is_patched",
    "load_checkpoint",
    "original_of",
    "select_patches",
]
