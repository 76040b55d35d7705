"""AOTInductor packages compiled from the same audited program as the ``.pt2``.

A package is a ``.pt2`` zip written by ``torch._inductor.aoti_compile_and_package``, with the
manifest (:mod:`.manifest`, kind ``"aoti"``) added to it as one more record and copied
beside it. It carries the program's model and I/O fields plus the compile time, the
inductor options, the size hints and the compiling thread count. Dynamic ``batch`` and
``num_prompts`` are kept: the package is compiled from the exported program, whose range
constraints are both ``[1, inf)``.

The package runs the same graph but not the same kernels: inductor fuses pointwise ops and
generates its own loops, so its outputs are close to the ``.pt2``'s, not bitwise equal (the
tests bound the difference and check that the kept instances are the same).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from ..errors import ArtifactError
from .base import Artifact
from .files import Staging, check_output_file
from .manifest import EMBEDDED_NAME, AotiInfo, Manifest, SourceRef, check_file, publish, read_manifest
from .program import Provenance, describe_program, provenance_of, size_hints

__all__ = [
    "DEFAULT_INDUCTOR_CONFIGS",
    "AotiArtifact",
    "LoadedAotiPackage",
    "aoti_path_for",
    "compile_aoti",
    "load_aoti",
    "load_aoti_checked",
    "narrowed_parallelism",
    "size_hints",
]

#: Inductor options of ``export --aoti``. ``freezing`` lets inductor treat the weights as
#: constants and fold them; ``cpp.weight_prepack=False`` keeps the linears on ``addmm``
#: (pre-packed MKL GEMMs compiled longer and ran slower in full-size runs);
#: ``layout_optimization=False`` keeps the patch-embedding conv's channels-last strides out
#: of the ViT's residual stream, where every fused layer norm would gather its channels at
#: a stride (docs/performance.md has the measurements).
DEFAULT_INDUCTOR_CONFIGS: dict[str, Any] = {
    "freezing": True,
    "cpp.weight_prepack": False,
    "layout_optimization": False,
}


def narrowed_parallelism(hints: dict[str, int], threads: int) -> list[str]:
    """The dims whose hint makes inductor parallelize a loop nest over that dim alone.

    Inductor's C++ backend (``decide_parallel_depth`` in torch 2.14.1) takes outer loops
    into the parallel region until their product of hints reaches ``threads`` exactly or
    ``2 * threads``. With a dynamic dim outermost and its hint equal to ``threads`` or at
    least ``2 * threads``, it stops after that dim: a run at size 1 then does the whole
    nest on one thread. Returns the offending dim names (empty with one thread).
    """
    if threads <= 1:
        return []
    return [name for name, hint in hints.items() if hint == threads or hint >= 2 * threads]


def aoti_path_for(pt2_path: str | os.PathLike[str]) -> Path:
    """``build/sam3.pt2`` -> ``build/sam3.aoti.pt2``."""
    path = Path(pt2_path)
    stem = path.name[: -len(".pt2")] if path.name.endswith(".pt2") else path.name
    return path.with_name(f"{stem}.aoti.pt2")


def _embed(package: Path, text: str) -> None:
    """Add the manifest record to a package zip (under its archive root's ``extra/``)."""
    with zipfile.ZipFile(package, "a") as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        archive.writestr(f"{root}/extra/{EMBEDDED_NAME}", text)


def compile_aoti(
    ep: ExportedProgram,
    path: str | os.PathLike[str],
    *,
    source_manifest: Manifest | None = None,
    inductor_configs: dict[str, Any] | None = None,
    force: bool = False,
) -> Manifest:
    """Compile ``ep`` with AOTInductor into the package ``path`` and write its manifest.

    ``source_manifest`` is the manifest of the ``.pt2`` that ``ep`` was saved as: its file
    is recorded as the package's ``source``, and for a program without provenance (loaded
    from disk) its provenance is carried over. ``inductor_configs`` defaults to
    :data:`DEFAULT_INDUCTOR_CONFIGS`. Written as one commit; an existing package is kept
    unless ``force`` (:class:`~..errors.OutputExistsError`). Returns the manifest, whose
    ``aoti.compile_seconds`` is the wall time of the compile. Warns when the program's size
    hints would leave size-1 runs on one thread (:func:`narrowed_parallelism`).
    """
    import torch._inductor

    target = check_output_file(path, force=force, what="AOTInductor package")
    configs = dict(DEFAULT_INDUCTOR_CONFIGS if inductor_configs is None else inductor_configs)
    hints = size_hints(ep)
    threads = torch.get_num_threads()
    narrowed = narrowed_parallelism(hints, threads)
    if narrowed:
        warnings.warn(
            f"compile_aoti: the program was traced at {hints}; with {threads} threads inductor "
            f"will parallelize loops over {narrowed} alone, so runs at size 1 use one thread "
            f"there. Export with example sizes other than {threads} and below {2 * threads} "
            f"(export_full_pipeline(example_batch=..., example_prompts=...)).",
            stacklevel=2,
        )
    provenance = provenance_of(ep) or (
        Provenance.of_manifest(source_manifest) if source_manifest is not None else None
    )
    source = None
    if source_manifest is not None:
        file = source_manifest.file
        source = SourceRef(
            kind=source_manifest.kind,
            artifact_id=source_manifest.artifact_id,
            artifact=file.name if file else None,
            sha256=file.sha256 if file else None,
        )
    # the compile time is known only after compiling: the record is completed in write()
    doc = describe_program(
        ep, "aoti", provenance=provenance, source=source, aoti=AotiInfo(0.0, configs, threads)
    )

    def write(package: Path, manifest: Manifest, staging: Staging) -> Manifest:
        start = time.perf_counter()
        torch._inductor.aoti_compile_and_package(
            ep, package_path=str(package), inductor_configs=dict(configs)
        )
        seconds = round(time.perf_counter() - start, 3)
        embedded = dataclasses.replace(manifest, aoti=AotiInfo(seconds, configs, threads))
        _embed(package, embedded.dumps())
        return embedded

    return publish(target, doc, write, force=force)


class AotiArtifact(Artifact):
    """A loaded AOTInductor package and its manifest (what :func:`load_aoti` returns)."""

    kind = "aoti"
    array_library = "torch"

    def __init__(self, runner: Any, manifest: Manifest, path: Path) -> None:
        super().__init__(manifest, path)
        self.runner = runner

    def module(self) -> Any:
        """The compiled callable: ``(images, token_ids) -> [logits, boxes, masks, presence]``."""
        return self.runner

    def set_threads(self, threads: int) -> None:
        """``torch.set_num_threads(threads)`` (process-wide)."""
        torch.set_num_threads(int(threads))

    def _run(self, *inputs: Any) -> Any:
        return self.runner(*(torch.as_tensor(x) for x in inputs))


#: The name of :class:`AotiArtifact` in sam3-exportable 0.1.
LoadedAotiPackage = AotiArtifact


def load_aoti(path: str | os.PathLike[str], *, verify_hash: bool = True) -> AotiArtifact:
    """Read the manifest of the package at ``path`` and load it (:func:`load_aoti_checked`)."""
    target = Path(path)
    return load_aoti_checked(target, read_manifest(target, kinds=("aoti",)), verify_hash=verify_hash)


def load_aoti_checked(
    target: Path, manifest: Manifest, *, verify_hash: bool = True, threads: int | None = None
) -> AotiArtifact:
    """Load an AOTInductor package written by :func:`compile_aoti` whose manifest was read
    already; unless ``verify_hash`` is False the package's sha256 (from the manifest copy)
    is checked first. ``threads`` sets ``torch.set_num_threads`` (process-wide) when given.

    Raises :class:`~..errors.ArtifactError` when the kind is not ``"aoti"``, the hash
    differs, or AOTInductor cannot load the package.
    """
    if manifest.kind != "aoti":
        raise ArtifactError(f"{target}: expected an 'aoti' artifact, got a {manifest.kind!r} artifact")
    if verify_hash and manifest.file is not None:
        check_file(target, manifest.file)
    import torch._inductor
    import torchvision  # noqa: F401  registers torchvision::roi_align for the package's fallback

    if threads:
        torch.set_num_threads(int(threads))

    try:
        runner = torch._inductor.aoti_load_package(str(target))
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise ArtifactError(
            f"{target}: expected an AOTInductor package this torch can load, got: {first}"
        ) from exc
    return AotiArtifact(runner, manifest, target)
