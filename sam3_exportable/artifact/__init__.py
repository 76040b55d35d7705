"""Artifacts: the manifest, ``.pt2`` programs, AOTInductor packages, ONNX graphs, one loader.

* :mod:`.manifest`: the schema, the one writer (:func:`.manifest.publish`) and the one reader
  (:func:`.manifest.read_manifest`);
* :mod:`.files`: atomic, umask-respecting writes and output-path checks;
* :mod:`.base`: :class:`Artifact`, the interface of every loaded kind;
* :mod:`.pt2`, :mod:`.aoti`, :mod:`.onnx`: one module per kind; :mod:`.fast_load`: faster
  ``.pt2`` loading;
* :mod:`.loader`: :func:`load_artifact`.

Nothing here imports ``sam3``: a serving process needs torch, torchvision (and onnxruntime
for ONNX) and this package.
"""

from __future__ import annotations

from .base import Artifact
from .files import atomic_write, sha256_file
from .loader import as_artifact, load_artifact
from .manifest import manifest_path, read_manifest, versions_record
from .pt2 import LoadedPipeline, Pt2Artifact, load_pipeline, save_pipeline

__all__ = [
    "Artifact",
    "LoadedPipeline",
    "Pt2Artifact",
    "as_artifact",
    "atomic_write",
    "load_artifact",
    "load_pipeline",
    "manifest_path",
    "read_manifest",
    "save_pipeline",
    "sha256_file",
    "versions_record",
]
