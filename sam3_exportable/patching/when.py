"""When a patch belongs to the default set: :class:`PatchContext` and the predicates over it."""

from __future__ import annotations

import dataclasses
from typing import Literal

__all__ = ["PatchContext", "always", "for_onnx_export", "never_by_default", "without_cuda"]

ExportTarget = Literal["pt2", "onnx"]


@dataclasses.dataclass(frozen=True)
class PatchContext:
    """What a patch's ``needed`` predicate is asked about: exactly what the predicates read.

    Attributes:
        cuda_available: whether this process can use CUDA (upstream hard-codes it).
        export_target: ``"pt2"`` (torch.export program, AOTInductor) or ``"onnx"``.
    """

    cuda_available: bool
    export_target: ExportTarget = "pt2"


def always(ctx: PatchContext) -> bool:
    """Needed on every torch version, device and export target."""
    return True


def without_cuda(ctx: PatchContext) -> bool:
    """Needed when CUDA is unavailable (upstream hard-codes ``device="cuda"``)."""
    return not ctx.cuda_available


def for_onnx_export(ctx: PatchContext) -> bool:
    """Needed when the program is exported to ONNX (a translation onnxruntime rejects)."""
    return ctx.export_target == "onnx"


def never_by_default(ctx: PatchContext) -> bool:
    """Opt-in only: not needed on any combination measured (see the patch's ``when``)."""
    return False
