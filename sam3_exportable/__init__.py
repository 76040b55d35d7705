"""Export Meta's SAM3 text-grounding pipeline with torch.export, without forking upstream."""

from __future__ import annotations

from .artifact import load_pipeline, save_pipeline
from .builders import build_model, load_checkpoint
from .errors import (
    ArtifactError,
    CheckpointError,
    DynamicShapeAuditError,
    InputSpecError,
    UpstreamMismatchError,
)
from .export import audit_dynamic_shapes, export_full_pipeline
from .patch_set import exportable_sam3, select_patches
from .patching import Patch, PatchSession, is_patched, original_of
from .pipeline import OUTPUT_NAMES, FullSam3PipelineWrapper
from .predict import Predictor

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
    "Predictor",
    "UpstreamMismatchError",
    "audit_dynamic_shapes",
    "build_model",
    "export_full_pipeline",
    "exportable_sam3",
    "is_patched",
    "load_checkpoint",
    "load_pipeline",
    "original_of",
    "save_pipeline",
    "select_patches",
]
