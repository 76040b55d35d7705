"""ONNX graphs of the whole pipeline: exported from the audited program, audited, quantized,
loaded and run with onnxruntime.

One ``.onnx`` holds image encoder through segmentation head; its weights are external data in
one file beside it, named after the artifact (``sam3.onnx.<id>.data``) so that a new export
never overwrites the file an old graph still points at: the ``.onnx`` is the unit of
atomicity, and the data file of the artifact it replaced is deleted once the new one is in
place. The manifest (:mod:`.manifest`) is embedded in the model's ``metadata_props`` under
:data:`METADATA_KEY`.

Inputs ``images`` ``[batch, 3, S, S]`` float32 and ``token_ids`` ``[num_prompts, L]`` int64
keep those symbolic first dims; the outputs' first dim is ``batch*num_prompts``. Unmasked
attention runs as onnxruntime's ``com.microsoft.MultiHeadAttention``
(:mod:`.onnx_attention`), so the graph needs onnxruntime (its contrib ops) rather than any
ONNX runtime. Export needs ``onnx``, ``onnxscript`` and torch (``pip install
'sam3-exportable[export]'``); running needs only the runtime install
(:mod:`.onnx_runtime`: onnxruntime and numpy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from ..contract import BOX_INPUT_NAMES, OUTPUT_NAMES, input_names
from ..errors import ArtifactError, DynamicShapeAuditError, MissingExtraError
from .files import Staging, check_output_file
from .manifest import (
    ONNX_METADATA_KEY,
    FileRecord,
    Manifest,
    OnnxInfo,
    publish,
    read_manifest,
    versions_record,
)
from .onnx_optimizer import optimizer_scope
from .onnx_runtime import SESSION_OPTIONS, OnnxArtifact, load_onnx
from .program import describe_program, synthetic_inputs

__all__ = [
    "METADATA_KEY",
    "OPSET",
    "SESSION_OPTIONS",
    "OnnxArtifact",
    "audit_onnx",
    "export_onnx",
    "int8_path_for",
    "load_onnx",
    "quantize_onnx",
]

#: Key of the embedded manifest in the model's ``metadata_props``.
METADATA_KEY = ONNX_METADATA_KEY
#: ONNX opset of the export (17 lacks Split's ``num_outputs``; 23's Attention op is refused
#: by onnxruntime 1.32 on the geometry encoder's broadcast mask).
OPSET = 18
#: onnxruntime.quantization settings of ``--quantize int8``.
INT8 = {
    "method": "onnxruntime.quantization.quantize_dynamic",
    "op_types_to_quantize": ["MatMul", "Gemm"],
    "weight_type": "QInt8",
    "per_channel": True,
    "extra_options": {"MatMulConstBOnly": True},
}
_EXTRA = "sam3-exportable[export]"


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"ONNX export: expected {module} to be installed, it is not; pip install '{_EXTRA}'"
        ) from exc


@contextlib.contextmanager
def _quiet(logger: str) -> Any:
    """Only errors from ``logger`` (``""``: the root logger) while the body runs."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def int8_path_for(path: str | os.PathLike[str]) -> Path:
    """``build/sam3.onnx`` -> ``build/sam3.int8.onnx``."""
    path = Path(path)
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    return path.with_name(f"{stem}.int8.onnx")


def _data_name(target: Path, artifact_id: str) -> str:
    return f"{target.name}.{artifact_id[:12]}.data"


def _replaced_data_files(target: Path) -> list[Path]:
    """The data files the artifact now at ``target`` owns by its embedded manifest (deleted
    once it is replaced); none for a file that is not a readable ONNX artifact."""
    if not target.is_file():
        return []
    try:
        doc = read_manifest(target, kinds=("onnx",))
    except ArtifactError:
        return []
    return [target.with_name(f.name) for f in doc.data_files if f.name.startswith(f"{target.name}.")]


def _publish(target: Path, manifest: Manifest, model: Any, force: bool) -> Manifest:
    """Save an ``onnx_ir`` model with its weights in one new data file, the manifest (with
    the data file's hash) embedded, as one commit once it passes :func:`audit_onnx`; delete
    the data file of the artifact it replaces."""
    onnx = _require("onnx")
    onnx_ir = _require("onnx_ir")
    replaced = _replaced_data_files(target)
    data_name = _data_name(target, manifest.artifact_id)

    def write(graph: Path, doc: Manifest, staging: Staging) -> Manifest:
        data = staging.new_file(graph.with_name(data_name))
        # one data file, 64 KiB-aligned tensors (onnxruntime can map them), no >2 GB proto
        onnx_ir.save(model, os.fspath(graph), external_data=data_name, alignment=65536)
        embedded = dataclasses.replace(doc, data_files=(FileRecord.of(data_name, data),))
        proto = onnx.load(os.fspath(graph), load_external_data=False)
        kept = [(p.key, p.value) for p in proto.metadata_props if p.key != METADATA_KEY]  # a source's
        del proto.metadata_props[:]
        for key, value in [*kept, (METADATA_KEY, embedded.dumps())]:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save_model(proto, os.fspath(graph))
        assert doc.onnx is not None
        audit_onnx(graph, empty_values=not doc.onnx.optimized)  # nothing is published unless it passes
        return embedded

    full = publish(target, manifest, write, force=force)
    for old in replaced:
        if old.name != data_name:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
    return full


def export_onnx(
    ep: ExportedProgram,
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    optimize: bool = True,
    opset: int = OPSET,
) -> Manifest:
    """Export ``ep`` (traced with the ONNX patch set: ``export_full_pipeline(target="onnx")``)
    to one ONNX graph at ``path`` and write its manifest, once the graph passes
    :func:`audit_onnx`; return the manifest.

    ``optimize`` runs the onnxscript optimizer (constant folding, fusions): it folds the
    weights' transposes, which int8 quantization needs, and runs faster. At full size the
    whole conversion takes about 2.5 minutes with :mod:`.onnx_optimizer`'s patch held (6
    without it).
    Raises :class:`~..errors.OutputPathError` for an existing ``path`` without ``force``,
    :class:`~..errors.DynamicShapeAuditError` when the graph's dims are not symbolic,
    ``ImportError`` naming the extra when onnx/onnxscript are missing.
    """
    _require("onnxscript")
    from .onnx_attention import translation_table

    target = check_output_file(path, force=force, what="ONNX path")
    doc = describe_program(
        ep,
        "onnx",
        versions=versions_record("onnx", "onnxscript", "onnxruntime"),
        onnx=OnnxInfo(
            opset=opset,
            optimized=optimize,
            session=SESSION_OPTIONS,
            contrib_ops=("com.microsoft.MultiHeadAttention (unmasked attention)",),
        ),
    )
    hints = doc.size_hints
    boxes = doc.takes_boxes
    args = synthetic_inputs(
        doc.image_size,
        doc.context_length,
        hints.get("batch", 3),
        hints.get("num_prompts", 3),
        boxes=hints.get("num_boxes", 3) if boxes else None,
    )
    per_pair = {0: "batch", 1: "num_prompts", 2: "num_boxes"}
    shapes = ({0: "batch"}, {0: "num_prompts"}) + ((per_pair, per_pair, per_pair) if boxes else ())
    # constant folding warns once per Split it leaves alone
    scope = optimizer_scope() if optimize else contextlib.nullcontext()
    with _quiet("onnxscript"), _shape_env_restored(ep), scope:
        program = torch.onnx.export(
            ep,
            args,
            dynamo=True,
            opset_version=opset,
            optimize=optimize,
            input_names=list(input_names(boxes)),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=shapes,
            custom_translation_table=translation_table(),
        )
    return _publish(target, doc, program.model, force)


@contextlib.contextmanager
def _shape_env_restored(ep: ExportedProgram) -> Iterator[None]:
    """Convert ``ep`` and leave its ShapeEnv's pending unbacked symbols as they were.

    ``torch.onnx.export`` decomposes the program in the program's own ShapeEnv and leaves
    the fresh unbacked symbols of that pass pending there, so a second conversion of the same
    program fails with ``PendingUnbackedSymbolNotFound``. The graph itself is not changed.
    """
    envs = {
        id(env): env
        for node in ep.graph.nodes
        if node.op == "placeholder"
        and (env := getattr(getattr(node.meta.get("val"), "fake_mode", None), "shape_env", None))
    }
    before = {key: list(env.pending_fresh_unbacked_symbols) for key, env in envs.items()}
    try:
        yield
    finally:
        for key, env in envs.items():
            env.pending_fresh_unbacked_symbols[:] = before[key]


def quantize_onnx(
    source: str | os.PathLike[str], path: str | os.PathLike[str], *, force: bool = False
) -> Manifest:
    """Dynamic int8 quantization of the MatMul/Gemm weights of the ONNX artifact ``source``
    (onnxruntime.quantization, settings :data:`INT8`) into a new artifact at ``path``; return
    its manifest. The graph must be the optimized one (:func:`export_onnx` with
    ``optimize=True``), whose MatMul weights are initializers.
    """
    quantization = _require("onnxruntime.quantization")
    onnx_ir = _require("onnx_ir")
    source = Path(source)
    target = check_output_file(path, force=force, what="int8 ONNX path")
    source_doc = read_manifest(source, kinds=("onnx",))
    if source_doc.onnx is None or not source_doc.onnx.optimized:
        raise ArtifactError(
            f"{source}: expected an optimized ONNX graph to quantize (export with optimize=True)"
        )
    with tempfile.TemporaryDirectory(prefix=".sam3-int8.", dir=target.parent) as tmp:
        quantized = Path(tmp) / "q.onnx"
        with _quiet(""):  # it advises pre-processing on the root logger; the graph is optimized already
            quantization.quantize_dynamic(
                os.fspath(source),
                os.fspath(quantized),
                op_types_to_quantize=INT8["op_types_to_quantize"],
                per_channel=INT8["per_channel"],
                weight_type=getattr(quantization.QuantType, INT8["weight_type"]),
                use_external_data_format=True,
                extra_options=INT8["extra_options"],
            )
        model = onnx_ir.load(os.fspath(quantized))
        assert source_doc.onnx is not None
        doc = source_doc.derive(
            "onnx",
            versions=versions_record("onnx", "onnxscript", "onnxruntime"),
            onnx=dataclasses.replace(source_doc.onnx, quantization=INT8, optimized=True),
        )
        return _publish(target, doc, model, force)


def audit_onnx(path: str | os.PathLike[str], *, empty_values: bool = False) -> dict[str, Any]:
    """Prove statically that the graph at ``path`` keeps its dims symbolic and well formed.

    Checks, without loading the weights: the inputs are ``images [batch, 3, S, S]`` and
    ``token_ids [num_prompts, L]`` with those symbolic first dims (and, box-capable, the box
    inputs with ``[batch, num_prompts, num_boxes]`` first), every output's first dim
    is ``batch*num_prompts``, ``onnx.checker`` passes, and (unless ``empty_values``) after
    shape inference no value has a zero-size dim: the optimizer turns such values into
    Reshapes onnxruntime refuses; an unoptimized graph keeps a few dead ones, harmlessly.
    Returns what it found; raises :class:`~..errors.DynamicShapeAuditError` naming the
    offending input, output or value.
    """
    onnx = _require("onnx")
    path = os.fspath(path)
    model = onnx.load(path, load_external_data=False)

    def dims(value: Any) -> list[Any]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {v.name: dims(v) for v in model.graph.input}
    outputs = {v.name: dims(v) for v in model.graph.output}
    expected = {"images": ["batch"], "token_ids": ["num_prompts"]}
    if "boxes" in inputs:
        expected.update({name: ["batch", "num_prompts", "num_boxes"] for name in BOX_INPUT_NAMES})
    for name, first in expected.items():
        if name not in inputs or inputs[name][: len(first)] != first:
            raise DynamicShapeAuditError(
                f"ONNX audit: expected input {name!r} with leading dims {first}, got {inputs.get(name)}"
            )
    pairs = ("batch*num_prompts", "num_prompts*batch")  # the exporter names a product either way
    for name in OUTPUT_NAMES:
        if name not in outputs or outputs[name][0] not in pairs:
            raise DynamicShapeAuditError(
                f"ONNX audit: expected output {name!r} with first dim 'batch*num_prompts', "
                f"got {outputs.get(name)}"
            )
    onnx.checker.check_model(path, full_check=False)
    with tempfile.TemporaryDirectory(prefix=".sam3-audit.") as tmp:
        inferred_path = os.path.join(tmp, "inferred.onnx")
        onnx.shape_inference.infer_shapes_path(path, inferred_path)
        inferred = onnx.load(inferred_path, load_external_data=False)
    zero = [
        v.name
        for v in inferred.graph.value_info
        if any(
            not d.dim_param and d.HasField("dim_value") and d.dim_value == 0
            for d in v.type.tensor_type.shape.dim
        )
    ]
    if zero and not empty_values:
        raise DynamicShapeAuditError(f"ONNX audit: expected no zero-size values, got {len(zero)}: {zero[:5]}")
    return {
        "inputs": inputs,
        "outputs": outputs,
        "nodes": len(model.graph.node),
        "zero_size_values": len(zero),
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
    }
