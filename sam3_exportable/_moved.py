"""Module paths of sam3-exportable 0.1 that moved in 0.2, kept importable.

``import sam3_exportable.aoti`` (say) gives the module at its new place,
``sam3_exportable.artifact.aoti``, with a ``DeprecationWarning`` naming it; the old path will
be removed in 0.3. :data:`MOVED` is the whole list.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "install"]

_PACKAGE = __name__.rpartition(".")[0]

#: old module path (relative to the package) -> new one
MOVED = {
    "aoti": "artifact.aoti",
    "fast_load": "artifact.fast_load",
    "pipeline": "export.pipeline",
    "builders": "export.builders",
    "patch_set": "patching.selection",
    "doctor": "patching.doctor",
    "upstream_patches": "patching.upstream",
    "outputs": "predict.outputs",
    "bench_worker": "bench.worker",
    "bench_report": "bench.report",
    "bench_plots": "bench.plots",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{self.old} moved to {self.new}; import it from there (the old path goes in 0.3)",
            DeprecationWarning,
            stacklevel=4,
        )
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        """The module is the new one, already executed."""


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None):  # type: ignore[override]
        prefix, _, rest = fullname.partition(".")
        if prefix != _PACKAGE or rest not in MOVED:
            return None
        new = f"{_PACKAGE}.{MOVED[rest]}"
        return importlib.machinery.ModuleSpec(fullname, _Alias(fullname, new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
