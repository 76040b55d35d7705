"""``load_artifact``: one loader for every artifact kind, chosen by the embedded manifest.

The manifest is read and checked once here and handed to the kind's loader. The kinds'
modules are imported by name on first use: an ONNX artifact loads in the runtime install
(no torch), and a ``.pt2`` or AOTInductor artifact there fails with one line naming the
extra to install.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from ..errors import MissingExtraError
from .base import Artifact
from .manifest import Manifest, read_manifest

__all__ = ["KIND_LOADERS", "Artifact", "as_artifact", "load_artifact", "load_checked"]

#: kind -> (module, loader function, the extra its runtime needs). Each loader takes
#: ``(path, manifest, *, verify_hash, threads)``.
KIND_LOADERS: dict[str, tuple[str, str, str]] = {
    "pt2": ("sam3_exportable.artifact.pt2", "load_pipeline_checked", "torch"),
    "aoti": ("sam3_exportable.artifact.aoti", "load_aoti_checked", "torch"),
    "onnx": ("sam3_exportable.artifact.onnx_runtime", "load_onnx_checked", "runtime"),
}


def _kind_module(kind: str) -> Any:
    module, _, extra = KIND_LOADERS[kind]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = exc.name or str(exc)
        package = "sam3-exportable" if extra == "runtime" else f"'sam3-exportable[{extra}]'"
        raise MissingExtraError(
            f"{kind} artifacts: expected {missing} to be installed, it is not; pip install {package}"
        ) from exc


def load_artifact(
    path: str | os.PathLike[str], *, verify_hash: bool = True, threads: int | None = None
) -> Artifact:
    """Load the artifact at ``path`` (``.pt2`` program, AOTInductor package or ONNX graph),
    the kind taken from the manifest inside the file, whatever its name.

    The manifest is read once; the sha256 of the file (from the copy beside it, when there
    is one) and of every data file it lists (from the manifest inside) are checked unless
    ``verify_hash`` is False. ``threads``: intra-op threads (the onnxruntime session's; for
    torch kinds ``torch.set_num_threads``, which is process-wide); None keeps the default.

    Raises :class:`~..errors.ArtifactError` when the file or its manifest is missing,
    foreign or inconsistent, or a hash differs; :class:`~..errors.MissingExtraError` naming
    the extra to install when the kind's runtime is missing.
    """
    target = Path(path)
    return load_checked(target, read_manifest(target), verify_hash=verify_hash, threads=threads)


def load_checked(
    path: Path, manifest: Manifest, *, verify_hash: bool = True, threads: int | None = None
) -> Artifact:
    """:func:`load_artifact` with the manifest of ``path`` read already (by
    :func:`~.manifest.read_manifest`): a job that reads it first does not read it again."""
    _, function, _ = KIND_LOADERS[manifest.kind]
    loader = getattr(_kind_module(manifest.kind), function)
    return loader(path, manifest, verify_hash=verify_hash, threads=threads)


def as_artifact(source: Any, *, threads: int | None = None) -> Artifact:
    """``source`` as an :class:`Artifact`: a path is loaded, an artifact returned as is, an
    in-memory ``torch.export.ExportedProgram`` wrapped (manifest described from the program).

    Raises ``TypeError`` for anything else.
    """
    if isinstance(source, Artifact):
        return source
    if isinstance(source, (str, os.PathLike)):
        return load_artifact(source, threads=threads)
    if type(source).__name__ == "ExportedProgram":
        return _kind_module("pt2").Pt2Artifact.from_program(source)
    raise TypeError(
        f"artifact: expected a path, a loaded Artifact or an ExportedProgram, got {type(source).__name__}"
    )
