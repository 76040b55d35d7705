"""Predicates for ``Patch.needed``: when a patch belongs to the default set."""

from __future__ import annotations

from ..patching import PatchContext


def always(ctx: PatchContext) -> bool:
    """Needed on every torch version, device and export mode."""
    return True


def without_cuda(ctx: PatchContext) -> bool:
    """Needed when CUDA is unavailable (upstream hard-codes ``device="cuda"``)."""
    return not ctx.cuda_available


def never_by_default(ctx: PatchContext) -> bool:
    """Opt-in only: not needed on any combination measured (see the patch's ``when``)."""
    return False
