"""The export recipe: build (or take) a model, export, audit, save each artifact kind,
optionally verify it against eager. The command line, the bench and Python users call it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..allocator import available_memory_bytes
from ..artifact.aoti import aoti_path_for, compile_aoti
from ..artifact.files import check_output_file, free_bytes
from ..artifact.loader import load_artifact
from ..artifact.manifest import Manifest, manifest_path
from ..artifact.program import attach_provenance, provenance_of
from ..artifact.pt2 import save_pipeline
from ..errors import InputSpecError, OutputPathError
from ..patching.selection import exportable_sam3
from ..progress import Stages
from ..verify import compare_parity, same_instances
from .builders import build_info, build_model
from .pipeline import FullSam3PipelineWrapper
from .stages import export_stages
from .trace import AuditReport, audit_dynamic_shapes, example_inputs, export_full_pipeline

__all__ = ["AUTOCAST", "FORMATS", "VERIFY_BOXES", "BuildRecord", "artifact_paths", "build_artifact"]

#: Artifact kinds the recipe writes; ``aoti`` is compiled from the same program as ``pt2``.
FORMATS = ("pt2", "aoti", "onnx")

#: ``--autocast`` names -> dtypes.
AUTOCAST: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

_SUFFIXES = {"pt2": ".pt2", "aoti": ".aoti.pt2", "onnx": ".onnx"}


@dataclasses.dataclass
class BuildRecord:
    """What :func:`build_artifact` did.

    Attributes:
        stages: seconds per stage, in order (``build``, ``export``, ``audit``, ``save``, ...).
        paths: kind -> the artifact written.
        manifests: kind -> its manifest.
        audit: the dynamic-shape audit of the program.
        parity: kind -> :func:`..verify.compare_parity` of the loaded artifact against eager
            (only with ``verify``).
        program: the exported program.
    """

    stages: dict[str, float]
    paths: dict[str, Path]
    manifests: dict[str, Manifest]
    audit: AuditReport
    parity: dict[str, dict[str, Any]]
    program: torch.export.ExportedProgram

    def verdict(self, kind: str) -> bool | None:
        """Whether the verified artifact of ``kind`` passes: a ``.pt2`` when bitwise equal to
        eager, another kind when it keeps the same instances; None for an int8 graph, whose
        numbers are approximate by design (reported, never deciding). Raises ``KeyError``
        for a kind that was not verified."""
        parity = self.parity[kind]
        if kind in ("pt2", "pt2-stages"):
            return all(parity["bitwise"].values())
        if kind == "onnx-int8":
            return None
        return same_instances(parity)

    @property
    def verified(self) -> bool:
        """True unless a verified artifact fails its :meth:`verdict` (trivially True without
        ``verify``)."""
        return all(self.verdict(kind) is not False for kind in self.parity)


def artifact_paths(out: str | os.PathLike[str], formats: Sequence[str]) -> dict[str, Path]:
    """Where each kind goes: the first of ``formats`` at ``out``, the others beside it with
    their suffix (``build/sam3.pt2`` -> ``build/sam3.aoti.pt2``, ``build/sam3.onnx``).
    Raises :class:`~..errors.InputSpecError` when two kinds would share a path
    (``out=sam3.onnx`` with ``formats=["pt2", "onnx"]``)."""
    out = Path(out)
    name = out.name
    stem = next(
        (name[: -len(s)] for s in sorted(_SUFFIXES.values(), key=len, reverse=True) if name.endswith(s)), name
    )
    paths = {kind: out.with_name(stem + _SUFFIXES[kind]) for kind in formats}
    paths[formats[0]] = out
    if formats[0] == "pt2" and "aoti" in formats:
        paths["aoti"] = aoti_path_for(out)
    kinds: dict[Path, str] = {}
    for kind, path in paths.items():
        if path in kinds:
            raise InputSpecError(
                f"--out {out}: expected one file per kind, got {kinds[path]} and {kind} both at {path}; "
                f"name --out with the suffix of the first kind ({_SUFFIXES[formats[0]]})"
            )
        kinds[path] = kind
    return paths


def _check_verify_fits(wrapper: FullSam3PipelineWrapper, batch: int, prompts: int) -> None:
    """Refuse a ``verify`` shape whose inputs and two sets of outputs alone exceed the memory
    available, before anything heavy runs."""
    s = wrapper.image_size
    queries = int(wrapper.model.transformer.decoder.num_queries)
    mask = (s * 2 // 7) ** 2  # pred_masks are S/3.5 on a side
    needed = 4 * (batch * 3 * s * s + 2 * batch * prompts * queries * (5 + mask))
    available = available_memory_bytes()
    if available is not None and needed > available:
        raise InputSpecError(
            f"verify: expected a shape whose inputs and outputs fit in memory, got B={batch}, "
            f"P={prompts}: {needed / 2**30:,.1f} GiB for them alone, {available / 2**30:,.1f} GiB available"
        )


def _onnx_sizes(manifest: dict[str, Any]) -> str:
    data = sum(f.size_bytes for f in manifest.data_files)
    assert manifest.file is not None
    return f"graph {manifest.file.size_bytes / 2**20:,.1f} MiB + weights {data / 2**20:,.0f} MiB"


def _estimated_bytes(model: nn.Module, formats: Sequence[str]) -> int:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(weights * len(formats) * 1.05)


#: Box slots per pair of ``build_artifact(boxes=True, verify=(B, P))``.
VERIFY_BOXES = 2


def build_artifact(
    out: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    size: str = "full",
    checkpoint: str | os.PathLike[str] | None = None,
    seed: int = 0,
    allow_missing_keys: bool = False,
    formats: Sequence[str] = ("pt2",),
    autocast: str = "none",
    verify: tuple[int, ...] | None = None,
    force: bool = False,
    inductor_configs: dict[str, Any] | None = None,
    onnx_options: dict[str, Any] | None = None,
    quantize: str | None = None,
    stages: Stages | None = None,
    boxes: bool = False,
    staged: bool = False,
) -> BuildRecord:
    """Build (or take ``model``), export, audit, save every kind of ``formats``, verify.

    Args:
        out: path of the first kind's artifact (see :func:`artifact_paths`).
        model: an upstream ``Sam3Image``; default: :func:`~.builders.build_model` of
            ``size`` with ``checkpoint`` (or random weights from ``seed``).
        formats: kinds to write, from :data:`FORMATS` (``aoti`` needs ``pt2``).
        autocast: ``"none"``, ``"bf16"`` or ``"fp16"``: the graph runs under that autocast.
        verify: ``(B, P)``, or ``(B, P, K)`` with ``boxes``: load each written artifact
            (:func:`~..artifact.loader.load_artifact`) and compare it with eager on inputs of
            that shape (:func:`..verify.compare_parity`); K defaults to
            :data:`VERIFY_BOXES`.
        force: replace existing artifacts.
        inductor_configs: AOTInductor options (default
            :data:`..artifact.aoti.DEFAULT_INDUCTOR_CONFIGS`).
        onnx_options: keyword arguments for :func:`..artifact.onnx.export_onnx`.
        quantize: ``"int8"``: also write the dynamic-int8 quantization of the ONNX graph
            (:func:`..artifact.onnx.quantize_onnx`) as kind ``onnx-int8`` of the record,
            at ``<stem>.int8.onnx``.
        stages: where stage timings are reported (default: silently).
        boxes: export the box-capable program (exemplar boxes as inputs, see
            :mod:`..contract`) instead of the text-only one.
        staged: also export the two stages (:func:`.stages.export_stages`) into the ``.pt2``
            (``pt2`` only); with ``verify``, ``ground(encode_images(x))`` of the loaded
            artifact is compared with eager too, as kind ``pt2-stages``.

    Every output path is checked (writable, not a directory, not existing unless ``force``)
    and, once the model's size is known, the free space, before the export runs. Raises
    :class:`~..errors.OutputPathError`, :class:`~..errors.InputSpecError` (bad option
    values), :class:`~..errors.CheckpointError`, :class:`~..errors.DynamicShapeAuditError`.
    """
    stages = stages or Stages()
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if not formats or unknown:
        raise InputSpecError(f"formats: expected some of {list(FORMATS)}, got {formats}")
    if "aoti" in formats and "pt2" not in formats:
        raise InputSpecError("formats: 'aoti' is compiled from the .pt2 program; ask for 'pt2' too")
    if autocast not in AUTOCAST:
        raise InputSpecError(f"autocast: expected one of {sorted(AUTOCAST)}, got {autocast!r}")
    if quantize not in (None, "int8"):
        raise InputSpecError(f"quantize: expected None or 'int8', got {quantize!r}")
    if quantize and "onnx" not in formats:
        raise InputSpecError("quantize: int8 quantizes the ONNX graph; ask for the 'onnx' format too")
    if staged and formats != ["pt2"]:
        raise InputSpecError(
            f"stages: expected the pt2 kind alone (stages are written into .pt2 artifacts), got {formats}"
        )
    shape = "(B, P) or (B, P, K)" if boxes else "(B, P)"
    if verify is not None and (len(verify) not in ((2, 3) if boxes else (2,)) or min(verify) < 1):
        raise InputSpecError(f"verify: expected {shape}, each >= 1, got {verify}")
    paths = artifact_paths(out, formats)
    if quantize:
        from ..artifact.onnx import int8_path_for

        paths["onnx-int8"] = int8_path_for(paths["onnx"])
    for kind, path in paths.items():
        check_output_file(path, force=force, what=f"--out ({kind})")
        if not force and manifest_path(path).exists():
            check_output_file(manifest_path(path), force=force, what=f"--out ({kind} manifest)")
    dtype = AUTOCAST[autocast]

    if model is None:
        weights = f"checkpoint {checkpoint}" if checkpoint else f"random weights, seed {seed}"
        with stages.stage("build", f"size={size}, {weights}"):
            model = build_model(size, checkpoint=checkpoint, seed=seed, allow_missing_keys=allow_missing_keys)  # type: ignore[arg-type]
            info = build_info(model)
            stages.note(f"{info.parameters:,} parameters")
            if info.missing_keys:
                stages.note(
                    f"WARNING: {info.missing_keys} tensors missing from the checkpoint keep their "
                    "random initialisation (--allow-missing-keys); the manifest records it"
                )
    needed = _estimated_bytes(model, formats)
    available = free_bytes(next(iter(paths.values())).parent)
    if available < needed:
        raise OutputPathError(
            f"--out {out}: expected about {needed / 2**30:.1f} GiB free for {', '.join(formats)}, "
            f"the file system has {available / 2**30:.1f} GiB"
        )
    wrapper = FullSam3PipelineWrapper(model, autocast_dtype=dtype).eval()
    if verify is not None:
        _check_verify_fits(wrapper, *verify[:2])
    record_paths: dict[str, Path] = {}
    manifests: dict[str, Manifest] = {}
    programs: dict[str, torch.export.ExportedProgram] = {}
    report: AuditReport | None = None
    targets = [t for t in ("pt2", "onnx") if t in formats or (t == "pt2" and "aoti" in formats)]
    for target in targets:
        label = "" if len(targets) == 1 else f" ({target})"
        with stages.stage(f"export{label}", f"non-strict, autocast={autocast}, patches for {target}"):
            ep = export_full_pipeline(model, autocast_dtype=dtype, audit=False, target=target, boxes=boxes)
        with stages.stage(f"audit{label}"):
            report = audit_dynamic_shapes(ep)
            stages.note(report.summary())
            provenance = provenance_of(ep)
            assert provenance is not None
            attach_provenance(ep, dataclasses.replace(provenance, audit=report.to_manifest()))
        programs[target] = ep
    staged_programs = None
    if staged:
        with stages.stage("export stages", "encode_images and ground, from the same wrapper"):
            staged_programs = export_stages(model, autocast_dtype=dtype, boxes=boxes)
            for name, audit in staged_programs.info.audits.items():
                stages.note(f"{name}: dynamic {', '.join(audit['ranges'])}")
    if "pt2" in programs:
        with stages.stage("save", str(paths["pt2"])):
            manifests["pt2"] = save_pipeline(
                programs["pt2"], paths["pt2"], force=force, stages=staged_programs
            )
            record_paths["pt2"] = paths["pt2"]
            file = manifests["pt2"].file
            assert file is not None
            stages.note(f"{file.size_bytes / 2**20:,.0f} MiB, sha256 {file.sha256[:16]}...")
    if "aoti" in formats:
        with stages.stage("aoti", f"AOTInductor package {paths['aoti']} (several minutes at full size)"):
            manifests["aoti"] = compile_aoti(
                programs["pt2"],
                paths["aoti"],
                source_manifest=manifests["pt2"],
                inductor_configs=inductor_configs,
                force=force,
            )
            record_paths["aoti"] = paths["aoti"]
            stages.note(f"{manifests['aoti'].file.size_bytes / 2**20:,.0f} MiB")  # type: ignore[union-attr]
    if "onnx" in programs:
        from ..artifact.onnx import export_onnx

        with stages.stage("onnx", f"ONNX graph {paths['onnx']}"):
            manifests["onnx"] = export_onnx(
                programs["onnx"], paths["onnx"], force=force, **(onnx_options or {})
            )
            record_paths["onnx"] = paths["onnx"]
            stages.note(_onnx_sizes(manifests["onnx"]))
            stages.note(
                "audit: inputs keep 'batch' and 'num_prompts'"
                + (" and 'num_boxes'" if boxes else "")
                + ", outputs 'batch*num_prompts'; no empty value"
            )
        if quantize:
            from ..artifact.onnx import quantize_onnx

            with stages.stage("quantize", f"int8 weights of MatMul/Gemm {paths['onnx-int8']}"):
                manifests["onnx-int8"] = quantize_onnx(paths["onnx"], paths["onnx-int8"], force=force)
                record_paths["onnx-int8"] = paths["onnx-int8"]
                stages.note(_onnx_sizes(manifests["onnx-int8"]))
    parity: dict[str, dict[str, Any]] = {}
    if verify is not None:
        b, p = verify[:2]
        k = (verify[2] if len(verify) == 3 else VERIFY_BOXES) if boxes else None
        at = f"B={b}, P={p}" + (f", K={k}" if k else "")
        with stages.stage("verify", f"eager vs each artifact at {at}"):
            inputs = example_inputs(wrapper, b, p, seed=1, boxes=k)
            with exportable_sam3(), torch.no_grad():
                expected = wrapper(*inputs)
            for kind, path in record_paths.items():
                with torch.inference_mode():
                    artifact = load_artifact(path)
                    got = artifact(*inputs)
                    features = artifact.encode_images(inputs[0]) if staged else None
                    staged_got = artifact.ground(features, *inputs[1:]) if features else None
                parity[kind] = compare_parity(expected, got)
                if staged_got is not None:
                    parity[f"{kind}-stages"] = compare_parity(expected, staged_got)
    assert report is not None
    return BuildRecord(
        stages=dict(stages.seconds),
        paths=record_paths,
        manifests=manifests,
        audit=report,
        parity=parity,
        program=programs.get("pt2") or programs["onnx"],
    )
