"""Tracing the pipeline: ``export_full_pipeline`` and the dynamic-shape audit of programs."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterator, Sequence

import sympy
import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.export import Dim, ExportedProgram

from ..artifact.manifest import ModelInfo
from ..artifact.program import Provenance, attach_provenance
from ..contract import DYNAMIC_DIMS, dynamic_dims
from ..errors import DynamicShapeAuditError
from ..patching.selection import exportable_sam3
from .builders import build_info
from .pipeline import FullSam3PipelineWrapper, synthetic_inputs

__all__ = [
    "DYNAMIC_DIMS",
    "EXAMPLE_BATCH",
    "EXAMPLE_BOXES",
    "EXAMPLE_PROMPTS",
    "AuditReport",
    "audit_dynamic_shapes",
    "example_inputs",
    "export_full_pipeline",
]

#: Trace sizes of :func:`export_full_pipeline`. Both must be >= 2, or the trace takes
#: size-1 branches. They are also the size hints the saved program carries, and AOTInductor
#: plans its C++ loops by them: a hint equal to the thread count (or at least twice it)
#: makes inductor parallelize batch-outer loops over the batch alone, so runs at B=1 use
#: one thread there (:func:`..artifact.aoti.narrowed_parallelism`). 3 narrows only on
#: 3-thread hosts.
EXAMPLE_BATCH = 3
EXAMPLE_PROMPTS = 3
#: Box slots per pair of the box-capable trace (>= 2 for the same reason).
EXAMPLE_BOXES = 3

# Graph ops that carry runtime constraints on symbols.
_CONSTRAINT_OPS = {
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
}


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """What :func:`audit_dynamic_shapes` found: each dim's symbol and range, and the
    runtime asserts of the graph that do not involve those symbols."""

    symbols: dict[str, str]
    ranges: dict[str, tuple[int, float]]
    other_asserts: tuple[str, ...]

    def to_manifest(self) -> dict[str, object]:
        """The audit as the manifest records it (``"audit"``)."""
        return {"symbols": dict(self.symbols), "ranges": {k: [v[0], "inf"] for k, v in self.ranges.items()}}

    def summary(self) -> str:
        dims = ", ".join(
            f"{name}={self.symbols[name]}:[{lo}, {'inf' if hi == float('inf') else hi}]"
            for name, (lo, hi) in self.ranges.items()
        )
        return f"dynamic dims {dims}; {len(self.other_asserts)} runtime asserts on other symbols"


def _one_graph_dims(boxes: bool) -> tuple[tuple[int, int, str], ...]:
    """Every dynamic ``(input, dim, name)`` of the one graph: :func:`~..contract.dynamic_dims`
    and, box-capable, the box inputs' ``batch`` and ``num_prompts`` (dims 0 and 1) and the
    box labels' and validity's ``num_boxes``, which are the same symbols."""
    dims = dynamic_dims(boxes)
    if boxes:
        dims += ((2, 0, "batch"), (2, 1, "num_prompts"))
        for index in (3, 4):
            dims += ((index, 0, "batch"), (index, 1, "num_prompts"), (index, 2, "num_boxes"))
    return dims


def _bound(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("inf")


def audit_dynamic_shapes(
    ep: ExportedProgram,
    dims: Sequence[tuple[int, int, str]] | None = None,
    arg_names: Sequence[str] | None = None,
) -> AuditReport:
    """Prove that the given input dims of ``ep`` (by default every dynamic dim of the one
    graph, text-only or box-capable) stayed dynamic with range ``[1, inf)``.

    Checks, for each ``(user input index, dim, name)``: the placeholder's size is a
    symbol (not a specialized int, not an expression), the same symbol for every dim of one
    name (the inputs agree on ``batch``), the program's range constraint
    for it is exactly ``[1, inf)``, and no runtime assert or range-constraint node of the
    graph mentions it (a hidden ``Eq(batch*num_prompts, 6)`` is exactly such a node).

    ``arg_names``: the forward's positional argument names, for a program whose inputs nest
    (see :func:`_check_input_guards`). Raises :class:`DynamicShapeAuditError` naming the
    offending dim and constraint.
    """
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    user_inputs = list(ep.graph_signature.user_inputs)
    if dims is None:
        dims = _one_graph_dims(len(user_inputs) > len(DYNAMIC_DIMS))
    symbols: dict[str, sympy.Symbol] = {}
    for index, dim, name in dims:
        if index >= len(user_inputs):
            raise DynamicShapeAuditError(
                f"audit: expected user input #{index} for dim {name!r}, the program has "
                f"{len(user_inputs)} inputs"
            )
        val = placeholders[user_inputs[index]].meta["val"]
        size = val.shape[dim]
        if not isinstance(size, torch.SymInt):
            raise DynamicShapeAuditError(
                f"audit: dim {name!r} (input #{index} dim {dim}) was specialized to the "
                f"constant {size}; it must stay dynamic"
            )
        expr = size.node.expr
        if not isinstance(expr, sympy.Symbol):
            raise DynamicShapeAuditError(
                f"audit: dim {name!r} is the expression {expr}, expected a free symbol"
            )
        if symbols.setdefault(name, expr) != expr:
            raise DynamicShapeAuditError(
                f"audit: dim {name!r} of input #{index} dim {dim} is the symbol {expr}, expected the "
                f"same symbol {symbols[name]} as the other inputs' {name!r}"
            )
    ranges: dict[str, tuple[int, float]] = {}
    for name, sym in symbols.items():
        vr = ep.range_constraints.get(sym)
        if vr is None:
            raise DynamicShapeAuditError(f"audit: no range constraint for dim {name!r} ({sym})")
        lo, hi = _bound(vr.lower), _bound(vr.upper)
        if lo != 1 or hi != float("inf"):
            raise DynamicShapeAuditError(
                f"audit: dim {name!r} ({sym}) has range [{vr.lower}, {vr.upper}], expected [1, inf)"
            )
        ranges[name] = (int(lo), hi)
    by_symbol = {sym: name for name, sym in symbols.items()}
    other: list[str] = []
    for node in ep.graph.nodes:
        if node.op != "call_function" or node.target not in _CONSTRAINT_OPS:
            continue
        arg = node.args[0]
        val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg
        expr = val.node.expr if isinstance(val, (torch.SymBool, torch.SymInt)) else None
        free = getattr(expr, "free_symbols", set())
        hit = sorted(by_symbol[s] for s in free if s in by_symbol)
        text = f"{node.target}({expr if expr is not None else arg})"
        if hit:
            raise DynamicShapeAuditError(
                f"audit: runtime constraint {text} on dim(s) {hit} would reject shapes "
                f"that must work (node {node.name})"
            )
        other.append(text)
    _check_input_guards(ep, user_inputs, dims, arg_names)
    return AuditReport(
        symbols={name: str(sym) for name, sym in symbols.items()},
        ranges=ranges,
        other_asserts=tuple(other),
    )


#: Every size from 1 to this, in every combination, must pass the input guards.
_GUARD_GRID = 6


class _Sizes:
    """What an input guard reads of an input: ``.size()[dim]``."""

    def __init__(self, sizes: dict[int, int]) -> None:
        self._sizes = sizes

    def size(self) -> dict[int, int]:
        return self._sizes


def _check_input_guards(
    ep: ExportedProgram,
    user_inputs: Sequence[str],
    dims: Sequence[tuple[int, int, str]],
    arg_names: Sequence[str] | None = None,
) -> None:
    """Refuse input guards that reject sizes which must work.

    ``torch.export`` records, besides the graph's asserts, guards on the inputs' sizes that
    the program's module checks on every call (``ExportedProgram._guards_code``); a
    specialization such as ``P != 1`` hides there. Each guard is evaluated with every
    dynamic dim at every size from 1 to :data:`_GUARD_GRID`; one that fails anywhere raises
    :class:`DynamicShapeAuditError` naming it and the sizes. Guards name the forward's
    arguments: ``arg_names`` (positional, in order) for a program with nested inputs (a
    tuple of features), else the flat inputs' own names.
    """
    guards = tuple(getattr(ep, "_guards_code", None) or ())
    if not guards:
        return
    where: dict[tuple[str, int], str] = {}
    for index, dim, name in dims:
        where[(user_inputs[index], dim)] = name
    names = sorted(set(where.values()))
    compiled = [(guard, compile(guard, "<guard>", "eval")) for guard in guards]
    namespace = {"__builtins__": {}, "torch": _GuardTorch}
    for sizes in itertools.product(range(1, _GUARD_GRID + 1), repeat=len(names)):
        value = dict(zip(names, sizes, strict=True))
        leaves = [
            _Sizes({dim: value[dim_name] for (owner, dim), dim_name in where.items() if owner == name})
            for name in user_inputs
        ]
        if arg_names is None:
            inputs: dict[str, object] = dict(zip(user_inputs, leaves, strict=True))
        else:
            args, kwargs = pytree.tree_unflatten(leaves, ep.call_spec.in_spec)
            inputs = {**dict(zip(arg_names, args, strict=False)), **kwargs}  # arg_names may list unused boxes
        for guard, code in compiled:
            try:
                # torch's own guard text, made by the export in this process (never read from a file)
                ok = eval(code, namespace, {"L": inputs})
            except (KeyError, TypeError, ZeroDivisionError, IndexError) as exc:
                raise DynamicShapeAuditError(
                    f"audit: cannot evaluate the input guard {guard!r}: {exc}"
                ) from None
            if not ok:
                raise DynamicShapeAuditError(
                    f"audit: input guard {guard!r} rejects {value}, sizes that must work"
                )


class _GuardTorch:
    """The ``torch.sym_*`` functions guards call, on plain ints."""

    sym_min = staticmethod(min)
    sym_max = staticmethod(max)


def example_inputs(
    wrapper: FullSam3PipelineWrapper,
    batch: int = EXAMPLE_BATCH,
    prompts: int = EXAMPLE_PROMPTS,
    seed: int = 0,
    boxes: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """:func:`~.pipeline.synthetic_inputs` sized for ``wrapper`` (with ``boxes`` slots per
    pair: the box-capable program's five inputs)."""
    return synthetic_inputs(wrapper.image_size, wrapper.context_length, batch, prompts, seed, boxes)


def dynamic_shapes_of(boxes: bool) -> tuple[dict[int, Dim], ...]:
    """``torch.export``'s ``dynamic_shapes`` of the text-only or box-capable program: one
    :class:`~torch.export.Dim` per name of :func:`~..contract.dynamic_dims`, shared by every
    input that has it (a box input's dims 0 and 1 are ``batch`` and ``num_prompts``)."""
    dims = {name: Dim(name, min=1) for _, _, name in dynamic_dims(boxes)}
    shapes: tuple[dict[int, Dim], ...] = ({0: dims["batch"]}, {0: dims["num_prompts"]})
    if boxes:
        per_pair = {0: dims["batch"], 1: dims["num_prompts"], 2: dims["num_boxes"]}
        shapes += (per_pair, dict(per_pair), dict(per_pair))
    return shapes


def check_example_sizes(what: str, batch: int, prompts: int, boxes: int) -> None:
    """Raise ``ValueError`` naming ``what`` unless every trace size is >= 2 (a size-1 trace
    takes size-1 branches and specializes)."""
    if min(batch, prompts, boxes) < 2:
        raise ValueError(
            f"{what}: example_batch, example_prompts and example_boxes must be >= 2 to avoid "
            f"size-1 specialization, got {batch}, {prompts} and {boxes}"
        )


def export_full_pipeline(
    model: nn.Module,
    *,
    autocast_dtype: torch.dtype | None = None,
    strict: bool = False,
    example_batch: int = EXAMPLE_BATCH,
    example_prompts: int = EXAMPLE_PROMPTS,
    patches: dict | None = None,
    audit: bool = True,
    target: str = "pt2",
    boxes: bool = False,
    example_boxes: int = EXAMPLE_BOXES,
) -> ExportedProgram:
    """Export image encoder through segmentation head as one program with dynamic
    ``batch`` (B >= 1) and ``num_prompts`` (P >= 1), inside :func:`exportable_sam3`.

    With ``boxes=True`` the program is box-capable: it also takes ``boxes``, ``box_labels``
    and ``box_valid`` with a dynamic ``num_boxes`` (K >= 1; traced at ``example_boxes``,
    >= 2), see :mod:`..contract`.

    Traces with ``example_batch`` x ``example_prompts`` (both >= 2, so no branch on size 1
    is taken), then runs :func:`audit_dynamic_shapes`. ``patches`` is passed on to
    :func:`exportable_sam3` (``only``/``exclude``/``include``); ``target`` (``"pt2"`` or
    ``"onnx"``) selects the patch set for where the program goes next (for ONNX the
    parameters are also traced as not requiring grad, see :func:`_parameters_frozen`). The
    program carries
    its provenance (the model's :class:`~.builders.BuildInfo`, the patches the session held,
    the audit, the autocast dtype) for :func:`~..artifact.pt2.save_pipeline` and the other
    writers to record. Raises ``ValueError`` for example sizes below 2 and
    :class:`DynamicShapeAuditError` if the audit fails.

    ``strict=True`` raises ``NotImplementedError``: dynamo traces the function behind a
    ``wrapt`` wrapper (its ``__wrapped__``), so the runtime patches would silently not
    apply. Strict export needs upstream with ``patches/`` applied.
    """
    if strict:
        raise NotImplementedError(
            "export_full_pipeline(strict=True): strict export (dynamo) traces the original "
            "function behind each wrapt wrapper, so the runtime patches would silently not "
            "apply; use strict=False, or apply patches/*.patch to upstream and export it directly"
        )
    check_example_sizes("export_full_pipeline", example_batch, example_prompts, example_boxes)
    model.eval()
    wrapper = FullSam3PipelineWrapper(model, autocast_dtype=autocast_dtype).eval()
    args = example_inputs(wrapper, example_batch, example_prompts, boxes=example_boxes if boxes else None)
    dynamic_shapes = dynamic_shapes_of(boxes)
    frozen = _parameters_frozen(model) if target == "onnx" else contextlib.nullcontext()
    with frozen, exportable_sam3(target=target, **(patches or {})) as session:  # type: ignore[arg-type]
        ep = torch.export.export(wrapper, args, dynamic_shapes=dynamic_shapes, strict=False)
        held = session.held
    report = audit_dynamic_shapes(ep) if audit else None
    attach_provenance(
        ep,
        Provenance(
            model=ModelInfo.from_json(build_info(model).to_dict(), "model"),
            patches=tuple(held),
            autocast_dtype=_DTYPE_NAMES.get(wrapper.autocast_dtype),
            vocab_size=wrapper.vocab_size,
            audit=report.to_manifest() if report is not None else None,
        ),
    )
    return ep


@contextlib.contextmanager
def _parameters_frozen(model: nn.Module) -> Iterator[None]:
    """Trace with parameters that do not require grad, then restore each one's flag.

    For ONNX: with grad-requiring parameters, torch.onnx's type-promotion pass re-runs the
    graph's ``no_grad`` region on its own and fails on SDPA's output strides ("Cannot view a
    tensor with shape [17, s34*s69, 4, 16] ..."). Values are the same (eager outputs and the
    program's are bitwise equal either way).
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


#: How manifests and the command line name autocast dtypes.
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
