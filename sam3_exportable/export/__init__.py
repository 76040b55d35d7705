"""The export side: model builders, the pipeline wrapper, trace + audit, the export recipe.

* :mod:`.builders` and :mod:`.checkpoints`: upstream ``Sam3Image`` models, random or from a
  checkpoint (local or ``hf://``);
* :mod:`.pipeline`: :class:`FullSam3PipelineWrapper`, the whole grounding pipeline as one
  module;
* :mod:`.trace`: :func:`export_full_pipeline` and :func:`audit_dynamic_shapes`;
* :mod:`.stages`: :func:`export_stages`, the one graph's two stages (``encode_images``,
  ``ground``) from the same wrapper;
* :mod:`.recipe`: :func:`build_artifact`, build through verify in one call.

This side imports upstream ``sam3``; the loading side (:mod:`..artifact`) does not.
"""

from __future__ import annotations

from .builders import BuildInfo, build_info, build_model
from .checkpoints import CheckpointReport, load_checkpoint
from .pipeline import FullSam3PipelineWrapper, is_tracing, synthetic_inputs
from .recipe import BuildRecord, artifact_paths, build_artifact
from .stages import StagePrograms, export_stages
from .trace import (
    DYNAMIC_DIMS,
    EXAMPLE_BATCH,
    EXAMPLE_PROMPTS,
    AuditReport,
    audit_dynamic_shapes,
    example_inputs,
    export_full_pipeline,
)

__all__ = [
    "DYNAMIC_DIMS",
    "EXAMPLE_BATCH",
    "EXAMPLE_PROMPTS",
    "AuditReport",
    "BuildInfo",
    "BuildRecord",
    "CheckpointReport",
    "FullSam3PipelineWrapper",
    "StagePrograms",
    "artifact_paths",
    "audit_dynamic_shapes",
    "build_artifact",
    "build_info",
    "build_model",
    "example_inputs",
    "export_full_pipeline",
    "export_stages",
    "is_tracing",
    "load_checkpoint",
    "synthetic_inputs",
]
