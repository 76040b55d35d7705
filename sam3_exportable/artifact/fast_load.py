"""A faster ``torch.export.load`` for large ``.pt2`` files, built on torch's own loader.

:func:`load_program` calls :func:`torch.export.load` itself, inside :func:`fast_load_scope`,
which applies the declared patches :data:`FAST_LOAD_PATCHES` to torch's deserializer through
the project's one patch engine (:class:`..patching.engine.PatchSession`: validated before
anything changes, shared by reference count across threads and nested scopes, reverted in
reverse order by the last scope to close, also on exceptions):

* the pure steps of deserialization (``_dict_to_dataclass``, ``typing.get_type_hints``,
  ``dataclasses.fields``, ``sympy.sympify`` as seen by ``torch._export.serde.serialize``)
  become memoized equivalents (:mod:`.serde_memo`) that return what the originals return;
* ``torch.export.pt2_archive._package._build_file_map`` maps the weight and constant records
  straight out of the file, copy-on-write, instead of copying them (:mod:`.mapped_weights`).

Everything else (graph rebuild, signature, range constraints, aliasing of weights, Parameters,
constants, example inputs) is torch's code, so the program is the one ``torch.export.load``
returns, with weights that alias the file's pages instead of private copies.

If one of these internals is missing or differs from what the patches were written against
(another torch version: each patch carries a fingerprint of the torch source or a check of
the value it replaces), :func:`check_internals` names it and :func:`load_program` raises
:class:`FastLoadUnavailable` before touching anything; callers fall back to plain
``torch.export.load``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import os
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import UpstreamMismatchError
from ..patching.engine import Patch, PatchSession
from .mapped_weights import _OWNED, _mapped_build_file_map, _MappedFile
from .serde_memo import (  # the memo names are re-exported for the tests
    _Memo,
    _memo_fields,
    _memo_get_type_hints,
    _memo_sympify,
    _module_with,
    _SchemaDecoder,
)

__all__ = [
    "FAST_LOAD_PATCHES",
    "FastLoadUnavailable",
    "check_internals",
    "fast_load_scope",
    "gc_paused",
    "load_program",
    "load_programs",
]

_SERIALIZE = "torch._export.serde.serialize"
_PACKAGE = "torch.export.pt2_archive._package"
_UNION = "torch._export.serde.union"


class FastLoadUnavailable(UpstreamMismatchError):
    """The torch internals the fast path relies on are missing or changed; use torch.export.load."""


# --------------------------------------------------------------------------- the declared patches


def _is_module(name: str) -> Callable[[Any], str | None]:
    def expects(value: Any) -> str | None:
        if value is not importlib.import_module(name):
            return f"expected the {name} module, got {value!r:.80}"
        return None

    return expects


def _has(module: str, *attrs: str) -> Callable[[Any], str | None]:
    """``expects``: ``module`` still has the callables the replacement uses."""

    def expects(value: Any) -> str | None:
        owner = importlib.import_module(module)
        missing = [a for a in attrs if not callable(getattr(owner, a, None))]
        return f"{module} lacks {', '.join(missing)}" if missing else None

    return expects


def _file_map_expects(value: Any) -> str | None:
    problem = _has(_SERIALIZE, "deserialize_scalar_type", "deserialize_device", "deserialize_size")(value)
    if problem:
        return problem
    for attr in ("get_record_offset", "get_record_size"):
        if not hasattr(torch._C.PyTorchFileReader, attr):
            return f"torch._C.PyTorchFileReader.{attr} is missing"
    if not hasattr(torch.UntypedStorage, "from_file"):
        return "torch.UntypedStorage.from_file is missing"
    return None


def _typing_shim(real: types.ModuleType) -> types.ModuleType:
    return _module_with(real, get_type_hints=_memo_get_type_hints(real.get_type_hints, _Memo()))


def _sympy_shim(real: types.ModuleType) -> types.ModuleType:
    return _module_with(real, sympify=_memo_sympify(real.sympify, real, _Memo()))


def _dataclasses_shim(real: types.ModuleType) -> types.ModuleType:
    return _module_with(real, fields=_memo_fields(real.fields, _Memo()))


_WHEN = "every fast .pt2 load (load_pipeline with fast=True), while torch.export.load runs"

#: The replacements :func:`fast_load_scope` applies, in order.
FAST_LOAD_PATCHES: tuple[Patch, ...] = (
    Patch(
        name="serialize.memo_type_hints",
        target=f"{_SERIALIZE}.typing",
        why="typing.get_type_hints of the same schema class is recomputed on each of ~136k calls",
        when=_WHEN,
        replacement=_typing_shim,
        expects=_is_module("typing"),
        package="torch",
    ),
    Patch(
        name="serialize.memo_sympify",
        target=f"{_SERIALIZE}.sympy",
        why="sympy parses the same symbolic-shape strings again for each of ~6k fake-tensor metas",
        when=_WHEN,
        replacement=_sympy_shim,
        expects=_is_module("sympy"),
        package="torch",
    ),
    Patch(
        name="serialize.memo_dataclass_fields",
        target=f"{_SERIALIZE}.dataclasses",
        why="dataclasses.fields of the same schema class is recomputed on every decoded value",
        when=_WHEN,
        replacement=_dataclasses_shim,
        expects=_is_module("dataclasses"),
        package="torch",
    ),
    Patch(
        name="union.memo_dataclass_fields",
        target=f"{_UNION}.fields",
        why="dataclasses.fields of the same union class is recomputed on every decoded union",
        when=_WHEN,
        replacement=lambda real: _memo_fields(real, _Memo()),
        expects=lambda value: None if value is dataclasses.fields else "expected dataclasses.fields",
        package="torch",
    ),
    Patch(
        name="serialize.schema_decoder",
        target=f"{_SERIALIZE}._dict_to_dataclass",
        why="JSON to schema dataclasses decides per call what depends only on the target type",
        when=_WHEN,
        fingerprint="caf63dd8c94356b1",
        replacement=lambda real: _SchemaDecoder(importlib.import_module(_SERIALIZE), real),
        expects=_has(_SERIALIZE, "_resolve_schema_cls", "_Union"),
        replaces=True,
        rationale="its type dispatch is inside the function; the decoder falls back to it on any surprise",
        package="torch",
    ),
    Patch(
        name="package.mapped_file_map",
        target=f"{_PACKAGE}._build_file_map",
        why="weights are copied out of the zip record by record instead of mapped from the file",
        when=_WHEN,
        fingerprint="7bb719271f3a55b5",
        replacement=lambda real: _mapped_build_file_map(real, importlib.import_module(_SERIALIZE)),
        expects=_file_map_expects,
        replaces=True,
        rationale="the copy happens inside the function; other archives still go to the original",
        package="torch",
    ),
)


def check_internals(patches: tuple[Patch, ...] | None = None) -> None:
    """Raise :class:`FastLoadUnavailable` naming the first torch internal that is missing or
    differs from what a fast-load patch was written against. Touches nothing."""
    for patch in FAST_LOAD_PATCHES if patches is None else patches:
        try:
            patch.check()
        except UpstreamMismatchError as exc:
            raise FastLoadUnavailable(str(exc)) from exc


@contextlib.contextmanager
def fast_load_scope(path: str | os.PathLike[str] | None = None) -> Iterator[_MappedFile | None]:
    """Apply :data:`FAST_LOAD_PATCHES` while the body runs (see the module docstring).

    While open, ``torch.export.load`` called *by this thread* on ``path`` maps weight and
    constant records from the file instead of copying them (``path=None``: copy as usual,
    only the memoization applies). Scopes may nest and may be open in several threads.
    Yields the file's mapping record (``None`` without ``path``) so callers can see how many
    records were mapped. Raises FastLoadUnavailable (having changed nothing) if torch's
    internals differ from what the patches expect.
    """
    session = PatchSession(FAST_LOAD_PATCHES)
    try:
        session.apply()
    except UpstreamMismatchError as exc:
        raise FastLoadUnavailable(str(exc)) from exc
    try:
        mapped = _MappedFile.open(os.fspath(path)) if path is not None else None
        previous = getattr(_OWNED, "mapped", None)
        _OWNED.mapped = mapped
        try:
            yield mapped
        finally:
            _OWNED.mapped = previous
    finally:
        session.revert()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Suspend Python's cyclic garbage collector; restore its previous state on exit (also
    on exceptions). Reading a large program allocates around a million long-lived container
    objects, and every allocation burst triggers a collection that scans the growing heap
    again; nothing the load allocates is garbage before it returns, so the scans are pure
    cost. Reference counting still frees everything acyclic meanwhile."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_program(path: str | os.PathLike[str], *, mmap_weights: bool = True) -> torch.export.ExportedProgram:
    """``torch.export.load(path)`` inside :func:`fast_load_scope`, with the cyclic garbage
    collector paused (:func:`gc_paused`).

    Returns the same program ``torch.export.load`` returns (same graph, signature, range
    constraints, state_dict values and aliasing). With ``mmap_weights`` (default) the weight
    and constant tensors are views of a private copy-on-write mapping of ``path``: in-place
    writes to them are allowed and never reach the file, but the file must not be truncated
    or rewritten in place while the program is alive (replacing it with a rename is safe).
    Raises FastLoadUnavailable if torch's internals differ (nothing has been changed then).
    """
    target = Path(path)
    with gc_paused(), fast_load_scope(target if mmap_weights else None):
        return torch.export.load(target)


def load_programs(
    path: str | os.PathLike[str], *, mmap_weights: bool = True
) -> dict[str, torch.export.ExportedProgram]:
    """Every program of the archive at ``path`` by name (torch's ``load_pt2``), loaded as
    :func:`load_program` loads one: programs whose weights share a record map the same pages.
    Raises FastLoadUnavailable if torch's internals differ (nothing has been changed then)."""
    from torch.export.pt2_archive._package import load_pt2

    target = Path(path)
    with gc_paused(), fast_load_scope(target if mmap_weights else None):
        return dict(load_pt2(os.fspath(target)).exported_programs)
