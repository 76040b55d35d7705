"""ONNX artifacts at run time: onnxruntime and numpy only (no torch, no onnx package).

:func:`load_onnx` checks the manifest and the hashes of the graph and its weights file, and
opens an onnxruntime session with the settings the manifest records (:data:`SESSION_OPTIONS`).
Unmasked attention is onnxruntime's ``com.microsoft.MultiHeadAttention``, so the graph needs
onnxruntime (its contrib ops) rather than any ONNX runtime.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..contract import OUTPUT_NAMES, is_torch_tensor
from ..errors import ArtifactError, MissingExtraError
from .base import Artifact, default_threads
from .files import sha256_file
from .manifest import Manifest, check_file, read_manifest

__all__ = ["SESSION_OPTIONS", "OnnxArtifact", "load_onnx", "load_onnx_checked"]

#: onnxruntime settings the artifact expects (recorded in its manifest). The defaults: with
#: attention as MultiHeadAttention, arena, memory pattern and prepacking change peak memory
#: little (docs/performance.md), and full graph optimization is the fastest.
SESSION_OPTIONS: dict[str, Any] = {
    "providers": ["CPUExecutionProvider"],
    "graph_optimization_level": "ORT_ENABLE_ALL",
    "enable_cpu_mem_arena": True,
    "enable_mem_pattern": True,
    "intra_op_num_threads": "the loading process's usable CPUs unless threads= is given",
}


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingExtraError(
            f"onnx artifacts: expected onnxruntime to be installed, it is not ({exc}); "
            "pip install sam3-exportable"
        ) from exc
    return onnxruntime


def _session_options(ort: Any, threads: int) -> Any:
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, SESSION_OPTIONS["graph_optimization_level"]
    )
    options.enable_cpu_mem_arena = SESSION_OPTIONS["enable_cpu_mem_arena"]
    options.enable_mem_pattern = SESSION_OPTIONS["enable_mem_pattern"]
    options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3
    return options


class OnnxArtifact(Artifact):
    """A loaded ONNX graph: an onnxruntime session and the manifest (what :func:`load_onnx`
    returns). Numpy arrays in, numpy arrays out; given torch tensors it returns torch
    tensors (converted without copies)."""

    kind = "onnx"
    array_library = "numpy"

    def __init__(
        self, session: Any, manifest: Manifest, path: Path, threads: int, providers: list[str]
    ) -> None:
        super().__init__(manifest, path)
        self.session = session
        self.threads = threads
        self.providers = providers

    def set_threads(self, threads: int) -> None:
        """A new session with ``threads`` intra-op threads (the graph is read again)."""
        if int(threads) != self.threads:
            assert self.path is not None
            self.session = _session(_onnxruntime(), self.path, int(threads), self.providers)
            self.threads = int(threads)

    def _run(self, *inputs: Any) -> Any:
        torch_in = is_torch_tensor(inputs[0])
        feeds = {
            spec.name: np.ascontiguousarray(value.detach().cpu().numpy() if torch_in else value)
            for spec, value in zip(self.manifest.inputs, inputs, strict=True)
        }
        outputs = self.session.run(list(OUTPUT_NAMES), feeds)
        if torch_in:  # torch is loaded already: the caller handed us its tensors
            torch = importlib.import_module("torch")
            return tuple(torch.from_numpy(o) for o in outputs)
        return tuple(outputs)


def load_onnx_checked(
    path: Path,
    manifest: Manifest,
    *,
    verify_hash: bool = True,
    threads: int | None = None,
    providers: list[str] | None = None,
) -> OnnxArtifact:
    """Load the ONNX artifact at ``path`` whose manifest was read already.

    Every data file the manifest lists must be beside the graph; unless ``verify_hash`` is
    False its size and sha256 are checked, and the graph's own sha256 when the manifest copy
    gave it. Raises :class:`~..errors.ArtifactError` for a missing, foreign or changed file.
    """
    ort = _onnxruntime()
    if manifest.kind != "onnx":
        raise ArtifactError(f"{path}: expected an 'onnx' artifact, got a {manifest.kind!r} artifact")
    for record in manifest.data_files:
        data_path = path.with_name(record.name)
        if not data_path.is_file():
            raise ArtifactError(f"{path}: expected its weights file {record.name} beside it, found none")
        if verify_hash:
            check_file(data_path, record)
    if verify_hash and manifest.file is not None:
        check_file(path, manifest.file, sha256_file(path))
    threads = int(threads or default_threads())
    providers = list(providers or SESSION_OPTIONS["providers"])
    return OnnxArtifact(_session(ort, path, threads, providers), manifest, path, threads, providers)


def _session(ort: Any, path: Path, threads: int, providers: list[str]) -> Any:
    try:
        return ort.InferenceSession(os.fspath(path), _session_options(ort, threads), providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for bad models
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise ArtifactError(f"{path}: expected an onnxruntime-loadable graph, got: {first}") from exc


def load_onnx(
    path: str | os.PathLike[str],
    *,
    verify_hash: bool = True,
    providers: list[str] | None = None,
    threads: int | None = None,
) -> OnnxArtifact:
    """Read the manifest of the ONNX artifact at ``path`` and load it
    (:func:`load_onnx_checked`; ``threads`` defaults to :func:`default_threads`)."""
    target = Path(path)
    manifest = read_manifest(target, kinds=("onnx",))
    return load_onnx_checked(target, manifest, verify_hash=verify_hash, threads=threads, providers=providers)
