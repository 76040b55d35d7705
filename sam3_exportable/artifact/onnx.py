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
ONNX runtime. Export needs ``onnx``, ``onnxscript`` and torch; running needs only
``onnxruntime`` and numpy (``pip install 'sam3-exportable[onnx]'``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.export import ExportedProgram

from ..contract import INPUT_NAMES, OUTPUT_NAMES, synthetic_inputs
from ..errors import ArtifactError, DynamicShapeAuditError
from .base import Artifact
from .files import Staging, check_output_file, sha256_file
from .manifest import (
    ONNX_METADATA_KEY,
    check_sha256,
    derive_manifest,
    describe_program,
    embedded_text,
    finish,
    read_manifest,
    stage_copy,
    versions_record,
)

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
#: onnxruntime settings the artifact expects (recorded in its manifest). The defaults: with
#: attention as MultiHeadAttention, arena, memory pattern and prepacking change peak memory by
#: less than 0.3 GiB at full size, and full graph optimization is the fastest.
SESSION_OPTIONS: dict[str, Any] = {
    "providers": ["CPUExecutionProvider"],
    "graph_optimization_level": "ORT_ENABLE_ALL",
    "enable_cpu_mem_arena": True,
    "enable_mem_pattern": True,
    "intra_op_num_threads": "torch.get_num_threads() of the loading process",
}
#: onnxruntime.quantization settings of ``--quantize int8``.
INT8 = {
    "method": "onnxruntime.quantization.quantize_dynamic",
    "op_types_to_quantize": ["MatMul", "Gemm"],
    "weight_type": "QInt8",
    "per_channel": True,
    "extra_options": {"MatMulConstBOnly": True},
}
_EXTRA = "sam3-exportable[onnx]"


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} is needed for ONNX artifacts: pip install '{_EXTRA}' ({exc})") from exc


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
    """The data files of the artifact now at ``target`` (deleted once it is replaced)."""
    if not target.is_file():
        return []
    try:
        doc = read_manifest(target, kinds=("onnx",))
    except ArtifactError:
        return []
    names = [f["name"] for f in doc.get("data_files", [])] or _locations(target)
    return [target.with_name(name) for name in names]


def _locations(path: Path) -> list[str]:
    onnx = _require("onnx")
    model = onnx.load(os.fspath(path), load_external_data=False)
    return sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})


def _publish(target: Path, doc: dict[str, Any], model: Any, force: bool) -> dict[str, Any]:
    """Save an ``onnx_ir`` model with ``doc`` embedded, its weights in one new data file, as
    one commit once it passes :func:`audit_onnx`; delete the data file of the artifact it
    replaces."""
    onnx_ir = _require("onnx_ir")
    replaced = _replaced_data_files(target)
    data_name = _data_name(target, doc["artifact_id"])
    with Staging(force=force) as staging:
        graph = staging.file(target, suffix=".tmp.onnx")
        data = staging.new_file(graph.with_name(data_name))
        model.metadata_props[METADATA_KEY] = embedded_text(doc)
        # one data file, 64 KiB-aligned tensors (onnxruntime can map them), no >2 GB proto
        onnx_ir.save(model, os.fspath(graph), external_data=data_name, alignment=65536)
        audit_onnx(graph, empty_values=not doc["onnx_optimized"])  # nothing is published unless it passes
        full = finish(doc, target, graph, data_files=[(data_name, data)])
        stage_copy(staging, target, full)
        staging.commit()
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
) -> dict[str, Any]:
    """Export ``ep`` (traced with the ONNX patch set: ``export_full_pipeline(target="onnx")``)
    to one ONNX graph at ``path`` and write its manifest, once the graph passes
    :func:`audit_onnx`; return the manifest.

    ``optimize`` runs the onnxscript optimizer (constant folding, fusions; minutes at full
    size): it folds the weights' transposes, which int8 quantization needs, and runs faster.
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
        extra={
            "opset": opset,
            "onnx_optimized": optimize,
            "onnxruntime": SESSION_OPTIONS,
            "contrib_ops": ["com.microsoft.MultiHeadAttention (unmasked attention)"],
        },
    )
    doc["versions"] = versions_record("onnx", "onnxscript", "onnxruntime")
    hints = doc["size_hints"]
    args = synthetic_inputs(
        doc["image_size"], doc["context_length"], hints.get("batch", 3), hints.get("num_prompts", 3)
    )
    # constant folding warns once per Split it leaves alone
    with _quiet("onnxscript"), _shape_env_restored(ep):
        program = torch.onnx.export(
            ep,
            args,
            dynamo=True,
            opset_version=opset,
            optimize=optimize,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({0: "batch"}, {0: "num_prompts"}),
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
) -> dict[str, Any]:
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
    if not source_doc.get("onnx_optimized", False):
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
        doc = derive_manifest(source_doc, extra={"quantization": INT8, "onnx_optimized": True})
        doc["versions"] = versions_record("onnx", "onnxscript", "onnxruntime")
        return _publish(target, doc, model, force)


def audit_onnx(path: str | os.PathLike[str], *, empty_values: bool = False) -> dict[str, Any]:
    """Prove statically that the graph at ``path`` keeps its dims symbolic and well formed.

    Checks, without loading the weights: the inputs are ``images [batch, 3, S, S]`` and
    ``token_ids [num_prompts, L]`` with those symbolic first dims, every output's first dim
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
    for name, first in zip(INPUT_NAMES, ("batch", "num_prompts"), strict=True):
        if name not in inputs or inputs[name][0] != first:
            raise DynamicShapeAuditError(
                f"ONNX audit: expected input {name!r} with first dim {first!r}, got {inputs.get(name)}"
            )
    for name in OUTPUT_NAMES:
        if name not in outputs or outputs[name][0] != "batch*num_prompts":
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


def _session_options(ort: Any, threads: int | None) -> Any:
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, SESSION_OPTIONS["graph_optimization_level"]
    )
    options.enable_cpu_mem_arena = SESSION_OPTIONS["enable_cpu_mem_arena"]
    options.enable_mem_pattern = SESSION_OPTIONS["enable_mem_pattern"]
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    return options


class OnnxArtifact(Artifact):
    """A loaded ONNX graph: an onnxruntime session and the manifest (what :func:`load_onnx`
    returns). Calling it converts the tensors to numpy and back."""

    kind = "onnx"

    def __init__(self, session: Any, manifest: dict[str, Any], path: Path) -> None:
        super().__init__(manifest, path)
        self.session = session

    def _run(self, images: torch.Tensor, token_ids: torch.Tensor) -> Any:
        feeds = {
            "images": np.ascontiguousarray(images.detach().cpu().numpy()),
            "token_ids": np.ascontiguousarray(token_ids.detach().cpu().numpy()),
        }
        return tuple(torch.from_numpy(o) for o in self.session.run(list(OUTPUT_NAMES), feeds))


def load_onnx(
    path: str | os.PathLike[str],
    *,
    verify_hash: bool = True,
    providers: list[str] | None = None,
    threads: int | None = None,
) -> OnnxArtifact:
    """Load an ONNX artifact written by :func:`export_onnx` or :func:`quantize_onnx` into an
    onnxruntime session with :data:`SESSION_OPTIONS` (``providers`` overrides the CPU
    provider; ``threads`` defaults to ``torch.get_num_threads()``).

    Checks the manifest (kind ``"onnx"``) and, unless ``verify_hash`` is False, the sha256
    of the graph and of its data file. Raises :class:`~..errors.ArtifactError` when a file is
    missing, foreign or changed; ``ImportError`` naming the extra without onnxruntime.
    """
    ort = _require("onnxruntime")
    target = Path(path)
    manifest = read_manifest(target, kinds=("onnx",))
    for data in manifest.get("data_files", []):
        data_path = target.with_name(data["name"])
        if not data_path.is_file():
            raise ArtifactError(f"{target}: expected its weights file {data_path.name} beside it, found none")
        if verify_hash and data_path.stat().st_size != data["size_bytes"]:
            raise ArtifactError(
                f"{data_path}: expected {data['size_bytes']} bytes (the manifest's), "
                f"got {data_path.stat().st_size}"
            )
    if verify_hash and "sha256" in manifest:
        check_sha256(target, manifest, sha256_file(target))
        for data in manifest.get("data_files", []):
            check_sha256(target.with_name(data["name"]), data, sha256_file(target.with_name(data["name"])))
    try:
        session = ort.InferenceSession(
            os.fspath(target),
            _session_options(ort, threads),
            providers=providers or SESSION_OPTIONS["providers"],
        )
    except Exception as exc:  # onnxruntime raises its own exception types for bad models
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise ArtifactError(f"{target}: expected an onnxruntime-loadable graph, got: {first}") from exc
    return OnnxArtifact(session, manifest, target)
