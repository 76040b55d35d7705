"""Tracing the pipeline: ``export_full_pipeline`` and the dynamic-shape audit of programs."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import sympy
import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from ..artifact.manifest import ModelInfo
from ..artifact.program import Provenance, attach_provenance
from ..contract import DYNAMIC_DIMS
from ..errors import DynamicShapeAuditError
from ..patching.selection import exportable_sam3
from .builders import build_info
from .pipeline import FullSam3PipelineWrapper, synthetic_inputs

__all__ = [
    "DYNAMIC_DIMS",
    "EXAMPLE_BATCH",
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


def _bound(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("inf")


def audit_dynamic_shapes(
    ep: ExportedProgram, dims: Sequence[tuple[int, int, str]] = DYNAMIC_DIMS
) -> AuditReport:
    """Prove that the given input dims of ``ep`` stayed dynamic with range ``[1, inf)``.

    Checks, for each ``(user input index, dim, name)``: the placeholder's size is a
    symbol (not a specialized int, not an expression), the program's range constraint
    for it is exactly ``[1, inf)``, and no runtime assert or range-constraint node of the
    graph mentions it (a hidden ``Eq(batch*num_prompts, 6)`` is exactly such a node).

    Raises :class:`DynamicShapeAuditError` naming the offending dim and constraint.
    """
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    user_inputs = list(ep.graph_signature.user_inputs)
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
        symbols[name] = expr
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
    return AuditReport(
        symbols={name: str(sym) for name, sym in symbols.items()},
        ranges=ranges,
        other_asserts=tuple(other),
    )


def example_inputs(
    wrapper: FullSam3PipelineWrapper,
    batch: int = EXAMPLE_BATCH,
    prompts: int = EXAMPLE_PROMPTS,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~.pipeline.synthetic_inputs` sized for ``wrapper``."""
    return synthetic_inputs(wrapper.image_size, wrapper.context_length, batch, prompts, seed)


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
) -> ExportedProgram:
    """Export image encoder through segmentation head as one program with dynamic
    ``batch`` (B >= 1) and ``num_prompts`` (P >= 1), inside :func:`exportable_sam3`.

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
    if example_batch < 2 or example_prompts < 2:
        raise ValueError(
            f"export_full_pipeline: example_batch and example_prompts must be >= 2 to avoid "
            f"size-1 specialization, got {example_batch} and {example_prompts}"
        )
    model.eval()
    wrapper = FullSam3PipelineWrapper(model, autocast_dtype=autocast_dtype).eval()
    args = example_inputs(wrapper, example_batch, example_prompts)
    dynamic_shapes = tuple({dim: Dim(name, min=1)} for _, dim, name in DYNAMIC_DIMS)
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
