"""What a ``torch.export`` program of the pipeline says about itself, for its manifest.

:func:`describe_program` builds the :class:`~.manifest.Manifest` of an artifact made from a
program: I/O specs and size hints read from the program, and the :class:`Provenance` the
export attached to the program object it returned (the model, the patches the exporting
session held, the autocast dtype, the audit). There is no registry: the provenance lives on
the program object (:func:`attach_provenance`), so a program the caller transforms into a
new object carries none, and writing it needs the provenance passed explicitly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from ..contract import BOX_INPUT_NAMES, INPUT_NAMES, OUTPUT_NAMES, dynamic_dims
from ..errors import ArtifactError
from .manifest import Manifest, ModelInfo, TensorSpec, new_identity, versions_record

__all__ = [
    "Provenance",
    "attach_provenance",
    "describe_program",
    "program_io",
    "provenance_of",
    "size_hints",
    "synthetic_inputs",
]

#: The attribute of an ``ExportedProgram`` that holds its :class:`Provenance`.
_ATTRIBUTE = "_sam3_exportable_provenance"


@dataclasses.dataclass(frozen=True)
class Provenance:
    """What the export knew about a program that the program itself does not hold."""

    model: ModelInfo
    patches: tuple[str, ...]
    autocast_dtype: str | None
    vocab_size: int | None
    audit: Mapping[str, Any] | None

    @classmethod
    def of_manifest(cls, manifest: Manifest) -> Provenance:
        """The provenance a manifest recorded (for a program loaded from that artifact)."""
        return cls(
            model=manifest.model,
            patches=manifest.patches,
            autocast_dtype=manifest.autocast_dtype,
            vocab_size=manifest.vocab_size,
            audit=manifest.audit,
        )


def attach_provenance(program: torch.export.ExportedProgram, provenance: Provenance) -> None:
    """Record ``provenance`` on the program object (it lives as long as the program)."""
    setattr(program, _ATTRIBUTE, provenance)


def provenance_of(program: Any) -> Provenance | None:
    """The provenance attached to ``program``, or None (a loaded or transformed program)."""
    value = getattr(program, _ATTRIBUTE, None)
    return value if isinstance(value, Provenance) else None


def _tensor_spec(name: str, meta_val: Any) -> TensorSpec:
    shape = tuple(str(d) if isinstance(d, torch.SymInt) else int(d) for d in meta_val.shape)
    return TensorSpec(name=name, shape=shape, dtype=str(meta_val.dtype).replace("torch.", ""))


def program_io(ep: torch.export.ExportedProgram) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Input and output specs of an exported pipeline, named as in :mod:`..contract`.

    Raises :class:`~..errors.ArtifactError` unless it has the pipeline's two inputs (five
    when box-capable) and four outputs.
    """
    nodes = {n.name: n for n in ep.graph.nodes}
    user_inputs = list(ep.graph_signature.user_inputs)
    output_node = next(n for n in ep.graph.nodes if n.op == "output")
    outs = output_node.args[0]
    names = INPUT_NAMES + BOX_INPUT_NAMES if len(user_inputs) == 5 else INPUT_NAMES
    if len(user_inputs) != len(names) or len(outs) != len(OUTPUT_NAMES):
        raise ArtifactError(
            f"program: expected the SAM3 pipeline's inputs {list(INPUT_NAMES)} (and "
            f"{list(BOX_INPUT_NAMES)} when box-capable) and outputs {list(OUTPUT_NAMES)}, "
            f"got {len(user_inputs)} inputs and {len(outs)} outputs"
        )
    inputs = tuple(
        _tensor_spec(name, nodes[node].meta["val"]) for name, node in zip(names, user_inputs, strict=True)
    )
    outputs = tuple(_tensor_spec(name, o.meta["val"]) for name, o in zip(OUTPUT_NAMES, outs, strict=True))
    if not all(isinstance(spec.shape[-1], int) for spec in inputs[:2]):
        raise ArtifactError(f"program: expected a static image size and context length, got {inputs}")
    return inputs, outputs


def size_hints(ep: torch.export.ExportedProgram) -> dict[str, int]:
    """The size hint ``ep`` carries for each dynamic dim (:func:`..contract.dynamic_dims`): the
    size it was traced at (kept by ``torch.export.save``/``load``). AOTInductor plans its
    loops by these. Dims that are not symbolic, or inputs the program lacks, are left out."""
    nodes = {n.name: n for n in ep.graph.nodes}
    user_inputs = list(ep.graph_signature.user_inputs)
    hints: dict[str, int] = {}
    for index, dim, name in dynamic_dims(boxes=True):
        if index >= len(user_inputs):
            continue
        size = nodes[user_inputs[index]].meta["val"].shape[dim]
        if isinstance(size, torch.SymInt) and size.node.hint is not None:
            hints[name] = int(size.node.hint)
    return hints


def describe_program(
    ep: torch.export.ExportedProgram,
    kind: str,
    *,
    provenance: Provenance | None = None,
    require_provenance: bool = True,
    versions: Mapping[str, str | None] | None = None,
    **fields: Any,
) -> Manifest:
    """The manifest (without file records) of an artifact of ``kind`` made from ``ep``.

    The provenance is ``provenance`` if given, else the one attached to ``ep``
    (:func:`provenance_of`). Without either, ``require_provenance`` (the default, for
    anything written to disk) raises :class:`~..errors.ArtifactError`; otherwise the model
    is recorded as ``"unknown"``. ``fields`` set the remaining manifest fields (``aoti``,
    ``onnx``, ``source``, ``data_files``).
    """
    prov = provenance or provenance_of(ep)
    if prov is None:
        if require_provenance:
            raise ArtifactError(
                "program: expected the provenance export_full_pipeline attaches to the program it "
                "returns, got a program without one (transformed or loaded?); pass "
                "provenance=provenance_of(original) or Provenance.of_manifest(manifest)"
            )
        prov = Provenance(ModelInfo(size="unknown"), (), None, None, None)
    inputs, outputs = program_io(ep)
    return Manifest(
        kind=kind,
        **new_identity(),
        versions=dict(versions or versions_record()),
        model=prov.model,
        patches=tuple(prov.patches),
        inputs=inputs,
        outputs=outputs,
        image_size=int(inputs[0].shape[-1]),
        context_length=int(inputs[1].shape[-1]),
        vocab_size=prov.vocab_size,
        autocast_dtype=prov.autocast_dtype,
        audit=None if prov.audit is None else dict(prov.audit),
        size_hints=size_hints(ep),
        **fields,
    )


def synthetic_inputs(
    image_size: int,
    context_length: int,
    batch: int = 2,
    prompts: int = 2,
    seed: int = 0,
    boxes: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Deterministic inputs for tests and benchmarks: images ``[batch, 3, S, S]`` float32 in
    [-1, 1] and token ids ``[prompts, L]`` int64 (start token, a few word ids, end token, zero
    padding). With ``boxes=K`` also the box inputs ``[batch, prompts, K(, 4)]``: boxes inside
    the image, labels alternating positive and negative, and pair ``n`` with
    ``1 + n % K`` valid boxes (the rest padding). The same arguments give the same tensors in
    any process."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, image_size, image_size, generator=generator) * 2 - 1
    tokens = torch.zeros(prompts, context_length, dtype=torch.int64)
    for p in range(prompts):
        words = torch.randint(256, 49406, (2 + p % 3,), generator=generator)
        row = [49406, *words.tolist(), 49407]
        tokens[p, : len(row)] = torch.tensor(row)
    if boxes is None:
        return images, tokens
    size = torch.rand(batch, prompts, boxes, 2, generator=generator) * 0.4 + 0.05
    centre = size / 2 + torch.rand(batch, prompts, boxes, 2, generator=generator) * (1 - size)
    coords = torch.cat([centre, size], dim=-1)
    labels = (torch.arange(boxes) % 2 == 0).long().expand(batch, prompts, boxes).contiguous()
    count = (torch.arange(batch * prompts) % boxes + 1).view(batch, prompts, 1)
    valid = torch.arange(boxes).view(1, 1, boxes) < count
    return images, tokens, coords, labels, valid
