"""The artifact manifest: the typed :class:`Manifest`, the one writer, the one reader.

Every artifact is one file (``.pt2`` program, AOTInductor package ``.aoti.pt2``, ONNX graph
``.onnx`` with its external-data file) that carries its manifest **inside** (a pt2
archive's ``extra/`` record; the ONNX model's ``metadata_props``), so the file alone is the
unit of atomicity. The embedded manifest lists the sha256 of every data file the artifact
needs (ONNX weights), so integrity travels with the file. ``<artifact>.json`` beside it is a
readable copy that adds the file's own sha256 and size (:attr:`Manifest.file`): a file
cannot hold its own hash. A copy that belongs to the file (same ``artifact_id``) must agree
with the embedded manifest field by field, or the artifact is refused.

This module imports neither torch nor onnx: the runtime install reads every kind's manifest
(an ONNX graph's ``metadata_props`` are read by :mod:`._onnx_proto` without parsing the
graph). Schema ``format`` ``"sam3-exportable"``, ``format_version`` 3; versions 1 (0.1
sidecars) and 2 (flat kind-specific keys) are upgraded on read.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import platform
import re
import uuid
import zipfile
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ..contract import BOX_INPUT_NAMES, INPUT_NAMES, NORMALIZE_MEAN, NORMALIZE_STD, OUTPUT_NAMES
from ..errors import ArtifactError
from ..tokenizer import BPE_VOCAB_SHA256, TOKENIZER_KIND
from ._onnx_proto import read_metadata_prop
from .files import Staging, sha256_file

__all__ = [
    "EMBEDDED_NAME",
    "ENCODE_IMAGES",
    "FORMAT",
    "FORMAT_VERSION",
    "GROUND",
    "KINDS",
    "ONNX_METADATA_KEY",
    "STAGE_NAMES",
    "AotiInfo",
    "FileRecord",
    "Manifest",
    "ModelInfo",
    "OnnxInfo",
    "SourceRef",
    "StagesInfo",
    "TensorSpec",
    "check_file",
    "manifest_path",
    "new_identity",
    "publish",
    "read_manifest",
    "versions_record",
]

log = logging.getLogger(__name__)

FORMAT = "sam3-exportable"
FORMAT_VERSION = 3
KINDS = ("pt2", "aoti", "onnx")
#: sam3-exportable 0.1's formats, read as format_version 1
LEGACY_FORMATS = {"sam3-exportable/pt2": "pt2", "sam3-exportable/aoti": "aoti"}
#: Name of the manifest record inside pt2 archives (under ``<archive>/extra/``).
EMBEDDED_NAME = "sam3_exportable_manifest.json"
#: The ``metadata_props`` key under which an ``.onnx`` graph carries its manifest.
ONNX_METADATA_KEY = "sam3_exportable.manifest"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def manifest_path(path: str | os.PathLike[str]) -> Path:
    """The copy of ``model.pt2``'s manifest is ``model.pt2.json``."""
    return Path(f"{os.fspath(path)}.json")


def _version_of(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def versions_record(*extra: str) -> dict[str, str | None]:
    """Installed versions of python, torch, torchvision, sam3, this package and ``extra``."""
    record: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "sam3", "sam3-exportable", *extra):
        record[name.replace("-", "_")] = _version_of(name)
    return record


def new_identity() -> dict[str, str]:
    """A fresh ``artifact_id``, ``created`` and ``exported_by`` for a manifest being written."""
    return {
        "artifact_id": uuid.uuid4().hex,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "exported_by": f"sam3-exportable {_version_of('sam3-exportable')}",
    }


# --------------------------------------------------------------------------- validation helpers


class _Invalid(Exception):
    """A field that does not fit the schema: its dotted name and the message."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _need(value: Any, kind: type | tuple[type, ...], field: str, *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float, (int, float)))
    if not ok:
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _Invalid(field, f"expected {name}{' or null' if optional else ''}, got {value!r}")
    return value


def _obj(doc: Any, field: str) -> Mapping[str, Any]:
    return _need(doc, dict, field)


def _sha(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise _Invalid(field, f"expected a sha256 hex digest, got {value!r}")
    return value


def _positive(value: Any, field: str) -> int:
    _need(value, int, field)
    if value < 1:
        raise _Invalid(field, f"expected a positive integer, got {value}")
    return int(value)


# --------------------------------------------------------------------------- the types


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: ``shape`` has ints and symbolic dims by their symbol."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    @classmethod
    def from_json(cls, doc: Any, field: str) -> TensorSpec:
        doc = _obj(doc, field)
        shape = _need(doc.get("shape"), list, f"{field}.shape")
        for i, d in enumerate(shape):
            _need(d, (int, str), f"{field}.shape[{i}]")
        return cls(
            name=_need(doc.get("name"), str, f"{field}.name"),
            shape=tuple(shape),
            dtype=_need(doc.get("dtype"), str, f"{field}.dtype"),
        )

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclasses.dataclass(frozen=True)
class FileRecord:
    """A file of the artifact: its name (beside the artifact), sha256 and size in bytes
    (None only in the copies 0.1 wrote, which did not record it)."""

    name: str
    sha256: str
    size_bytes: int | None

    @classmethod
    def of(cls, name: str, path: Path) -> FileRecord:
        """The record of the file at ``path``, to be named ``name``."""
        return cls(name=name, sha256=sha256_file(path), size_bytes=path.stat().st_size)

    @classmethod
    def from_json(cls, doc: Any, field: str) -> FileRecord:
        doc = _obj(doc, field)
        name = _need(doc.get("name"), str, f"{field}.name")
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise _Invalid(f"{field}.name", f"expected a plain file name, got {name!r}")
        size = _need(doc.get("size_bytes"), int, f"{field}.size_bytes", optional=True)
        if size is not None and size < 0:
            raise _Invalid(f"{field}.size_bytes", f"expected a size >= 0, got {size}")
        return cls(name=name, sha256=_sha(doc.get("sha256"), f"{field}.sha256"), size_bytes=size)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What was exported: :class:`~..export.builders.BuildInfo` as recorded, or ``size``
    ``"unknown"`` for a program whose export this package did not see."""

    size: str
    parameters: int | None = None
    checkpoint: str | None = None
    random_weights: bool | None = None
    seed: int | None = None
    missing_keys: int = 0
    unexpected_keys: int = 0

    @classmethod
    def from_json(cls, doc: Any, field: str) -> ModelInfo:
        doc = _obj(doc, field)
        counts = {}
        for name in ("missing_keys", "unexpected_keys"):
            value = doc.get(name, 0)
            counts[name] = len(value) if isinstance(value, list) else _need(value, int, f"{field}.{name}")
        return cls(
            size=_need(doc.get("size"), str, f"{field}.size"),
            parameters=_need(doc.get("parameters"), int, f"{field}.parameters", optional=True),
            checkpoint=_need(doc.get("checkpoint"), str, f"{field}.checkpoint", optional=True),
            random_weights=_need(doc.get("random_weights"), bool, f"{field}.random_weights", optional=True),
            seed=_need(doc.get("seed"), int, f"{field}.seed", optional=True),
            **counts,
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SourceRef:
    """The artifact this one was made from (an AOTI package's ``.pt2``, an int8 graph's
    fp32 graph), as far as it was known."""

    kind: str | None = None
    artifact_id: str | None = None
    artifact: str | None = None
    sha256: str | None = None

    @classmethod
    def from_json(cls, doc: Any, field: str) -> SourceRef:
        doc = _obj(doc, field)
        return cls(
            **{
                k: _need(doc.get(k), str, f"{field}.{k}", optional=True)
                for k in ("kind", "artifact_id", "artifact", "sha256")
            }
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class AotiInfo:
    """How an AOTInductor package was compiled."""

    compile_seconds: float
    inductor_configs: Mapping[str, Any]
    compile_threads: int

    @classmethod
    def from_json(cls, doc: Any, field: str) -> AotiInfo:
        doc = _obj(doc, field)
        return cls(
            compile_seconds=float(
                _need(doc.get("compile_seconds"), (int, float), f"{field}.compile_seconds")
            ),
            inductor_configs=dict(_obj(doc.get("inductor_configs"), f"{field}.inductor_configs")),
            compile_threads=_positive(doc.get("compile_threads"), f"{field}.compile_threads"),
        )

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "inductor_configs": dict(self.inductor_configs)}


@dataclasses.dataclass(frozen=True)
class OnnxInfo:
    """How an ONNX graph was made and the onnxruntime session settings it expects."""

    opset: int
    optimized: bool
    session: Mapping[str, Any]
    contrib_ops: tuple[str, ...] = ()
    quantization: Mapping[str, Any] | None = None

    @classmethod
    def from_json(cls, doc: Any, field: str) -> OnnxInfo:
        doc = _obj(doc, field)
        ops = _need(doc.get("contrib_ops", []), list, f"{field}.contrib_ops")
        quant = doc.get("quantization")
        return cls(
            opset=_positive(doc.get("opset"), f"{field}.opset"),
            optimized=_need(doc.get("optimized"), bool, f"{field}.optimized"),
            session=dict(_obj(doc.get("session"), f"{field}.session")),
            contrib_ops=tuple(_need(o, str, f"{field}.contrib_ops[{i}]") for i, o in enumerate(ops)),
            quantization=None if quant is None else dict(_obj(quant, f"{field}.quantization")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "opset": self.opset,
            "optimized": self.optimized,
            "session": dict(self.session),
            "contrib_ops": list(self.contrib_ops),
            "quantization": None if self.quantization is None else dict(self.quantization),
        }


#: Names of the two stage programs in a staged ``.pt2`` archive (``models/<name>.json``).
ENCODE_IMAGES = "encode_images"
GROUND = "ground"
STAGE_NAMES = (ENCODE_IMAGES, GROUND)


@dataclasses.dataclass(frozen=True)
class StagesInfo:
    """The two stages a staged artifact holds beside its one graph (exported with ``--stages``).

    ``encode_images(images)`` returns :attr:`features`, in order; ``ground(*features,
    token_ids[, boxes, box_labels, box_valid])`` returns the one graph's four outputs, and
    ``ground(encode_images(x), t)`` equals the one graph on ``(x, t)``. Each feature's shape
    has ``"batch"`` first (the images' ``B``) and ints after.

    Attributes:
        features: name, shape and dtype of every feature (``backbone_fpn_<level>``, then the
            ``vision_pos_enc_<level>`` of the levels grounding reads).
        audits: per stage name, its dynamic-shape audit (as :attr:`Manifest.audit`).
    """

    features: tuple[TensorSpec, ...]
    audits: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: Any, field: str) -> StagesInfo:
        doc = _obj(doc, field)
        features = _need(doc.get("features"), list, f"{field}.features")
        specs = tuple(TensorSpec.from_json(f, f"{field}.features[{i}]") for i, f in enumerate(features))
        if not specs:
            raise _Invalid(f"{field}.features", "expected at least one feature, got none")
        for i, spec in enumerate(specs):
            if (
                not spec.shape
                or spec.shape[0] != "batch"
                or not all(isinstance(d, int) for d in spec.shape[1:])
            ):
                raise _Invalid(
                    f"{field}.features[{i}].shape", f"expected ['batch', int, ...], got {list(spec.shape)}"
                )
        audits = _obj(doc.get("audits", {}), f"{field}.audits")
        for name in audits:
            if name not in STAGE_NAMES:
                raise _Invalid(f"{field}.audits", f"expected stage names {list(STAGE_NAMES)}, got {name!r}")
        return cls(
            features=specs, audits={k: dict(_obj(v, f"{field}.audits.{k}")) for k, v in audits.items()}
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "features": [f.to_json() for f in self.features],
            "audits": {k: dict(v) for k, v in self.audits.items()},
        }


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What an artifact is, what it was made from and what proves it.

    Raises :class:`~..errors.ArtifactError` from :meth:`from_json` naming the first field
    that does not fit the schema. Frozen: derive a changed one with :func:`dataclasses.replace`.

    Attributes:
        kind: ``"pt2"``, ``"aoti"`` or ``"onnx"``.
        artifact_id: random hex id shared by the file's embedded manifest and its copy.
        created, exported_by, versions: when, by which sam3-exportable, with which packages.
        model: what was exported (:class:`ModelInfo`).
        patches: names of the runtime patches the exporting session held.
        inputs, outputs: the graph's I/O (:class:`TensorSpec`, contract names).
        image_size, context_length, vocab_size: the input contract (``vocab_size`` None when
            unknown: token ids are then not range-checked).
        normalize_mean, normalize_std: per-channel normalisation of ``images``.
        tokenizer_kind, bpe_vocab_sha256: which tokenizer and vocabulary make ``token_ids``.
        autocast_dtype: ``"bf16"``/``"fp16"`` when the graph runs under autocast, else None.
        audit: the dynamic-shape audit's report (None when not audited).
        size_hints: the sizes the program was traced at, by dim name.
        strict: whether the program was traced with ``strict=True``.
        source: the artifact this one was made from, if any.
        data_files: every other file the artifact needs beside it, with sha256 and size.
        aoti, onnx: the kind's own record (exactly one for those kinds, None otherwise).
        stages: the two stage programs' record (:class:`StagesInfo`) of a staged artifact,
            None for a one-graph artifact.
        file: the artifact file's own record; only the copy beside the file has it.
    """

    kind: str
    artifact_id: str
    created: str
    exported_by: str
    versions: Mapping[str, str | None]
    model: ModelInfo
    patches: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    image_size: int
    context_length: int
    vocab_size: int | None = None
    normalize_mean: tuple[float, ...] = NORMALIZE_MEAN
    normalize_std: tuple[float, ...] = NORMALIZE_STD
    tokenizer_kind: str = TOKENIZER_KIND
    bpe_vocab_sha256: str = BPE_VOCAB_SHA256
    autocast_dtype: str | None = None
    audit: Mapping[str, Any] | None = None
    size_hints: Mapping[str, int] = dataclasses.field(default_factory=dict)
    strict: bool = False
    source: SourceRef | None = None
    data_files: tuple[FileRecord, ...] = ()
    aoti: AotiInfo | None = None
    onnx: OnnxInfo | None = None
    stages: StagesInfo | None = None
    file: FileRecord | None = None

    # ------------------------------------------------------------------ JSON

    def to_json(self) -> dict[str, Any]:
        """The manifest as JSON-ready data (schema ``format_version`` :data:`FORMAT_VERSION`)."""
        doc: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "artifact_id": self.artifact_id,
            "created": self.created,
            "exported_by": self.exported_by,
            "versions": dict(self.versions),
            "model": self.model.to_json(),
            "patches": list(self.patches),
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "image_size": self.image_size,
            "context_length": self.context_length,
            "vocab_size": self.vocab_size,
            "normalize": {"mean": list(self.normalize_mean), "std": list(self.normalize_std)},
            "tokenizer": {"kind": self.tokenizer_kind, "bpe_vocab_sha256": self.bpe_vocab_sha256},
            "autocast_dtype": self.autocast_dtype,
            "audit": None if self.audit is None else dict(self.audit),
            "size_hints": dict(self.size_hints),
            "strict": self.strict,
            "source": None if self.source is None else self.source.to_json(),
            "data_files": [f.to_json() for f in self.data_files],
            "aoti": None if self.aoti is None else self.aoti.to_json(),
            "onnx": None if self.onnx is None else self.onnx.to_json(),
            "stages": None if self.stages is None else self.stages.to_json(),
        }
        if self.file is not None:
            doc["file"] = self.file.to_json()
        return doc

    def dumps(self) -> str:
        """The JSON text written to files (sorted keys, indented)."""
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, doc: Any, where: str = "manifest", *, file_name: str | None = None) -> Manifest:
        """Validate ``doc`` (any supported ``format_version``, upgraded) into a Manifest;
        ``file_name`` names the artifact file for an old copy that does not."""
        try:
            return cls._from_current(_upgrade(doc, file_name), where)
        except _Invalid as exc:
            raise ArtifactError(f"{where}: {exc}") from None

    @classmethod
    def loads(cls, text: str, where: str = "manifest") -> Manifest:
        """:meth:`from_json` of JSON text; raises ArtifactError for text that is not JSON."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{where}: expected JSON, could not parse it: {exc}") from None
        return cls.from_json(doc, where)

    @classmethod
    def _from_current(cls, doc: Mapping[str, Any], where: str) -> Manifest:
        kind = _need(doc.get("kind"), str, "kind")
        if kind not in KINDS:
            raise _Invalid("kind", f"expected one of {list(KINDS)}, got {kind!r}")
        versions = _obj(doc.get("versions", {}), "versions")
        for key, value in versions.items():
            _need(value, str, f"versions.{key}", optional=True)
        patches = _need(doc.get("patches", []), list, "patches")
        normalize = _obj(doc.get("normalize", {"mean": NORMALIZE_MEAN, "std": NORMALIZE_STD}), "normalize")
        tokenizer = _obj(doc.get("tokenizer", {}), "tokenizer")
        hints = _obj(doc.get("size_hints", {}), "size_hints")
        autocast = doc.get("autocast_dtype")
        if autocast not in (None, "bf16", "fp16"):
            raise _Invalid("autocast_dtype", f"expected 'bf16', 'fp16' or null, got {autocast!r}")
        stats = {}
        for key in ("mean", "std"):
            values = _need(list(normalize.get(key, [])), list, f"normalize.{key}")
            if len(values) != 3:
                raise _Invalid(f"normalize.{key}", f"expected 3 values, got {values!r}")
            stats[key] = tuple(float(_need(v, (int, float), f"normalize.{key}")) for v in values)
        manifest = cls(
            kind=kind,
            artifact_id=_need(doc.get("artifact_id"), str, "artifact_id"),
            created=_need(doc.get("created", ""), str, "created"),
            exported_by=_need(doc.get("exported_by", ""), str, "exported_by"),
            versions=dict(versions),
            model=ModelInfo.from_json(doc.get("model", {"size": "unknown"}), "model"),
            patches=tuple(_need(p, str, f"patches[{i}]") for i, p in enumerate(patches)),
            inputs=tuple(
                TensorSpec.from_json(s, f"inputs[{i}]")
                for i, s in enumerate(_need(doc.get("inputs"), list, "inputs"))
            ),
            outputs=tuple(
                TensorSpec.from_json(s, f"outputs[{i}]")
                for i, s in enumerate(_need(doc.get("outputs"), list, "outputs"))
            ),
            image_size=_positive(doc.get("image_size"), "image_size"),
            context_length=_positive(doc.get("context_length"), "context_length"),
            vocab_size=None
            if doc.get("vocab_size") is None
            else _positive(doc.get("vocab_size"), "vocab_size"),
            normalize_mean=stats["mean"],
            normalize_std=stats["std"],
            tokenizer_kind=_need(tokenizer.get("kind", TOKENIZER_KIND), str, "tokenizer.kind"),
            bpe_vocab_sha256=_sha(
                tokenizer.get("bpe_vocab_sha256", BPE_VOCAB_SHA256), "tokenizer.bpe_vocab_sha256"
            ),
            autocast_dtype=autocast,
            audit=None if doc.get("audit") is None else dict(_obj(doc.get("audit"), "audit")),
            size_hints={str(k): _positive(v, f"size_hints.{k}") for k, v in hints.items()},
            strict=_need(doc.get("strict", False), bool, "strict"),
            source=None if doc.get("source") is None else SourceRef.from_json(doc["source"], "source"),
            data_files=tuple(
                FileRecord.from_json(f, f"data_files[{i}]")
                for i, f in enumerate(_need(doc.get("data_files") or [], list, "data_files"))
            ),
            aoti=None if doc.get("aoti") is None else AotiInfo.from_json(doc["aoti"], "aoti"),
            onnx=None if doc.get("onnx") is None else OnnxInfo.from_json(doc["onnx"], "onnx"),
            stages=None if doc.get("stages") is None else StagesInfo.from_json(doc["stages"], "stages"),
            file=None if doc.get("file") is None else FileRecord.from_json(doc["file"], "file"),
        )
        manifest._check_consistent()
        return manifest

    def _check_consistent(self) -> None:
        names = tuple(s.name for s in self.inputs)
        if names not in (INPUT_NAMES, INPUT_NAMES + BOX_INPUT_NAMES):
            raise _Invalid(
                "inputs",
                f"expected the inputs {list(INPUT_NAMES)} or {list(INPUT_NAMES + BOX_INPUT_NAMES)}, "
                f"got {list(names)}",
            )
        if tuple(s.name for s in self.outputs) != OUTPUT_NAMES:
            raise _Invalid(
                "outputs", f"expected the outputs {list(OUTPUT_NAMES)}, got {[s.name for s in self.outputs]}"
            )
        if self.inputs[0].shape[-1] != self.image_size:
            raise _Invalid(
                "image_size",
                f"expected the images input's size {self.inputs[0].shape[-1]}, got {self.image_size}",
            )
        if self.inputs[1].shape[-1] != self.context_length:
            raise _Invalid(
                "context_length",
                f"expected the token_ids input's length {self.inputs[1].shape[-1]}, "
                f"got {self.context_length}",
            )
        for kind in ("aoti", "onnx"):
            present = getattr(self, kind) is not None
            if present != (self.kind == kind):
                raise _Invalid(
                    kind, f"expected a record for kind {kind!r} artifacts only (this is {self.kind!r})"
                )

    # ------------------------------------------------------------------ derived

    @property
    def takes_boxes(self) -> bool:
        """Whether the graph takes exemplar boxes (exported with ``--boxes``)."""
        return len(self.inputs) > len(INPUT_NAMES)

    @property
    def embedded(self) -> Manifest:
        """This manifest as the artifact file embeds it (without :attr:`file`)."""
        return dataclasses.replace(self, file=None)

    def derive(self, kind: str, **changes: Any) -> Manifest:
        """The manifest of an artifact of ``kind`` made from the one this describes: a new
        identity, the source recorded, no file records; ``changes`` applied last."""
        source = SourceRef(
            kind=self.kind,
            artifact_id=self.artifact_id,
            artifact=self.file.name if self.file else None,
            sha256=self.file.sha256 if self.file else None,
        )
        fields: dict[str, Any] = {
            **new_identity(),
            "kind": kind,
            "source": source,
            "data_files": (),
            "file": None,
        }
        fields.update(aoti=None, onnx=None, stages=None)
        fields.update(changes)
        return dataclasses.replace(self, **fields)

    def summary(self) -> dict[str, Any]:
        """The fields a person or a client asks first (kind, model, I/O contract, id)."""
        return {
            "kind": self.kind,
            "artifact_id": self.artifact_id,
            "model": self.model.to_json(),
            "image_size": self.image_size,
            "context_length": self.context_length,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "autocast_dtype": self.autocast_dtype,
            "stages": None if self.stages is None else [f.to_json() for f in self.stages.features],
            "quantization": None
            if self.onnx is None or self.onnx.quantization is None
            else dict(self.onnx.quantization),
        }


# --------------------------------------------------------------------------- upgrading old schemas

#: format_version 2's flat keys of each kind, moved under ``aoti`` / ``onnx`` in version 3.
_V2_AOTI = ("compile_seconds", "inductor_configs", "compile_threads")
_V2_ONNX = {
    "opset": "opset",
    "onnx_optimized": "optimized",
    "onnxruntime": "session",
    "contrib_ops": "contrib_ops",
    "quantization": "quantization",
}


def _upgrade(doc: Any, file_name: str | None = None) -> dict[str, Any]:
    """``doc`` in the current schema: version 1 (0.1 sidecars) and 2 are upgraded
    (``file_name``: the artifact's name, for a copy that records its hash but not its name)."""
    if not isinstance(doc, dict):
        raise _Invalid("manifest", f"expected a JSON object, got {type(doc).__name__}")
    fmt = doc.get("format")
    if fmt in LEGACY_FORMATS:
        doc = {**doc, "format": FORMAT, "format_version": 2, "kind": LEGACY_FORMATS[fmt]}
        inputs = doc.get("inputs")
        if isinstance(inputs, list) and len(inputs) == 2 and all(isinstance(i, dict) for i in inputs):
            doc.setdefault("image_size", (inputs[0].get("shape") or [None])[-1])
            doc.setdefault("context_length", (inputs[1].get("shape") or [None])[-1])
            doc["inputs"] = [{"dtype": d, **i} for d, i in zip(("float32", "int64"), inputs, strict=True)]
        doc.setdefault("artifact_id", "")
    elif fmt != FORMAT:
        raise _Invalid("format", f"expected {FORMAT!r}, got {fmt!r}")
    version_ = doc.get("format_version")
    if version_ == FORMAT_VERSION:
        return doc
    if version_ != 2:
        raise _Invalid(
            "format_version",
            f"expected 1, 2 or {FORMAT_VERSION}, got {version_!r} (written by a newer sam3-exportable?)",
        )
    up = {k: v for k, v in doc.items() if k not in (*_V2_AOTI, *_V2_ONNX, "artifact", "sha256", "size_bytes")}
    up["format_version"] = FORMAT_VERSION
    if doc.get("kind") == "aoti":
        up["aoti"] = {k: doc.get(k) for k in _V2_AOTI}
    if doc.get("kind") == "onnx":
        up["onnx"] = {new: doc.get(old) for old, new in _V2_ONNX.items()}
        up["onnx"]["optimized"] = bool(doc.get("onnx_optimized", True))
        up["onnx"]["contrib_ops"] = doc.get("contrib_ops") or []
    if "sha256" in doc:
        up["file"] = {
            "name": doc.get("artifact") or file_name,
            "sha256": doc.get("sha256"),
            "size_bytes": doc.get("size_bytes"),
        }
    source = doc.get("source")
    if isinstance(source, dict):
        up["source"] = {k: source.get(k) for k in ("kind", "artifact_id", "artifact", "sha256")}
    return up


# --------------------------------------------------------------------------- writing


def publish(
    target: str | os.PathLike[str],
    manifest: Manifest,
    write: Callable[[Path, Manifest, Staging], Manifest],
    *,
    force: bool = False,
    suffix: str = "",
) -> Manifest:
    """Write an artifact and its manifest copy as one commit; return the full manifest.

    The one writer of every kind. ``write(tmp, manifest, staging)`` writes the artifact file
    to ``tmp`` (a staging name ending in ``suffix``, default ``.tmp`` plus ``target``'s own
    suffix, which torch's writers expect), stages any data file with ``staging``, embeds
    the manifest and returns the manifest it embedded (``manifest`` with the records of the
    data files added). The copy beside the file adds the file's own record. On any failure
    (also an interrupt) nothing is replaced. Raises :class:`~..errors.OutputPathError` for
    an existing target without ``force``.
    """
    target = Path(target)
    with Staging(force=force) as staging:
        tmp = staging.file(target, suffix=suffix or f".tmp{target.suffix}")
        embedded = write(tmp, manifest, staging)
        full = dataclasses.replace(embedded, file=FileRecord.of(target.name, tmp))
        staging.file(manifest_path(target)).write_text(full.dumps())
        staging.commit()
    return full


# --------------------------------------------------------------------------- reading


def _read_zip_embedded(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{EMBEDDED_NAME}")]
            if not names:
                return None
            return archive.read(names[0]).decode("utf-8")
    except (zipfile.BadZipFile, OSError, KeyError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: expected a readable archive, could not read it: {exc}") from None


def _read_embedded_text(path: Path) -> str | None:
    """The manifest text inside the artifact file, or None if it carries none."""
    if zipfile.is_zipfile(path):
        return _read_zip_embedded(path)
    try:
        return read_metadata_prop(path, ONNX_METADATA_KEY)
    except ValueError:
        return None  # neither a zip nor an ONNX protobuf


def _read_copy(path: Path) -> Any:
    copy = manifest_path(path)
    if not copy.is_file():
        return None
    try:
        text = copy.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{copy}: expected a readable manifest, could not read it: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{copy}: expected JSON, could not parse it: {exc}") from None


def _damaged(target: Path) -> bool:
    """Whether ``target`` is neither a readable zip archive nor a well-formed protobuf."""
    if zipfile.is_zipfile(target):
        return False
    try:
        read_metadata_prop(target, ONNX_METADATA_KEY)
    except ValueError:
        return True
    return False


def _recorded_size(copy_doc: Any) -> int | None:
    """The file size a manifest copy (version 2 or 3) records, or None."""
    if not isinstance(copy_doc, dict):
        return None
    record = copy_doc.get("file")
    size = record.get("size_bytes") if isinstance(record, dict) else copy_doc.get("size_bytes")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _disagreement(embedded: Any, copy: Any, file_name: str) -> str | None:
    """The first top-level field in which the manifest copy differs from the embedded one
    (both upgraded to the current schema; the copy's own file record aside), or None."""
    try:
        mine, theirs = _upgrade(embedded), _upgrade(copy, file_name)
    except _Invalid as exc:
        return exc.field
    theirs = {k: v for k, v in theirs.items() if k != "file"}
    for key in sorted(set(mine) | set(theirs)):
        if mine.get(key) != theirs.get(key):
            return key
    return None


def read_manifest(path: str | os.PathLike[str], *, kinds: Iterable[str] = KINDS) -> Manifest:
    """Read and validate the manifest of the artifact at ``path``.

    The manifest inside the file decides; the copy beside it, when it belongs to the file
    (same ``artifact_id``), must agree with it in every field and adds :attr:`Manifest.file`
    (the file's own sha256, which loaders check). Without such a copy the manifest inside
    the file is used and a warning says the file's own hash cannot be checked (its data
    files' hashes still are). A 0.1 artifact (manifest only beside the file) is read from
    its copy. Raises :class:`~..errors.ArtifactError` when the file is missing or foreign,
    a manifest is malformed, the copy disagrees (naming the field), or the kind is not in
    ``kinds``.
    """
    target = Path(path)
    accepted = tuple(kinds)
    if not target.is_file():
        raise ArtifactError(f"{target}: expected an artifact file, found none")
    text = _read_embedded_text(target)
    copy_doc = _read_copy(target)
    copy_name = manifest_path(target).name
    if text is None:
        if copy_doc is None:
            raise ArtifactError(
                f"{target}: expected a manifest inside it or beside it ({copy_name}, written by "
                "sam3-exportable export); found none, so this is not a sam3-exportable artifact"
            )
        if isinstance(copy_doc, dict) and copy_doc.get("format") in LEGACY_FORMATS:
            manifest = Manifest.from_json(copy_doc, str(manifest_path(target)), file_name=target.name)
        elif _damaged(target) and _recorded_size(copy_doc) not in (None, target.stat().st_size):
            raise ArtifactError(
                f"{target}: size mismatch: its manifest copy {copy_name} expects "
                f"{_recorded_size(copy_doc)} bytes, the file has {target.stat().st_size} and no "
                "readable manifest inside: the file is truncated or damaged; export it again"
            )
        else:
            raise ArtifactError(
                f"{target}: expected the artifact that {copy_name} describes, got a file that "
                "carries no manifest inside: the file was replaced, or the copy belongs elsewhere"
            )
    else:
        manifest = Manifest.loads(text, f"{target} (embedded manifest)")
        belongs = isinstance(copy_doc, dict) and copy_doc.get("artifact_id") == manifest.artifact_id
        if belongs:
            field = _disagreement(json.loads(text), copy_doc, target.name)
            if field is not None:
                raise ArtifactError(
                    f"{manifest_path(target)}: expected the same {field!r} as the manifest inside "
                    f"{target.name}, got a different one: the copy was edited; restore it or delete it"
                )
            copy = Manifest.from_json(copy_doc, str(manifest_path(target)), file_name=target.name)
            manifest = dataclasses.replace(manifest, file=copy.file)
        else:
            state = "missing" if copy_doc is None else "for another file"
            log.warning(
                "%s: its manifest copy %s is %s; the file's own sha256 is not checked",
                target,
                copy_name,
                state,
            )
    if manifest.kind not in accepted:
        wanted = " or ".join(repr(k) for k in accepted)
        raise ArtifactError(f"{target}: expected a {wanted} artifact, got a {manifest.kind!r} artifact")
    return manifest


def check_file(path: Path, record: FileRecord, digest: str | None = None) -> None:
    """Raise :class:`~..errors.ArtifactError` unless the file at ``path`` exists with the
    size and sha256 of ``record`` (``digest``: its sha256 if already computed)."""
    if not path.is_file():
        raise ArtifactError(f"{path}: expected the file its manifest lists ({record.name}), found none")
    size = path.stat().st_size
    if record.size_bytes is not None and size != record.size_bytes:
        raise ArtifactError(
            f"{path}: size mismatch: the manifest expects {record.size_bytes} bytes, the file has "
            f"{size}; the file was changed or belongs to another artifact"
        )
    digest = digest or sha256_file(path)
    if digest != record.sha256:
        raise ArtifactError(
            f"{path}: sha256 mismatch: the manifest expects {record.sha256}, the file has {digest}; "
            "the file was changed or belongs to another artifact"
        )
