"""The one engine that applies every scoped replacement in this project.

A :class:`Patch` is one declared replacement of one attribute of code we do not own
(upstream ``sam3``, or torch's deserializer for fast loading): its dotted target, why it
exists, when it is needed, and what it was written against (a fingerprint of the target's
source, and/or a check of the current value). It installs either a ``wrapt.FunctionWrapper``
around the current value (``wrapper``) or a value built from it (``replacement``, for
module objects and other non-functions). The original stays reachable through
``__wrapped__`` and :func:`original_of`.

:class:`PatchSession` applies a sequence of patches as a transaction: entering validates
every target first (:class:`~sam3_exportable.errors.UpstreamMismatchError` naming the patch
before anything changes), then applies them in order; leaving (normally or through an
exception) releases them in reverse order; a failure half-way releases what was taken.

Patches are **process-wide**: an installed patch is seen by every thread, inside a session
or not. Sessions share them through reference counts kept under one lock: the first session
that needs a patch installs it, later ones take a reference, and the last one to leave
reverts it, so sessions in several threads, nested sessions and sessions exited in any order
all keep their patches for as long as they are open. A patch is never wrapped twice (two
patches of the same name share one installation). Several patches of one target stack: the
value installed is the original wrapped by every held patch, innermost first by
``(stack_order, name)``, rebuilt from the original whenever the set changes, so any of them
can leave first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import logging
import textwrap
import threading
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import wrapt

from ..errors import UpstreamMismatchError
from .when import PatchContext, always

__all__ = [
    "Patch",
    "PatchSession",
    "installed_patches",
    "is_patched",
    "original_of",
    "resolve_target",
    "source_fingerprint",
]

log = logging.getLogger(__name__)

#: Attribute set on every value this engine installs, holding the owning Patch (wrapt keeps
#: ``_self_*`` names on the wrapper instead of forwarding them to the wrapped function).
_MARKER = "_self_sam3_exportable_patch"

Wrapper = Callable[[Callable[..., Any], Any, tuple[Any, ...], dict[str, Any]], Any]


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
    """Resolve a dotted path to ``(parent, attribute, current_value)``.

    Attributes of classes are looked up through the class ``__dict__`` along the MRO (so
    ``staticmethod`` objects come back unbound). Raises ``ImportError`` or
    ``AttributeError`` when the target does not exist.
    """
    module_name, attr_path = _split_target(target)
    return wrapt.resolve_path(module_name, attr_path)


def _version_of(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:  # pragma: no cover - metadata missing only in odd installs
        return "unknown"


def is_patched(obj: Any) -> bool:
    """True if ``obj`` (an attribute value) was installed by this engine."""
    return getattr(obj, _MARKER, None) is not None


def original_of(obj: Any) -> Any:
    """Return the true original behind any number of this engine's installed values."""
    while is_patched(obj):
        obj = obj.__wrapped__
    return obj


@dataclasses.dataclass(frozen=True)
class Patch:
    """One declared replacement of one attribute.

    Attributes:
        name: unique, stable identifier (``"<file it patches>.<what>"``).
        target: dotted path of the attribute, e.g.
            ``"sam3.model.decoder.TransformerDecoder._get_rpb_matrix"``.
        why: the exact error, silent specialization or cost the patch prevents.
        when: human-readable statement of when it is needed.
        fingerprint: :func:`source_fingerprint` of the source it was written against, or
            None for targets without source (modules); checked before applying.
        wrapper: ``wrapper(wrapped, instance, args, kwargs)`` as in ``wrapt``; it must keep
            the original's numerics bitwise (a patch that cannot says so in ``why``).
        replacement: ``replacement(current) -> new value``, for targets a function wrapper
            cannot stand in for (modules); exactly one of ``wrapper`` and ``replacement``.
        expects: optional ``expects(current) -> problem or None``: a check of the current
            value beyond the fingerprint (a module's identity, a signature).
        needed: predicate over a :class:`PatchContext`; the default set holds the patches
            for which it returns True (opt-in patches return False everywhere).
        replaces: True when the wrapper re-implements the function instead of calling the
            original; ``rationale`` then says in one line why a hook could not do it.
        fixed_upstream: optional predicate over the target's source text that returns True
            when upstream already carries the fix (reported by ``doctor``).
        package: the distribution the target belongs to, named in mismatch messages.
        stack_order: where the patch sits among held patches of the same target (lower is
            innermost; ties by name).
    """

    name: str
    target: str
    why: str
    when: str
    fingerprint: str | None = None
    wrapper: Wrapper | None = None
    replacement: Callable[[Any], Any] | None = None
    expects: Callable[[Any], str | None] | None = None
    needed: Callable[[PatchContext], bool] = always
    replaces: bool = False
    rationale: str = ""
    fixed_upstream: Callable[[str], bool] | None = None
    package: str = "sam3"
    stack_order: int = 0

    def __post_init__(self) -> None:
        if (self.wrapper is None) == (self.replacement is None):
            raise ValueError(f"patch {self.name!r}: give exactly one of wrapper= and replacement=")

    def resolve(self) -> tuple[Any, str, Any]:
        """Resolve the target; raise :class:`UpstreamMismatchError` if it is gone."""
        try:
            return resolve_target(self.target)
        except (ImportError, AttributeError) as exc:
            raise UpstreamMismatchError(
                f"patch {self.name!r}: target {self.target} is missing in the installed "
                f"{self.package} {_version_of(self.package)} ({exc}); it moved, this patch "
                "must be reviewed"
            ) from exc

    def current_fingerprint(self) -> str:
        """Fingerprint of the installed source of the target (unwrapped)."""
        _, _, value = self.resolve()
        return source_fingerprint(original_of(value))

    def upstream_source(self) -> str:
        """Source text of the installed target (unwrapped)."""
        _, _, value = self.resolve()
        value = original_of(value)
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        return textwrap.dedent(inspect.getsource(value))

    def check(self) -> None:
        """Raise :class:`UpstreamMismatchError` if the target is not what this patch was
        written against (missing, other source, or rejected by ``expects``)."""
        _, _, value = self.resolve()
        original = original_of(value)
        if self.fingerprint is not None:
            try:
                found = source_fingerprint(original)
            except (TypeError, OSError) as exc:
                found = f"no source ({exc})"
            if found != self.fingerprint:
                raise UpstreamMismatchError(
                    f"patch {self.name!r}: the source of {self.target} in the installed "
                    f"{self.package} {_version_of(self.package)} has fingerprint {found}, but "
                    f"the patch was written against {self.fingerprint}; it changed, review the "
                    f"patch (or skip it explicitly with skip_mismatched=[{self.name!r}])"
                )
        if self.expects is not None:
            problem = self.expects(original)
            if problem:
                raise UpstreamMismatchError(
                    f"patch {self.name!r}: {self.target} in the installed {self.package} "
                    f"{_version_of(self.package)}: {problem}"
                )

    def build(self, current: Any) -> Any:
        """The value to install in place of ``current``, marked as this patch's."""
        if self.wrapper is not None:
            new: Any = wrapt.FunctionWrapper(current, self.wrapper)
        else:
            assert self.replacement is not None
            new = self.replacement(current)
            new.__wrapped__ = current
        setattr(new, _MARKER, self)
        return new


@dataclasses.dataclass
class _Target:
    """One patched attribute and the patches held on it, shared by every session."""

    target: str
    parent: Any
    attribute: str
    original: Any
    owned: bool  # the attribute lived in parent's own __dict__ before
    patches: dict[str, Patch] = dataclasses.field(default_factory=dict)
    holders: dict[str, int] = dataclasses.field(default_factory=dict)
    #: names of the patches in the value set now, innermost first (empty: the original)
    installed: tuple[str, ...] = ()

    def wanted(self) -> tuple[str, ...]:
        held = [self.patches[name] for name, count in self.holders.items() if count > 0]
        return tuple(p.name for p in sorted(held, key=lambda p: (p.stack_order, p.name)))


#: Guards _TARGETS and every install/revert.
_LOCK = threading.RLock()
#: target path -> its state, for every target patched in this process
_TARGETS: dict[str, _Target] = {}


def installed_patches() -> dict[str, int]:
    """Names of the patches installed in this process now, with their holder counts (0 for a
    patch whose revert failed and is still in place)."""
    with _LOCK:
        return {name: t.holders.get(name, 0) for t in _TARGETS.values() for name in t.installed}


def _install(t: _Target) -> None:
    """Set the original wrapped by every wanted patch, innermost first."""
    value = t.original
    for name in t.wanted():
        value = t.patches[name].build(value)
    setattr(t.parent, t.attribute, value)


def _restore(t: _Target) -> None:
    if t.owned:
        setattr(t.parent, t.attribute, t.original)
    else:
        delattr(t.parent, t.attribute)


def _settle(t: _Target) -> None:
    """Make the attribute hold what the held patches ask for; forget an unpatched target.
    On failure the attribute keeps its previous value and ``installed`` says so."""
    wanted = t.wanted()
    if wanted == t.installed:
        return
    if wanted:
        _install(t)
    else:
        _restore(t)
    t.installed = wanted
    if not wanted:
        _TARGETS.pop(t.target, None)


class PatchSession:
    """Apply a sequence of patches transactionally (see the module docstring).

    Use as a context manager; :meth:`apply` and :meth:`revert` are also public for callers
    that manage the lifetime themselves. Raises :class:`UpstreamMismatchError` on enter when
    a target is missing or differs, unless the patch's name is in ``skip_mismatched`` (then
    it is skipped and a warning is logged).
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
        # (target state, patch name, installed by this session), in the order taken
        self._held: list[tuple[_Target, str, bool]] = []
        self.skipped: list[str] = []

    @property
    def active(self) -> tuple[str, ...]:
        """Names of the patches this session installed itself, in order."""
        return tuple(name for _, name, own in self._held if own)

    @property
    def held(self) -> tuple[str, ...]:
        """Names of every patch in effect for this session (installed by it or shared with
        another session), in order: what an artifact exported inside it was built with."""
        return tuple(name for _, name, _ in self._held)

    def apply(self) -> None:
        with _LOCK:
            if self._held:
                raise RuntimeError("PatchSession.apply: this session is already applied")
            # Validate everything first: nothing is touched if any patch does not fit.
            to_apply: list[Patch] = []
            self.skipped = []
            for patch in self.patches:
                state = _TARGETS.get(patch.target)
                try:
                    if state is None or patch.name not in state.installed:
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
                self._release_all()
                raise

    def _apply_one(self, patch: Patch) -> None:
        """Take ``patch``: share its installation, or install it (caller holds the lock)."""
        state = _TARGETS.get(patch.target)
        if state is None:
            parent, attribute, current = patch.resolve()
            owned = attribute in vars(parent) if inspect.isclass(parent) else True
            state = _TARGETS[patch.target] = _Target(patch.target, parent, attribute, current, owned)
        own = state.holders.get(patch.name, 0) == 0 and patch.name not in state.installed
        state.patches.setdefault(patch.name, patch)
        state.holders[patch.name] = state.holders.get(patch.name, 0) + 1
        try:
            _settle(state)
        except BaseException:
            state.holders[patch.name] -= 1
            if not state.installed and not state.wanted():
                _TARGETS.pop(patch.target, None)
            raise
        self._held.append((state, patch.name, own))
        log.debug("sam3_exportable: holding %s on %s", patch.name, patch.target)

    def _release_all(self) -> None:
        errors: list[BaseException] = []
        while self._held:
            state, name, _ = self._held.pop()
            state.holders[name] -= 1
            try:
                _settle(state)
            except BaseException as exc:  # keep reverting the rest; a later release retries it
                errors.append(exc)
        if errors:
            raise errors[0]

    def revert(self) -> None:
        """Release every patch this session holds, in reverse order; the last holder of a
        patch reverts it. Safe to call more than once. If restoring one attribute fails, the
        rest are still released and the first error is raised; that attribute keeps its
        patched value (``installed_patches`` shows it with no holder) and the next session
        that takes or releases a patch of it settles it again."""
        with _LOCK:
            self._release_all()

    def __enter__(self) -> PatchSession:
        self.apply()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.revert()
