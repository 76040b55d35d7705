"""``load_artifact``: one loader for every artifact kind, chosen by the manifest."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch.export import ExportedProgram

from .base import Artifact
from .manifest import read_manifest

__all__ = ["Artifact", "as_artifact", "load_artifact"]


def load_artifact(path: str | os.PathLike[str], *, verify_hash: bool = True) -> Artifact:
    """Load the artifact at ``path`` (``.pt2`` program, AOTInductor package or ONNX graph),
    the kind taken from its manifest; manifest and sha256 are checked.

    Raises :class:`~..errors.ArtifactError` when the file or its manifest is missing,
    foreign or inconsistent, or the hash differs; ``ImportError`` naming the extra to install
    when the kind's runtime is missing (``sam3-exportable[onnx]``).
    """
    target = Path(path)
    kind = read_manifest(target)["kind"]
    if kind == "aoti":
        from .aoti import load_aoti

        return load_aoti(target, verify_hash=verify_hash)
    if kind == "onnx":
        from .onnx import load_onnx

        return load_onnx(target, verify_hash=verify_hash)
    from .pt2 import load_pipeline

    return load_pipeline(target, verify_hash=verify_hash)


def as_artifact(source: Any) -> Artifact:
    """``source`` as an :class:`Artifact`: a path is loaded, an artifact returned as is, an
    in-memory ``ExportedProgram`` wrapped (its manifest described from the program).

    Raises ``TypeError`` for anything else.
    """
    if isinstance(source, Artifact):
        return source
    if isinstance(source, (str, os.PathLike)):
        return load_artifact(source)
    if isinstance(source, ExportedProgram):
        from .pt2 import Pt2Artifact

        return Pt2Artifact.from_program(source)
    raise TypeError(
        f"artifact: expected a path, a loaded Artifact or an ExportedProgram, got {type(source).__name__}"
    )
