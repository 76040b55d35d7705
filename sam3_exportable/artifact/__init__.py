"""Artifacts: the manifest, ``.pt2`` programs, AOTInductor packages, ONNX graphs, one loader.

* :mod:`.manifest`: the typed :class:`~.manifest.Manifest`, the one writer
  (:func:`.manifest.publish`) and the one reader (:func:`.manifest.read_manifest`);
* :mod:`.files`: atomic, umask-respecting writes and output-path checks;
* :mod:`.base`: :class:`Artifact`, the interface of every loaded kind;
* :mod:`.loader`: :func:`load_artifact`, the kind from the embedded manifest;
* :mod:`.onnx_runtime`: ONNX graphs at run time (onnxruntime and numpy only);
* :mod:`.program`, :mod:`.pt2`, :mod:`.aoti`, :mod:`.onnx`: the torch side: describing
  programs, ``.pt2`` save/load, AOTInductor packages, ONNX export; :mod:`.fast_load`: faster
  ``.pt2`` loading.

The runtime modules (manifest, files, base, loader, onnx_runtime) import neither torch nor
sam3 (an import-linter contract); nothing here imports ``sam3``. Torch-side names below are
imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from .base import Artifact
from .files import atomic_write, sha256_file
from .loader import as_artifact, load_artifact
from .manifest import Manifest, manifest_path, read_manifest, versions_record

_EXPORTS = {
    "LoadedPipeline": "pt2",
    "Pt2Artifact": "pt2",
    "load_pipeline": "pt2",
    "save_pipeline": "pt2",
}

__all__ = [
    "Artifact",
    "LoadedPipeline",
    "Manifest",
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

if TYPE_CHECKING:  # pragma: no cover
    from .pt2 import LoadedPipeline, Pt2Artifact, load_pipeline, save_pipeline

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
