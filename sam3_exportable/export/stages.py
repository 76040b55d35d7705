"""The one graph's two stages, exported from the same wrapper: ``encode_images`` (the image
encoder, once per image) and ``ground`` (text encoder, fusion, decoder and segmentation head
on those features, once per prompt set). ``ground(encode_images(x), t)`` runs the very ops
of the one graph, so it equals it bitwise (``tests/test_stages.py``)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from ..artifact.manifest import ENCODE_IMAGES, GROUND, StagesInfo, TensorSpec
from ..contract import BOX_INPUT_NAMES
from ..patching.selection import exportable_sam3
from .pipeline import FullSam3PipelineWrapper
from .trace import (
    EXAMPLE_BATCH,
    EXAMPLE_BOXES,
    EXAMPLE_PROMPTS,
    AuditReport,
    _parameters_frozen,
    audit_dynamic_shapes,
    check_example_sizes,
    dynamic_shapes_of,
    example_inputs,
)

__all__ = ["GroundStage", "ImageStage", "StagePrograms", "export_stages", "stage_dims"]


class ImageStage(nn.Module):
    """``forward(images)``: :meth:`FullSam3PipelineWrapper.encode_images`."""

    def __init__(self, wrapper: FullSam3PipelineWrapper) -> None:
        super().__init__()
        self.wrapper = wrapper

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.wrapper.encode_images(images)


class GroundStage(nn.Module):
    """``forward(features, token_ids[, boxes, box_labels, box_valid])``:
    :meth:`FullSam3PipelineWrapper.ground` (``features`` a tuple in
    :attr:`~FullSam3PipelineWrapper.feature_names` order)."""

    def __init__(self, wrapper: FullSam3PipelineWrapper) -> None:
        super().__init__()
        self.wrapper = wrapper

    def forward(
        self,
        features: tuple[torch.Tensor, ...],
        token_ids: torch.Tensor,
        boxes: torch.Tensor | None = None,
        box_labels: torch.Tensor | None = None,
        box_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.wrapper.ground(features, token_ids, boxes, box_labels, box_valid)


@dataclasses.dataclass(frozen=True)
class StagePrograms:
    """What :func:`export_stages` returns: the two programs, audited, and their manifest record
    (:class:`~..artifact.manifest.StagesInfo`: the features' names, shapes and dtypes)."""

    encode_images: ExportedProgram
    ground: ExportedProgram
    info: StagesInfo

    def programs(self) -> dict[str, ExportedProgram]:
        """The programs by their name in a ``.pt2`` archive."""
        return {ENCODE_IMAGES: self.encode_images, GROUND: self.ground}


def stage_dims(features: int, boxes: bool) -> dict[str, tuple[tuple[int, int, str], ...]]:
    """Per stage, every ``(flat user input index, dim, name)`` that must stay dynamic:
    ``encode_images``' images dim 0; ``ground``'s features dim 0 (``batch``), ``token_ids``
    dim 0 (``num_prompts``) and the box inputs' ``batch``, ``num_prompts``, ``num_boxes``."""
    ground = (*tuple((i, 0, "batch") for i in range(features)), (features, 0, "num_prompts"))
    if boxes:
        for i in range(features + 1, features + 4):
            ground += ((i, 0, "batch"), (i, 1, "num_prompts"), (i, 2, "num_boxes"))
    return {ENCODE_IMAGES: ((0, 0, "batch"),), GROUND: ground}


def _drop_unused_regions(ep: ExportedProgram) -> None:
    """Remove the graph's grad-mode regions whose results nothing reads (the position
    encodings of the levels grounding never reads): torch 2.14 cannot load a program with
    such a region back (``Node.meta wrap_with_set_grad_enabled_1 is missing val``). Dead
    code only: every value the program returns is computed by the same ops as before."""
    hop = torch.ops.higher_order.wrap_with_set_grad_enabled

    def impure(node: torch.fx.Node) -> bool:
        return False if node.op == "call_function" and node.target is hop else node.is_impure()

    if ep.graph.eliminate_dead_code(is_impure_node=impure):
        ep.graph_module.delete_all_unused_submodules()
        ep.graph_module.recompile()


def _without_unused_inputs(ep: ExportedProgram) -> ExportedProgram:
    """``ep`` without the parameter, buffer and constant inputs its graph never reads.

    ``torch.export`` lifts every parameter of the module it traces, and each stage module
    holds the whole model, so a stage program would carry the other stage's weights too:
    dead inputs only, removed with their state (values and ops untouched)."""
    from torch.export.graph_signature import ExportGraphSignature, InputKind

    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    lifted = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    signature = ep.graph_signature
    dead = [
        spec
        for spec in signature.input_specs
        if spec.kind in lifted and not placeholders[spec.arg.name].users
    ]
    if not dead:
        return ep
    for spec in dead:
        ep.graph.erase_node(placeholders[spec.arg.name])
    kept = [spec for spec in signature.input_specs if spec not in dead]
    targets = {spec.target for spec in kept}
    ep.graph_module.recompile()
    return ExportedProgram(
        root=ep.graph_module,
        graph=ep.graph,
        graph_signature=ExportGraphSignature(input_specs=kept, output_specs=list(signature.output_specs)),
        state_dict={k: v for k, v in ep.state_dict.items() if k in targets},
        range_constraints=ep.range_constraints,
        module_call_graph=ep.module_call_graph,
        example_inputs=None,
        constants={k: v for k, v in ep.constants.items() if k in targets},
        verifiers=ep.verifiers,
    )


def _feature_specs(ep: ExportedProgram, names: tuple[str, ...]) -> tuple[TensorSpec, ...]:
    output = next(n for n in ep.graph.nodes if n.op == "output")
    values = [node.meta["val"] for node in output.args[0]]
    if len(values) != len(names):
        raise AssertionError(f"encode_images: expected {len(names)} outputs ({names}), got {len(values)}")
    specs = []
    for name, value in zip(names, values, strict=True):
        rest = [int(d) for d in value.shape[1:]]  # a non-int here is a specialization bug
        specs.append(TensorSpec(name, ("batch", *rest), str(value.dtype).replace("torch.", "")))
    return tuple(specs)


def export_stages(
    model: nn.Module,
    *,
    autocast_dtype: torch.dtype | None = None,
    boxes: bool = False,
    target: str = "pt2",
    patches: dict | None = None,
    example_batch: int = EXAMPLE_BATCH,
    example_prompts: int = EXAMPLE_PROMPTS,
    example_boxes: int = EXAMPLE_BOXES,
) -> StagePrograms:
    """Export ``encode_images`` and ``ground`` from :class:`FullSam3PipelineWrapper` (the
    arguments as :func:`~.trace.export_full_pipeline` takes them), with ``batch``,
    ``num_prompts`` (and ``num_boxes``) dynamic, each audited by
    :func:`~.trace.audit_dynamic_shapes` (raises :class:`~..errors.DynamicShapeAuditError`).

    ``ground`` is traced on zero features of the shapes ``encode_images`` declares (tracing
    reads shapes only, so the image encoder does not run eagerly here).
    """
    check_example_sizes("export_stages", example_batch, example_prompts, example_boxes)
    model.eval()
    wrapper = FullSam3PipelineWrapper(model, autocast_dtype=autocast_dtype).eval()
    names = wrapper.feature_names
    images, token_ids, *box_args = example_inputs(
        wrapper, example_batch, example_prompts, boxes=example_boxes if boxes else None
    )
    image_shapes, token_shapes, *box_shapes = dynamic_shapes_of(boxes)
    batch = image_shapes[0]
    frozen = _parameters_frozen(model) if target == "onnx" else contextlib.nullcontext()
    with frozen, exportable_sam3(target=target, **(patches or {})):  # type: ignore[arg-type]
        encode = torch.export.export(
            ImageStage(wrapper).eval(), (images,), dynamic_shapes=(image_shapes,), strict=False
        )
        _drop_unused_regions(encode)
        specs = _feature_specs(encode, names)
        features = tuple(
            torch.zeros((example_batch, *spec.shape[1:]), dtype=getattr(torch, spec.dtype)) for spec in specs
        )
        ground_args: tuple[Any, ...] = (features, token_ids, *box_args)
        ground_shapes: tuple[Any, ...] = (tuple({0: batch} for _ in specs), token_shapes, *box_shapes)
        ground = torch.export.export(
            GroundStage(wrapper).eval(), ground_args, dynamic_shapes=ground_shapes, strict=False
        )
    # each stage keeps its own weights only; the trace's inputs are not kept (ground's zero
    # features alone are ~350 MB at full size)
    encode, ground = _without_unused_inputs(encode), _without_unused_inputs(ground)
    dims = stage_dims(len(specs), boxes)
    arg_names = {ENCODE_IMAGES: ("images",), GROUND: ("features", "token_ids", *BOX_INPUT_NAMES)}
    audits: dict[str, AuditReport] = {
        name: audit_dynamic_shapes(program, dims[name], arg_names[name])
        for name, program in ((ENCODE_IMAGES, encode), (GROUND, ground))
    }
    info = StagesInfo(features=specs, audits={name: report.to_manifest() for name, report in audits.items()})
    return StagePrograms(encode_images=encode, ground=ground, info=info)
