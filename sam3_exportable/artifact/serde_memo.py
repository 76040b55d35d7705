"""Memoized stand-ins for the pure steps of torch's ``.pt2`` deserializer (used by
:mod:`.fast_load`): each returns exactly what the function it stands in for returns.

* :func:`_memo_get_type_hints` and :func:`_memo_fields`: ``typing.get_type_hints`` and
  ``dataclasses.fields`` per class, whose answers never change while a file is read;
* :func:`_memo_sympify`: ``sympy.sympify`` of a string, keyed by the string, sympy's global
  ``evaluate`` flag and the identity of every ``locals`` binding whose name occurs in it;
* :class:`_SchemaDecoder`: ``_dict_to_dataclass`` deciding per target type once.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from typing import Any

__all__ = ["_Memo", "_SchemaDecoder", "_memo_fields", "_memo_get_type_hints", "_memo_sympify", "_module_with"]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MISSING = object()


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
