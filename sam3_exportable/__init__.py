"""Export Meta's SAM3 text-grounding pipeline as one artifact, without forking upstream.

The package is laid out by job; imports point one way (``cli`` -> ``bench`` -> ``batch`` ->
``predict`` -> ``export`` -> ``verify`` -> ``artifact`` -> ``patching`` -> ``contract``,
``tokenizer``, ``errors``), and the loading side (``artifact``, ``predict``, ``batch``,
``verify``) never imports ``sam3`` (``pyproject.toml`` holds the import-linter contracts).

* :mod:`.patching`: the undo-stack engine, the declared upstream patches, ``doctor``;
* :mod:`.export`: model builders, the pipeline wrapper, trace + audit, the export recipe;
* :mod:`.artifact`: the manifest, ``.pt2`` / AOTInductor / ONNX artifacts, one loader;
* :mod:`.verify`: parity between two sets of outputs;
* :mod:`.predict`: images and phrases in, masks, boxes and scores out;
* :mod:`.batch`: folders of images in batches, locally or on Ray;
* :mod:`.bench`: what an artifact costs.

Names below are imported on first use, so ``import sam3_exportable`` stays cheap and a
serving process that loads an artifact never imports the export side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _moved
from ._lazy import lazy_exports

__version__ = "0.2.0"

#: public name -> module that defines it
_EXPORTS = {
    "OUTPUT_NAMES": "contract",
    "ArtifactError": "errors",
    "CheckpointError": "errors",
    "DynamicShapeAuditError": "errors",
    "InputSpecError": "errors",
    "OutputPathError": "errors",
    "UpstreamMismatchError": "errors",
    "Patch": "patching.engine",
    "PatchSession": "patching.engine",
    "is_patched": "patching.engine",
    "original_of": "patching.engine",
    "exportable_sam3": "patching.selection",
    "select_patches": "patching.selection",
    "build_model": "export.builders",
    "load_checkpoint": "export.checkpoints",
    "FullSam3PipelineWrapper": "export.pipeline",
    "audit_dynamic_shapes": "export.trace",
    "export_full_pipeline": "export.trace",
    "export_stages": "export.stages",
    "BuildRecord": "export.recipe",
    "build_artifact": "export.recipe",
    "Artifact": "artifact.loader",
    "load_artifact": "artifact.loader",
    "save_pipeline": "artifact.pt2",
    "load_pipeline": "artifact.pt2",
    "compare_parity": "verify",
    "Predictor": "predict.predictor",
    "segment_images": "batch.api",
    "SegmentBatch": "batch.segment",
}

__all__ = sorted(_EXPORTS)

_moved.install()

if TYPE_CHECKING:  # pragma: no cover - the names type checkers see; imported lazily at run time
    from .artifact.loader import Artifact, load_artifact  # noqa: F401
    from .artifact.pt2 import load_pipeline, save_pipeline  # noqa: F401
    from .batch.api import segment_images  # noqa: F401
    from .batch.segment import SegmentBatch  # noqa: F401
    from .contract import OUTPUT_NAMES  # noqa: F401
    from .errors import (  # noqa: F401
        ArtifactError,
        CheckpointError,
        DynamicShapeAuditError,
        InputSpecError,
        OutputPathError,
        UpstreamMismatchError,
    )
    from .export.builders import build_model  # noqa: F401
    from .export.checkpoints import load_checkpoint  # noqa: F401
    from .export.pipeline import FullSam3PipelineWrapper  # noqa: F401
    from .export.recipe import BuildRecord, build_artifact  # noqa: F401
    from .export.stages import export_stages  # noqa: F401
    from .export.trace import audit_dynamic_shapes, export_full_pipeline  # noqa: F401
    from .patching.engine import Patch, PatchSession, is_patched, original_of  # noqa: F401
    from .patching.selection import exportable_sam3, select_patches  # noqa: F401
    from .predict.predictor import Predictor  # noqa: F401
    from .verify import compare_parity  # noqa: F401


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
