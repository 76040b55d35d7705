"""A faster ``torch.export.load`` for large ``.pt2`` files, built on torch's own loader.

:func:`load_program` calls :func:`torch.export.load` itself, inside :func:`fast_load_scope`, a
context manager that swaps pieces of torch's deserializer for equivalents while it is open
and puts the originals back on exit (also on exceptions):

* ``_dict_to_dataclass`` (JSON to schema dataclasses) in ``torch._export.serde.serialize``
  becomes :class:`_SchemaDecoder`, which applies the same rules but decides once per target
  type instead of on each of ~400k calls; on any surprise it hands the value to torch's
  function. ``typing.get_type_hints`` and ``dataclasses.fields`` as seen by that module (and
  ``fields`` in ``torch._export.serde.union``) are memoized per class: their answers for a
  class never change while a file is read. (Unmodified, this step takes ~8.5 s of a 23 s load.)
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

If one of these internals is missing or has another shape (another torch version),
:func:`check_internals` names it and :func:`load_program` raises :class:`FastLoadUnavailable`
before touching anything; callers fall back to plain ``torch.export.load``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import os
import re
import threading
import types
import typing
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["FastLoadUnavailable", "check_internals", "fast_load_scope", "gc_paused", "load_program"]

_SERIALIZE = "torch._export.serde.serialize"
_PACKAGE = "torch.export.pt2_archive._package"
_UNION = "torch._export.serde.union"
_BUILD_FILE_MAP_PARAMS = ["archive_reader", "config", "base_dir"]
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MISSING = object()


class FastLoadUnavailable(RuntimeError):
    """The torch internals the fast path relies on are missing or changed; use torch.export.load."""


def _import(name: str) -> types.ModuleType:
    import importlib

    return importlib.import_module(name)


def check_internals() -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """Return torch's (serialize, _package, union) modules, or raise FastLoadUnavailable naming what
    is missing. Touches nothing."""
    try:
        serialize = _import(_SERIALIZE)
        package = _import(_PACKAGE)
        union = _import(_UNION)
    except ImportError as exc:
        raise FastLoadUnavailable(f"cannot import {exc.name or exc}") from exc
    for attr, kind in (("typing", typing), ("sympy", None), ("dataclasses", dataclasses)):
        value = getattr(serialize, attr, None)
        if not isinstance(value, types.ModuleType) or (kind is not None and value is not kind):
            raise FastLoadUnavailable(f"{_SERIALIZE}.{attr} is not the {attr} module")
    if not callable(getattr(serialize.sympy, "sympify", None)):
        raise FastLoadUnavailable("sympy.sympify is missing")
    if not isinstance(getattr(serialize, "schema", None), types.ModuleType):
        raise FastLoadUnavailable(f"{_SERIALIZE}.schema is not a module")
    if getattr(union, "fields", None) is not dataclasses.fields:
        raise FastLoadUnavailable(f"{_UNION}.fields is not dataclasses.fields")
    build = getattr(package, "_build_file_map", None)
    if build is None or not callable(build):
        raise FastLoadUnavailable(f"{_PACKAGE}._build_file_map is missing")
    params = list(inspect.signature(build).parameters)
    if params != _BUILD_FILE_MAP_PARAMS:
        raise FastLoadUnavailable(
            f"{_PACKAGE}._build_file_map takes {params}, expected {_BUILD_FILE_MAP_PARAMS}"
        )
    for attr in (
        "deserialize_scalar_type",
        "deserialize_device",
        "deserialize_size",
        "_dict_to_dataclass",
        "_resolve_schema_cls",
        "_Union",
    ):
        if not callable(getattr(serialize, attr, None)):
            raise FastLoadUnavailable(f"{_SERIALIZE}.{attr} is missing")
    for attr in ("get_record_offset", "get_record_size"):
        if not hasattr(torch._C.PyTorchFileReader, attr):
            raise FastLoadUnavailable(f"torch._C.PyTorchFileReader.{attr} is missing")
    if not hasattr(torch.UntypedStorage, "from_file"):
        raise FastLoadUnavailable("torch.UntypedStorage.from_file is missing")
    return serialize, package, union


# --------------------------------------------------------------------------- memoized pure functions


class _Memo:
    """Caches shared by all open scopes; emptied when the last scope closes."""

    def __init__(self) -> None:
        self.type_hints: dict[tuple[Any, int], tuple[dict[str, Any], Any]] = {}
        self.sympify: dict[tuple[Any, ...], tuple[Any, tuple[Any, ...]]] = {}
        self.idents: dict[str, tuple[str, ...]] = {}
        self.fields: dict[type, tuple[Any, ...]] = {}
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self.type_hints.clear()
        self.sympify.clear()
        self.idents.clear()
        self.fields.clear()


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


@dataclass
class _ScopeState:
    depth: int = 0
    memo: _Memo = field(default_factory=_Memo)
    originals: dict[str, Any] = field(default_factory=dict)
    modules: tuple[Any, ...] = ()


_LOCK = threading.RLock()
_STATE = _ScopeState()
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


def _install(serialize: types.ModuleType, package: types.ModuleType, union: types.ModuleType) -> None:
    memo = _STATE.memo
    real_typing, real_sympy = serialize.typing, serialize.sympy
    real_dataclasses = serialize.dataclasses
    _STATE.originals = {
        "typing": real_typing,
        "sympy": real_sympy,
        "dataclasses": real_dataclasses,
        "_build_file_map": package._build_file_map,
        "union.fields": union.fields,
        "_dict_to_dataclass": serialize._dict_to_dataclass,
    }
    serialize.typing = _module_with(
        real_typing, get_type_hints=_memo_get_type_hints(real_typing.get_type_hints, memo)
    )
    serialize.sympy = _module_with(real_sympy, sympify=_memo_sympify(real_sympy.sympify, real_sympy, memo))
    memo_fields = _memo_fields(real_dataclasses.fields, memo)
    serialize.dataclasses = _module_with(real_dataclasses, fields=memo_fields)
    union.fields = memo_fields
    serialize._dict_to_dataclass = _SchemaDecoder(serialize, serialize._dict_to_dataclass)
    package._build_file_map = _mapped_build_file_map(package._build_file_map, serialize)


def _restore(serialize: types.ModuleType, package: types.ModuleType, union: types.ModuleType) -> None:
    targets = {
        "typing": (serialize, "typing"),
        "sympy": (serialize, "sympy"),
        "dataclasses": (serialize, "dataclasses"),
        "_build_file_map": (package, "_build_file_map"),
        "union.fields": (union, "fields"),
        "_dict_to_dataclass": (serialize, "_dict_to_dataclass"),
    }
    for key, original in _STATE.originals.items():
        owner, attr = targets[key]
        setattr(owner, attr, original)
    _STATE.originals = {}
    _STATE.memo.clear()


@contextlib.contextmanager
def fast_load_scope(path: str | os.PathLike[str] | None = None) -> Iterator[_MappedFile | None]:
    """Install the substitutions described in the module docstring; restore them on exit.

    While open, ``torch.export.load`` called *by this thread* on ``path`` maps weight and
    constant records from the file instead of copying them (``path=None``: copy as usual, only
    the memoization applies). Scopes may nest and may be open in several threads: the
    substitutions are installed by the first scope to open and removed (and the caches
    emptied) by the last to close, under a lock, even when the body raises. Yields the
    file's mapping record (``None`` without ``path``) so callers can see how many records
    were mapped. Raises FastLoadUnavailable (having changed nothing) if torch's internals
    differ from what this module expects.
    """
    with _LOCK:
        if _STATE.depth == 0:
            _STATE.modules = check_internals()  # raises before anything is changed
            try:
                _install(*_STATE.modules)
            except BaseException:
                _restore(*_STATE.modules)
                raise
        _STATE.depth += 1
        modules = _STATE.modules
    try:
        mapped = _MappedFile.open(os.fspath(path)) if path is not None else None
    except BaseException:
        _leave(modules)
        raise
    previous = getattr(_OWNED, "mapped", None)
    _OWNED.mapped = mapped
    try:
        yield mapped
    finally:
        _OWNED.mapped = previous
        _leave(modules)


def _leave(modules: tuple[types.ModuleType, types.ModuleType, types.ModuleType]) -> None:
    with _LOCK:
        _STATE.depth -= 1
        if _STATE.depth == 0:
            _restore(*modules)
            _STATE.modules = ()


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
