"""Choosing patches and the ``exportable_sam3()`` context manager."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .engine import Patch, PatchSession
from .upstream import ALL_PATCHES
from .when import ExportTarget, PatchContext

__all__ = ["default_context", "exportable_sam3", "patch_by_name", "select_patches"]


def default_context(*, export_target: ExportTarget = "pt2") -> PatchContext:
    """The :class:`PatchContext` of this process (CUDA availability) for ``export_target``."""
    if export_target not in ("pt2", "onnx"):
        raise ValueError(f"export_target: expected 'pt2' or 'onnx', got {export_target!r}")
    return PatchContext(cuda_available=torch.cuda.is_available(), export_target=export_target)


def patch_by_name(name: str) -> Patch:
    """Return the declared patch called ``name``; ``KeyError`` lists the known names."""
    for patch in ALL_PATCHES:
        if patch.name == name:
            return patch
    raise KeyError(f"unknown patch {name!r}; known patches: {[p.name for p in ALL_PATCHES]}")


def _names(arg: Iterable[str] | str | None, what: str) -> list[str]:
    if arg is None:
        return []
    names = [arg] if isinstance(arg, str) else list(arg)
    for name in names:
        try:
            patch_by_name(name)
        except KeyError as exc:
            raise ValueError(f"{what}: {exc.args[0]}") from None
    return names


def select_patches(
    *,
    only: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    include: Iterable[str] | str | None = None,
    context: PatchContext | None = None,
) -> tuple[Patch, ...]:
    """Select patches, in application order.

    Args:
        only: exactly these patches (opt-in ones included), ignoring ``needed``.
        exclude: drop these from the selection.
        include: add these (e.g. opt-in patches) to the default set.
        context: what the ``needed`` predicates are asked; default: this process, for a
            ``.pt2`` export (:func:`default_context`).

    Raises ``ValueError`` for an unknown name or for ``only`` together with ``include``.
    """
    only_names = _names(only, "only")
    exclude_names = set(_names(exclude, "exclude"))
    include_names = set(_names(include, "include"))
    if only is not None and include_names:
        raise ValueError("select_patches: pass either only= or include=, not both")
    ctx = context or default_context()
    if only is not None:
        chosen = set(only_names)
    else:
        chosen = {p.name for p in ALL_PATCHES if p.needed(ctx)} | include_names
    chosen -= exclude_names
    return tuple(p for p in ALL_PATCHES if p.name in chosen)


def exportable_sam3(
    *,
    only: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    include: Iterable[str] | str | None = None,
    target: ExportTarget = "pt2",
    strict: bool = False,
    skip_mismatched: Iterable[str] = (),
) -> PatchSession:
    """Context manager that puts unmodified upstream ``sam3`` into an exportable state.

    By default it applies the patches this process needs for ``target`` (``"pt2"``, or
    ``"onnx"`` for a program that goes on to ONNX; see :func:`select_patches`). Everything
    is reverted when the last session holding a patch leaves, also on exceptions; while any
    session is open its patches are process-wide (other threads see them too). The session's
    :attr:`~.engine.PatchSession.held` names the patches in effect for it.

    Raises :class:`~sam3_exportable.errors.UpstreamMismatchError` on enter when an upstream
    target moved or changed, unless its name is in ``skip_mismatched``; ``NotImplementedError``
    for ``strict=True`` (dynamo traces the function behind each ``wrapt`` wrapper, so runtime
    patches would silently not apply: strict export needs upstream with ``patches/`` applied).

    Example::

        with exportable_sam3() as session:
            ep = torch.export.export(FullSam3PipelineWrapper(model), args, dynamic_shapes=...)
        print(session.held)
    """
    if strict:
        raise NotImplementedError(
            "exportable_sam3(strict=True): strict export (dynamo) traces the original function "
            "behind each wrapt wrapper, so the runtime patches would silently not apply; export "
            "non-strict, or apply patches/*.patch to upstream and export it directly"
        )
    patches = select_patches(
        only=only, exclude=exclude, include=include, context=default_context(export_target=target)
    )
    return PatchSession(patches, skip_mismatched=skip_mismatched)
