"""A faster ``torch.export.load`` for large ``.pt2`` files, built on torch's own loader.

:func:`load_program` calls :func:`torch.export.load` itself, inside :func:`fast_load_scope`,
which applies the declared patches :data:`FAST_LOAD_PATCHES` to torch's deserializer through
the project's one patch engine (:class:`..patching.engine.PatchSession`: validated before
anything changes, shared by reference count across threads and nested scopes, reverted in
reverse order by the last scope to close, also on exceptions):

* ``_dict_to_dataclass`` (JSON to schema dataclasses) in ``torch._export.serde.serialize``
  becomes :class:`_SchemaDecoder`, which applies the same rules but decides once per target
  type instead of on each of ~400k calls; on any surprise it hands the value to torch's
  function. ``typing.get_type_hints`` and ``dataclasses.fields`` as seen by that module (and
  ``fields`` in ``torch._export.serde.union``) are memoized per class: their answers for a
  class never change while a file is read.
* ``sympy.sympify`` as seen by the same module is memoized for string inputs, keyed by the
  string, sympy's global ``evaluate`` flag and the *identity* of every ``locals`` binding whose
  name occurs in the string. ``sympify`` of a string is a pure function of those, so a hit
  returns the object a fresh parse would have built (sympy expressions are immutable).
* ``torch.export.pt2_archive._package._build_file_map`` (one flat CPU tensor per weight or
  constant record) maps the records straight out of the zip instead of copying them.
  ``torch.export.save`` stores every record uncompressed and 64-byte aligned, so each record
  is a byte range of the file; the whole file is mapped once, copy-on-write
  (``torch.UntypedStorage.from_file(path, shared=False)``: ``MAP_PRIVATE``), and each record
  becomes a slice of that storage. Writes to the tensors never reach the file. The mapping
  only serves archives opened from the path the scope was opened for, by the thread that
  opened it, whose record offsets and sizes agree with our own reading of the zip directory;
  anything else (other threads, compressed or misaligned records, non-CPU tensors) goes to
  torch's own copying builder.

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
import re
import threading
import types
import typing
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UpstreamMismatchError
from ..patching.engine import Patch, PatchSession

__all__ = [
    "FAST_LOAD_PATCHES",
    "FastLoadUnavailable",
    "check_internals",
    "fast_load_scope",
    "gc_paused",
    "load_program",
]

_SERIALIZE = "torch._export.serde.serialize"
_PACKAGE = "torch.export.pt2_archive._package"
_UNION = "torch._export.serde.union"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MISSING = object()


class FastLoadUnavailable(UpstreamMismatchError):
    """The torch internals the fast path relies on are missing or changed; use torch.export.load."""


# --------------------------------------------------------------------------- memoized pure functions


class _Memo:
    """The caches of one installed replacement; dropped with it when the last scope closes."""

    def __init__(self) -> None:
        self.type_hints: dict[tuple[Any, int], tuple[dict[str, Any], Any]] = {}
        self.sympify: dict[tuple[Any, ...], tuple[Any, tuple[Any, ...]]] = {}
        self.idents: dict[str, tuple[str, ...]] = {}
        self.fields: dict[type, tuple[Any, ...]] = {}
        self.hits = 0
        self.misses = 0


def _memo_get_type_hints(real: Callable[..., dict[str, Any]], memo: _Memo) -> Callable[..., dict[str, Any]]:
    def get_type_hints(obj: Any, globalns: Any = None, localns: Any = None, include_extras: bool = False):
        if localns is not None or include_extras or not isinstance(globalns, dict):
            return real(obj, globalns, localns, include_extras)
        try:
            key = (obj, id(globalns))
            hit = memo.type_hints.get(key)
        except TypeError:  # unhashable obj
            return real(obj, globalns, localns, include_extras)
        if hit is None:
            # keep globalns alive so its id cannot be reused while cached
            hit = (real(obj, globalns), globalns)
            memo.type_hints[key] = hit
        return dict(hit[0])

    return get_type_hints


def _memo_sympify(real: Callable[..., Any], sympy_mod: types.ModuleType, memo: _Memo) -> Callable[..., Any]:
    params = sympy_mod.core.parameters.global_parameters

    def sympify(a: Any, *args: Any, **kwargs: Any) -> Any:
        if type(a) is not str or args or set(kwargs) - {"locals"}:
            return real(a, *args, **kwargs)
        bindings = kwargs.get("locals")
        if bindings is not None and not isinstance(bindings, dict):
            return real(a, *args, **kwargs)
        bindings = bindings or {}
        names = memo.idents.get(a)
        if names is None:
            names = tuple(sorted(set(_IDENT.findall(a))))
            memo.idents[a] = names
        bound = tuple(bindings.get(n, _MISSING) for n in names)
        key = (a, bool(params.evaluate), *(id(b) for b in bound))
        hit = memo.sympify.get(key)
        if hit is not None:
            memo.hits += 1
            return hit[0]
        memo.misses += 1
        result = real(a, **kwargs)
        memo.sympify[key] = (result, bound)  # `bound` keeps the keyed objects alive
        return result

    return sympify


def _memo_fields(real: Callable[..., tuple[Any, ...]], memo: _Memo) -> Callable[..., tuple[Any, ...]]:
    def fields(class_or_instance: Any) -> tuple[Any, ...]:
        cls = class_or_instance
        if not isinstance(cls, type):
            # an instance answers with its class's fields unless it shadows the class attribute
            if "__dataclass_fields__" in getattr(cls, "__dict__", ()):
                return real(cls)
            cls = type(cls)
        hit = memo.fields.get(cls)
        if hit is None:
            hit = memo.fields[cls] = real(cls)
        return hit  # a tuple, like the original's answer

    return fields


class _SchemaDecoder:
    """Builds the dataclasses ``serialize._dict_to_dataclass`` builds, deciding per target type
    once (by type, cached) what the original decides on every call.

    The rules, as ``_dict_to_dataclass`` applies them: a type named by a string or ForwardRef is
    looked up with torch's ``_resolve_schema_cls``; ``Annotated[T, ...]`` decodes as ``T``;
    ``Optional[T]`` gives None for None, else decodes as ``T``; a ``_Union`` subclass takes a
    one-key dict and is built with ``create`` from the key's field type; a dataclass is built
    from the keys it has fields for (unknown keys ignored); otherwise a list (an empty one is
    returned as is) or a dict is decoded element-wise by the type's first/second argument,
    ``float`` converts, anything else is returned unchanged. Any surprise (a new schema
    construct in another torch) makes :meth:`__call__` redo the whole value with torch's own
    function, so the answer is always torch's.
    """

    _ANNOTATED, _OPTIONAL, _UNION, _DATACLASS, _OTHER = range(5)

    def __init__(self, serialize: types.ModuleType, real: Callable[[Any, Any], Any]) -> None:
        self._real = real
        self._resolve = serialize._resolve_schema_cls
        self._schema_ns = vars(serialize.schema)
        self._union_base = serialize._Union
        self._plans: dict[Any, tuple[int, Any]] = {}
        self.fallbacks = 0

    def __call__(self, cls: Any, data: Any) -> Any:
        try:
            return self._decode(cls, data)
        except Exception:
            self.fallbacks += 1
            return self._real(cls, data)

    def _plan(self, cls: Any) -> tuple[int, Any]:
        plan = self._plans.get(cls)
        if plan is not None:
            return plan
        target = self._resolve(cls)
        if isinstance(target, str):
            raise AssertionError(f"Unresolved class type: '{target}'.")
        origin = typing.get_origin(target)
        args = typing.get_args(target)
        if origin is typing.Annotated:
            plan = (self._ANNOTATED, target.__origin__)
        elif origin in (typing.Union, types.UnionType) and type(None) in args:
            if len(args) != 2:
                raise AssertionError(f"expected 2 type args, got {len(args)}")
            plan = (self._OPTIONAL, args[0])
        elif isinstance(target, type) and issubclass(target, self._union_base):
            plan = (self._UNION, (target, typing.get_type_hints(target, globalns=self._schema_ns)))
        elif dataclasses.is_dataclass(target):
            hints = typing.get_type_hints(target, globalns=self._schema_ns)
            names = tuple((f.name, hints[f.name]) for f in dataclasses.fields(target))
            plan = (self._DATACLASS, (target, names))
        else:
            plan = (self._OTHER, (target, args))
        self._plans[cls] = plan
        return plan

    def _decode(self, cls: Any, data: Any) -> Any:
        kind, how = self._plan(cls)
        if kind == self._DATACLASS:
            target, names = how
            decode = self._decode
            return target(**{name: decode(hint, data[name]) for name, hint in names if name in data})
        if kind == self._UNION:
            target, hints = how
            if not isinstance(data, dict) or len(data) != 1:
                raise AssertionError(f"expected a dict with 1 key, got {data!r:.80}")
            ((tag, value),) = data.items()
            return target.create(**{tag: self._decode(hints[tag], value)})
        if kind == self._ANNOTATED:
            return self._decode(how, data)
        if kind == self._OPTIONAL:
            return None if data is None else self._decode(how, data)
        target, args = how
        if isinstance(data, list):
            if not data:
                return data
            return [self._decode(args[0], item) for item in data]
        if isinstance(data, dict):
            return {key: self._decode(args[1], value) for key, value in data.items()}
        if target is float:
            return float(data)
        return data


def _module_with(real: types.ModuleType, **overrides: Any) -> types.ModuleType:
    """A module object with ``real``'s attributes, some replaced; ``real`` is not modified."""
    shim = types.ModuleType(real.__name__, real.__doc__)
    shim.__dict__.update(real.__dict__)
    shim.__dict__.update(overrides)
    return shim


# --------------------------------------------------------------------------- memory-mapped records


@dataclass
class _MappedFile:
    """One copy-on-write mapping of a zip written by torch, and where its records lie."""

    path: str
    records: dict[str, tuple[int, int]]  # record name (archive prefix removed) -> (offset, size)
    storage: torch.UntypedStorage | None = None
    mapped_records: int = 0

    @classmethod
    def open(cls, path: str) -> _MappedFile:
        records: dict[str, tuple[int, int]] = {}
        with open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
            infos = zf.infolist()
            for info in infos:
                _, sep, name = info.filename.partition("/")
                if not sep or info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                    continue  # not addressable as raw bytes: torch's builder will copy it
                fh.seek(info.header_offset)
                header = fh.read(30)
                if len(header) != 30 or header[:4] != b"PK\x03\x04":
                    continue
                name_len = int.from_bytes(header[26:28], "little")
                extra_len = int.from_bytes(header[28:30], "little")
                records[name] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
        return cls(path=path, records=records)

    def whole(self) -> torch.UntypedStorage:
        if self.storage is None:
            size = os.path.getsize(self.path)
            # shared=False: MAP_PRIVATE, pages are read lazily and writes stay in this process
            self.storage = torch.UntypedStorage.from_file(self.path, False, size)
        return self.storage


_OWNED = threading.local()  # .mapped: _MappedFile | None, for the thread that opened the scope


def _mapped_build_file_map(real: Callable[..., dict[str, torch.Tensor]], serialize: types.ModuleType):
    def _build_file_map(archive_reader: Any, config: Any, base_dir: str) -> dict[str, torch.Tensor]:
        mapped: _MappedFile | None = getattr(_OWNED, "mapped", None)
        if mapped is None:
            return real(archive_reader, config, base_dir)
        reader = archive_reader.archive_file
        plan: dict[str, tuple[Any, torch.dtype, int, int]] = {}  # path_name -> (meta, dtype, offset, size)
        for meta in config.config.values():
            if meta.use_pickle or meta.path_name in plan:
                continue
            record = os.path.join(base_dir, meta.path_name)
            if meta.tensor_meta is None or record not in mapped.records:
                return real(archive_reader, config, base_dir)
            dtype = serialize.deserialize_scalar_type(meta.tensor_meta.dtype)
            if serialize.deserialize_device(meta.tensor_meta.device) != torch.device("cpu"):
                return real(archive_reader, config, base_dir)
            offset, size = mapped.records[record]
            # the archive torch opened must be the file we mapped, record for record
            same = reader.get_record_size(record) == size
            if not same or (size and reader.get_record_offset(record) != offset):
                return real(archive_reader, config, base_dir)
            element = torch.empty((), dtype=dtype).element_size()
            if size % element or offset % element:
                return real(archive_reader, config, base_dir)
            plan[meta.path_name] = (meta, dtype, offset, size)
        file_map: dict[str, torch.Tensor] = {}
        for path_name, (meta, dtype, offset, size) in plan.items():
            if size == 0:
                tensor = torch.zeros(serialize.deserialize_size(meta.tensor_meta.sizes), dtype=dtype)
            else:
                numel = size // torch.empty((), dtype=dtype).element_size()
                tensor = torch.empty(0, dtype=dtype)
                tensor.set_(mapped.whole()[offset : offset + size], 0, (numel,), (1,))
                mapped.mapped_records += 1
            if meta.tensor_meta.requires_grad:
                tensor.requires_grad_(True)
            file_map[path_name] = tensor
        return file_map

    return _build_file_map


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
