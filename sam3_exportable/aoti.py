"""AOTInductor packages compiled from the same audited program as the ``.pt2``.

A package is a ``.pt2`` zip written by ``torch._inductor.aoti_compile_and_package`` with a
manifest beside it (``<package>.json``, format :data:`AOTI_FORMAT`) that carries the source
program's manifest fields (image size, context length, tokenizer, patches, audit) plus the
compile time and the inductor options. Dynamic ``batch`` and ``num_prompts`` are kept: the
package is compiled from the exported program, whose range constraints are both ``[1, inf)``.

The package runs the same graph but not the same kernels: inductor fuses pointwise ops and
generates its own loops, so its outputs are close to the ``.pt2``'s, not bitwise equal (the
tests bound the difference and check that the kept instances are the same).

Like :mod:`.artifact`, this module imports neither ``sam3`` nor anything that does.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from .artifact import (
    _check_digest,
    _io_specs,
    atomic_write,
    manifest_path,
    read_manifest,
    sha256_file,
    versions_record,
    write_manifest,
)

__all__ = [
    "AOTI_FORMAT",
    "DEFAULT_INDUCTOR_CONFIGS",
    "LoadedAotiPackage",
    "aoti_path_for",
    "compile_aoti",
    "load_aoti",
    "narrowed_parallelism",
    "size_hints",
]

#: Identifies AOTInductor package manifests written by this library.
AOTI_FORMAT = "sam3-exportable/aoti"

#: Inductor options used by ``export --aoti``. ``freezing`` lets inductor treat the weights
#: as constants and fold them; ``cpp.weight_prepack=False`` keeps the linears on ``addmm``
#: instead of pre-packed MKL GEMMs: in full-size CPU bench runs it compiled in 245 and 275 s
#: and ran 1.032x and 1.057x as long as its own program at (1,1), against 332 s and 1.095x
#: with ``freezing`` alone. ``layout_optimization=False`` keeps the patch-embedding conv's
#: output out of channels-last, whose strides inductor carried into the ViT's residual
#: stream: every fused layer norm then gathered its 1024 channels at a stride of 72, one
#: float at a time; without it they load contiguous vectors (kernel profile of a full-size
#: package at (1,1): the trunk's fused layer norms 1.76 s -> 0.45 s; docs/performance.md).
DEFAULT_INDUCTOR_CONFIGS: dict[str, Any] = {
    "freezing": True,
    "cpp.weight_prepack": False,
    "layout_optimization": False,
}


def size_hints(ep: ExportedProgram) -> dict[str, int]:
    """The size hint ``ep`` carries for each dim of :data:`.export.DYNAMIC_DIMS`: the size it
    was traced at (kept by ``torch.export.save``/``load``). Inductor plans the package's
    loops by these.

    Dims that are not symbolic, or inputs the program lacks, are left out.
    """
    from .export import DYNAMIC_DIMS  # imports neither sam3 nor anything that does

    nodes = {n.name: n for n in ep.graph.nodes}
    user_inputs = list(ep.graph_signature.user_inputs)
    hints: dict[str, int] = {}
    for index, dim, name in DYNAMIC_DIMS:
        if index >= len(user_inputs):
            continue
        size = nodes[user_inputs[index]].meta["val"].shape[dim]
        if isinstance(size, torch.SymInt) and size.node.hint is not None:
            hints[name] = int(size.node.hint)
    return hints


def narrowed_parallelism(hints: dict[str, int], threads: int) -> list[str]:
    """The dims whose hint makes inductor parallelize a loop nest over that dim alone.

    Inductor's C++ backend (``decide_parallel_depth`` in torch 2.14.1) takes outer loops
    into the parallel region until their product of hints reaches ``threads`` exactly or
    ``2 * threads``. With a dynamic dim outermost and its hint equal to ``threads`` or at
    least ``2 * threads``, it stops after that dim: a run at size 1 then does the whole
    nest on one thread (measured: the ViT's fused layer norms of a full-size package at
    B=1). Returns the offending dim names (empty with one thread).
    """
    if threads <= 1:
        return []
    return [name for name, hint in hints.items() if hint == threads or hint >= 2 * threads]


# Fields of the source program's manifest that describe the model and its I/O contract.
_CARRIED = (
    "model",
    "image_size",
    "context_length",
    "vocab_size",
    "normalize",
    "tokenizer",
    "output_names",
    "autocast_dtype",
    "strict",
    "patches",
    "audit",
    "exported_by",
)


def aoti_path_for(pt2_path: str | os.PathLike[str]) -> Path:
    """``build/sam3.pt2`` -> ``build/sam3.aoti.pt2``."""
    path = Path(pt2_path)
    stem = path.name[: -len(".pt2")] if path.name.endswith(".pt2") else path.name
    return path.with_name(f"{stem}.aoti.pt2")


def compile_aoti(
    ep: ExportedProgram,
    path: str | os.PathLike[str],
    *,
    source_manifest: dict[str, Any] | None = None,
    inductor_configs: dict[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Compile ``ep`` with AOTInductor into the package ``path`` and write its manifest.

    ``source_manifest`` is the manifest of the ``.pt2`` that ``ep`` was saved as (or the
    metadata the export command records): its model and I/O fields are carried over, and its
    sha256, when present, is recorded as the source. ``inductor_configs`` defaults to
    :data:`DEFAULT_INDUCTOR_CONFIGS`. Both files are written atomically; existing files are
    kept unless ``force`` (``FileExistsError``). Returns the manifest, whose
    ``compile_seconds`` is the wall time of the compile.
    """
    import torch._inductor

    target = Path(path)
    manifest_file = manifest_path(target)
    for existing in (target, manifest_file):
        if existing.exists() and not force:
            raise FileExistsError(f"{existing}: exists; pass force=True (or --force) to overwrite")
    configs = dict(DEFAULT_INDUCTOR_CONFIGS if inductor_configs is None else inductor_configs)
    source = source_manifest or {}
    inputs, outputs = _io_specs(ep)
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
    with atomic_write(target, force=force) as tmp:
        start = time.perf_counter()
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp), inductor_configs=dict(configs))
        seconds = time.perf_counter() - start
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
    manifest: dict[str, Any] = {
        **{key: source[key] for key in _CARRIED if key in source},
        "format": AOTI_FORMAT,
        "format_version": 1,
        "artifact": target.name,
        "sha256": digest,
        "size_bytes": size,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "compile_seconds": round(seconds, 3),
        "inductor_configs": configs,
        "size_hints": hints,
        "compile_threads": threads,
        "source": {"artifact": source.get("artifact"), "sha256": source.get("sha256")},
        "versions": versions_record(),
        "inputs": inputs,
        "outputs": outputs,
    }
    if "image_size" not in manifest:
        manifest["image_size"] = int(inputs[0]["shape"][-1])
    if "context_length" not in manifest:
        manifest["context_length"] = int(inputs[1]["shape"][-1])
    write_manifest(target, manifest, force=force)
    return manifest


@dataclasses.dataclass
class LoadedAotiPackage:
    """A loaded AOTInductor package: call :meth:`module` like an exported program's module."""

    runner: Any
    manifest: dict[str, Any]
    path: Path

    def module(self) -> Any:
        """The compiled callable: ``(images, token_ids) -> [logits, boxes, masks, presence]``."""
        return self.runner


def load_aoti(path: str | os.PathLike[str], *, verify_hash: bool = True) -> LoadedAotiPackage:
    """Load an AOTInductor package written by :func:`compile_aoti`.

    Checks the manifest (format :data:`AOTI_FORMAT`) and, unless ``verify_hash`` is False,
    the package's sha256. Raises :class:`ArtifactError` when the file or manifest is missing
    or foreign, or the hash differs.
    """
    target = Path(path)
    manifest = read_manifest(target, expected_format=AOTI_FORMAT)
    if verify_hash:
        _check_digest(target, manifest, sha256_file(target))
    import torch._inductor
    import torchvision  # noqa: F401  registers torchvision::roi_align for the package's fallback

    runner = torch._inductor.aoti_load_package(str(target))
    return LoadedAotiPackage(runner=runner, manifest=manifest, path=target)
