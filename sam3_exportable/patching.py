"""Declared runtime patches and the transactional context manager that applies them.

A :class:`Patch` is one declared fix to one upstream attribute: its dotted target, why
it exists (the exact export error or silent specialization it prevents), when it is
needed, and a fingerprint of the upstream source it was written against. Every patch is
applied as a ``wrapt.FunctionWrapper`` around the upstream object, so the original is
always reachable through ``__wrapped__`` and :func:`original_of`.

:class:`PatchSession` applies a set of patches with an undo stack: entering applies them
in order, leaving (normally or through an exception) reverts them in reverse order, a
nested or repeated application never wraps a wrapper (the true original is kept), and a
target that moved or whose source changed raises :class:`UpstreamMismatchError` naming
the patch before anything is changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import logging
import textwrap
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import wrapt

from .errors import UpstreamMismatchError

__all__ = [
    "Patch",
    "PatchContext",
    "PatchSession",
    "is_patched",
    "original_of",
    "resolve_target",
    "source_fingerprint",
]

log = logging.getLogger(__name__)

#: Attribute set on every wrapper this library installs, holding the owning Patch.
_MARKER = "_self_sam3_exportable_patch"  # wrapt keeps _self_* names on the wrapper


@dataclasses.dataclass(frozen=True)
class PatchContext:
    """What a patch's ``needed`` predicate is asked about."""

    torch_version: str
    strict: bool
    device: str  # "cpu" or "cuda"
    cuda_available: bool


def source_fingerprint(obj: Any) -> str:
    """Return the sha256 (first 16 hex digits) of ``obj``'s dedented source code.

    ``obj`` may be a function, a method, a class, or a ``staticmethod``/``classmethod``
    descriptor. Raises ``TypeError`` or ``OSError`` when no source is available.
    """
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    obj = inspect.unwrap(obj)
    source = textwrap.dedent(inspect.getsource(obj))
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]


def _split_target(target: str) -> tuple[str, str]:
    """Split ``"pkg.mod.Class.attr"`` into the importable module and the attribute path."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:i])
        try:
            importlib.import_module(module_name)
        except ImportError:
            continue
        return module_name, ".".join(parts[i:])
    raise ImportError(f"no importable module in target {target!r}")


def resolve_target(target: str) -> tuple[Any, str, Any]:
    """Resolve a dotted upstream path to ``(parent, attribute, current_value)``.

    Attributes of classes are looked up through the class ``__dict__`` along the MRO (so
    ``staticmethod`` objects come back unbound). Raises ``ImportError`` or
    ``AttributeError`` when the target does not exist.
    """
    module_name, attr_path = _split_target(target)
    return wrapt.resolve_path(module_name, attr_path)


def _sam3_version() -> str:
    try:
        from importlib.metadata import version

        return version("sam3")
    except Exception:  # pragma: no cover - metadata missing only in odd installs
        return "unknown"


def is_patched(obj: Any) -> bool:
    """True if ``obj`` (an upstream attribute value) is a wrapper installed by this library."""
    return getattr(obj, _MARKER, None) is not None


def original_of(obj: Any) -> Any:
    """Return the true upstream object behind any number of this library's wrappers."""
    while is_patched(obj):
        obj = obj.__wrapped__
    return obj


Wrapper = Callable[[Callable[..., Any], Any, tuple[Any, ...], dict[str, Any]], Any]


@dataclasses.dataclass(frozen=True)
class Patch:
    """One declared runtime fix to one upstream attribute.

    Attributes:
        name: unique, stable identifier (``"<upstream file>.<what>"``).
        target: dotted path of the upstream attribute, e.g.
            ``"sam3.model.decoder.TransformerDecoder._get_rpb_matrix"``.
        why: the exact export error or silent specialization the patch prevents.
        when: human-readable statement of when it is needed.
        fingerprint: :func:`source_fingerprint` of the upstream source it was written for.
        wrapper: ``wrapper(wrapped, instance, args, kwargs)`` as in ``wrapt``; it must keep
            upstream numerics bitwise (a patch that cannot says so in ``why``).
        needed: predicate over a :class:`PatchContext`; the default set holds the patches
            for which it returns True (opt-in patches return False everywhere).
        replaces: True when the wrapper re-implements the function instead of calling the
            original; ``rationale`` then says in one line why a hook could not do it.
        fixed_upstream: optional predicate over the upstream source text that returns True
            when upstream already carries the fix (reported by ``doctor``).
    """

    name: str
    target: str
    why: str
    when: str
    fingerprint: str
    wrapper: Wrapper
    needed: Callable[[PatchContext], bool] = lambda ctx: True
    replaces: bool = False
    rationale: str = ""
    fixed_upstream: Callable[[str], bool] | None = None

    def resolve(self) -> tuple[Any, str, Any]:
        """Resolve the target; raise :class:`UpstreamMismatchError` if it is gone."""
        try:
            return resolve_target(self.target)
        except (ImportError, AttributeError) as exc:
            raise UpstreamMismatchError(
                f"patch {self.name!r}: upstream target {self.target} is missing in the "
                f"installed sam3 {_sam3_version()} ({exc}); upstream moved, this patch "
                "must be reviewed"
            ) from exc

    def current_fingerprint(self) -> str:
        """Fingerprint of the installed upstream source of the target (unwrapped)."""
        _, _, value = self.resolve()
        return source_fingerprint(original_of(value))

    def upstream_source(self) -> str:
        """Source text of the installed upstream target (unwrapped)."""
        _, _, value = self.resolve()
        value = original_of(value)
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        return textwrap.dedent(inspect.getsource(value))

    def check(self) -> None:
        """Raise :class:`UpstreamMismatchError` if the target's source is not the one
        this patch was written against."""
        found = self.current_fingerprint()
        if found != self.fingerprint:
            raise UpstreamMismatchError(
                f"patch {self.name!r}: the source of {self.target} in the installed sam3 "
                f"{_sam3_version()} has fingerprint {found}, but the patch was written "
                f"against {self.fingerprint}; upstream changed, review the patch (or skip "
                f"it explicitly with skip_mismatched=[{self.name!r}])"
            )


@dataclasses.dataclass
class _Applied:
    patch: Patch
    parent: Any
    attribute: str
    previous: Any
    owned: bool  # the attribute lived in parent's own __dict__ before we patched


class PatchSession:
    """Apply a sequence of patches transactionally (see module docstring).

    Use as a context manager; :meth:`apply` and :meth:`revert` are also public for
    callers that manage the lifetime themselves. Raises :class:`UpstreamMismatchError` on
    enter when a target is missing or its fingerprint differs, unless the patch's name is
    in ``skip_mismatched`` (then it is skipped and a warning is logged).
    """

    def __init__(self, patches: Sequence[Patch], skip_mismatched: Iterable[str] = ()) -> None:
        names = [p.name for p in patches]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"patches: each patch may appear once, repeated: {sorted(dupes)}")
        self.patches = tuple(patches)
        self.skip_mismatched = frozenset(skip_mismatched)
        unknown = self.skip_mismatched - set(names)
        if unknown:
            raise ValueError(f"skip_mismatched: unknown patch names {sorted(unknown)}; known: {names}")
        self._stack: list[_Applied] = []
        self.skipped: list[str] = []

    @property
    def active(self) -> tuple[str, ...]:
        """Names of the patches currently applied by this session, in order."""
        return tuple(a.patch.name for a in self._stack)

    def apply(self) -> None:
        if self._stack:
            raise RuntimeError("PatchSession.apply: this session is already applied")
        # Validate everything first: nothing is touched if any patch does not fit.
        to_apply: list[Patch] = []
        self.skipped = []
        for patch in self.patches:
            try:
                patch.check()
            except UpstreamMismatchError:
                if patch.name not in self.skip_mismatched:
                    raise
                log.warning("sam3_exportable: skipping mismatched patch %s", patch.name)
                self.skipped.append(patch.name)
                continue
            to_apply.append(patch)
        try:
            for patch in to_apply:
                self._apply_one(patch)
        except BaseException:
            self.revert()
            raise

    def _apply_one(self, patch: Patch) -> None:
        parent, attribute, current = patch.resolve()
        owned = attribute in vars(parent) if inspect.isclass(parent) else True
        # Already wrapped by this patch (nested sessions, or a copy of it with the same
        # name): keep the outer wrapper, never wrap a wrapper, so the original stays one
        # __wrapped__ away.
        applied = getattr(current, _MARKER, None)
        if applied is not None and applied.name == patch.name:
            return
        wrapper = wrapt.FunctionWrapper(current, patch.wrapper)
        setattr(wrapper, _MARKER, patch)
        setattr(parent, attribute, wrapper)
        self._stack.append(_Applied(patch, parent, attribute, current, owned))
        log.debug("sam3_exportable: applied %s to %s", patch.name, patch.target)

    def revert(self) -> None:
        """Undo every applied patch, in reverse order. Safe to call more than once."""
        errors: list[BaseException] = []
        while self._stack:
            applied = self._stack.pop()
            try:
                if applied.owned:
                    setattr(applied.parent, applied.attribute, applied.previous)
                else:
                    delattr(applied.parent, applied.attribute)
            except BaseException as exc:  # keep reverting the rest
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> PatchSession:
        self.apply()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.revert()


def is_tracing() -> bool:
    """True while torch.export / torch.compile traces (strict or non-strict)."""
    return bool(torch.compiler.is_compiling())
