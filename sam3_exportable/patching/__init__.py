"""Runtime patches: the undo-stack engine, the declared upstream patches, ``doctor``.

* :mod:`.engine`: :class:`Patch`, :class:`PatchSession` (reference-counted, thread-safe
  installation), :func:`is_patched`, :func:`original_of`;
* :mod:`.when`: :class:`PatchContext` and the ``needed`` predicates;
* :mod:`.upstream`: one module per upstream file, one patch per upstream attribute;
* :mod:`.selection`: :func:`select_patches`, :func:`exportable_sam3`;
* :mod:`.doctor`: what each patch means for the installed torch and sam3.

The engine is imported eagerly (the loading side uses it for fast loading); the upstream
patch set on first use.
"""

from __future__ import annotations

from .._lazy import lazy_exports
from .engine import (
    Patch,
    PatchSession,
    installed_patches,
    is_patched,
    original_of,
    resolve_target,
    source_fingerprint,
)
from .when import PatchContext

__all__ = [
    "ALL_PATCHES",
    "Patch",
    "PatchContext",
    "PatchSession",
    "default_context",
    "exportable_sam3",
    "installed_patches",
    "is_patched",
    "original_of",
    "patch_by_name",
    "resolve_target",
    "select_patches",
    "source_fingerprint",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    globals(),
    {
        "ALL_PATCHES": "upstream",
        "default_context": "selection",
        "exportable_sam3": "selection",
        "patch_by_name": "selection",
        "select_patches": "selection",
    },
)
