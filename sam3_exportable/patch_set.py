"""Choosing patches and the ``exportable_sam3()`` context manager."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .patching import Patch, PatchContext, PatchSession
from .upstream_patches import ALL_PATCHES

__all__ = ["default_context", "exportable_sam3", "patch_by_name", "select_patches"]


def default_context(*, strict: bool = False, device: str | None = None) -> PatchContext:
    """The :class:`PatchContext` of this process: installed torch, CUDA availability."""
    cuda = torch.cuda.is_available()
    return PatchContext(
        torch_version=torch.__version__,
        strict=strict,
        device=device or ("cuda" if cuda else "cpu"),
        cuda_available=cuda,
    )


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
        include: add these (typically opt-in patches) to the default selection.
        context: what the default selection is computed for (:func:`default_context`).

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
    strict: bool = False,
    device: str | None = None,
    skip_mismatched: Iterable[str] = (),
) -> PatchSession:
    """Context manager that puts unmodified upstream ``sam3`` into an exportable state.

    By default it applies the patches the current torch, device and export mode need
    (see :func:`select_patches`). Everything is reverted on exit, also on exceptions.
    Raises :class:`~sam3_exportable.errors.UpstreamMismatchError` on enter when an
    upstream target moved or changed, unless its name is in ``skip_mismatched``.

    Example::

        with exportable_sam3():
            ep = torch.export.export(FullSam3PipelineWrapper(model), args, dynamic_shapes=...)
    """
    patches = select_patches(
        only=only,
        exclude=exclude,
        include=include,
        context=default_context(strict=strict, device=device),
    )
    return PatchSession(patches, skip_mismatched=skip_mismatched)
