"""One declared patch that keeps the onnxscript optimizer linear in the graph's size.

The onnxscript rewriter tries every rule on every node. For a pattern with several output
nodes (the default rule set's ``SlicesSplit``: two Slices of one value become one Split),
``SimplePatternMatcher.match`` indexes every node of the graph by op *before* it tries the
given node as the pattern's first output node, so one rewrite pass costs O(nodes^2): most of
the optimizer's time on the full-size graph (docs/performance.md). :data:`ONNX_OPTIMIZER_PATCH`
answers "no match" at once when the node's op type or domain differs from the first output
node's, which is the first check the original makes on every combination it tries, so the
optimized graph is the same, byte for byte (``tests/test_onnx.py``).

:func:`optimizer_scope` applies it through the project's one patch engine; with another
onnxscript (the fingerprint differs) it logs a warning and the optimizer runs unpatched:
slower, same graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..patching.engine import Patch, PatchSession

__all__ = ["ONNX_OPTIMIZER_PATCH", "optimizer_scope"]

_MATCH = "onnxscript.rewriter._matcher.SimplePatternMatcher.match"


def _first_output_node_prefilter(
    wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``match(model, graph_or_function, node, *, verbose, remove_nodes, tracer)``: a failed
    MatchResult without indexing the graph when ``node`` cannot be the pattern's first output
    node; otherwise the original, unchanged (also whenever a tracer or verbosity asks for its
    messages)."""
    pattern = instance.pattern
    if len(args) == 3 and not kwargs.get("verbose") and kwargs.get("tracer") is None:
        node = args[2]
        if not pattern.has_single_output_node:
            first = pattern.output_nodes[0]
            if not (first.op.matches(node.op_type) and first.domain.matches(node.domain)):
                from onnxscript.rewriter import _basics

                reason = f"OpType mismatch: expected {first.op}, got {node.op_type}."
                return _basics.MatchResult().fail(reason)
    return wrapped(*args, **kwargs)


ONNX_OPTIMIZER_PATCH = Patch(
    name="onnxscript.multi_output_match_prefilter",
    target=_MATCH,
    why=(
        "for a pattern with several output nodes the matcher indexes the whole graph for every "
        "node it is tried on: O(nodes^2) per rewrite pass, minutes at full size"
    ),
    when="every optimized ONNX export (export_onnx with optimize=True), while torch.onnx.export runs",
    fingerprint="8d6717fcf865d69c",
    wrapper=_first_output_node_prefilter,
    package="onnxscript",
)


@contextlib.contextmanager
def optimizer_scope() -> Iterator[PatchSession]:
    """Hold :data:`ONNX_OPTIMIZER_PATCH` while the body runs (skipped with a warning when the
    installed onnxscript differs from what it was written against); yields the session, whose
    ``skipped`` names it in that case."""
    with PatchSession((ONNX_OPTIMIZER_PATCH,), skip_mismatched=(ONNX_OPTIMIZER_PATCH.name,)) as session:
        yield session
