"""The artifact manifest: its schema, the one writer, the one reader.

Every artifact is one file (``.pt2`` program, AOTInductor package ``.aoti.pt2``, ONNX graph
``.onnx`` with its external-data file) that carries its manifest **inside** (a pt2
archive's ``extra/`` record; the ONNX model's ``metadata_props``), so the file alone is
the unit of atomicity: an interrupted or failed export leaves the previous artifact or the
new one, never a mismatched pair. ``<artifact>.json`` beside it is a readable copy that adds
the file's sha256 and size; :func:`read_manifest` uses it when it belongs to the file (same
``artifact_id``) and checks the hash from it, and falls back to the embedded manifest (with a
warning that integrity is unchecked) when the copy is missing or stale.

Schema (``format`` ``"sam3-exportable"``, ``format_version`` 2), top-level keys:

========================  ==================================================================
``kind``                  ``"pt2"``, ``"aoti"`` or ``"onnx"``
``artifact_id``           random hex id shared by the file's embedded manifest and its copy
``created``, ``exported_by``, ``versions``  when, by which sam3-exportable, with which
                          python/torch/torchvision/sam3 (and onnx/onnxruntime for ONNX)
``model``                 size, parameters, checkpoint, random_weights, seed,
                          missing_keys, unexpected_keys (:class:`..export.builders.BuildInfo`)
``patches``               names of the patches the exporting session held
``inputs``, ``outputs``   ``[{"name", "shape", "dtype"}]``; symbolic dims as their symbol
``image_size``, ``context_length``, ``vocab_size``, ``normalize``, ``tokenizer``
                          the input contract (:mod:`..contract`, :mod:`..tokenizer`)
``autocast_dtype``        ``"bf16"``/``"fp16"`` when the graph runs under autocast, else null
``audit``                 the dynamic-shape audit: symbols and ranges of batch/num_prompts
``size_hints``            the sizes the program was traced at (AOTInductor plans by them)
``source``                for a kind compiled from a program: that program's artifact id
``artifact``, ``sha256``, ``size_bytes``  the file (only in the copy beside it)
``data_files``            ONNX: ``[{"name", "sha256", "size_bytes"}]`` of external data
kind-specific keys        AOTInductor: ``compile_seconds``, ``inductor_configs``,
                          ``compile_threads``; ONNX: ``opset``, ``onnxruntime`` (the
                          session settings the artifact expects), ``quantization``
========================  ==================================================================

Manifests of sam3-exportable 0.1 (``format`` ``"sam3-exportable/pt2"`` or ``".../aoti"``,
sidecar only) are read as ``format_version`` 1.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import platform
import uuid
import weakref
import zipfile
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from ..contract import DYNAMIC_DIMS, INPUT_NAMES, NORMALIZE_MEAN, NORMALIZE_STD, OUTPUT_NAMES
from ..errors import ArtifactError
from ..tokenizer import BPE_VOCAB_SHA256, TOKENIZER_KIND
from .files import Staging, sha256_file

__all__ = [
    "EMBEDDED_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "KINDS",
    "Provenance",
    "derive_manifest",
    "describe_program",
    "finish",
    "manifest_path",
    "program_io",
    "provenance_of",
    "publish",
    "read_manifest",
    "record_provenance",
    "size_hints",
    "stage_copy",
    "versions_record",
]

log = logging.getLogger(__name__)

FORMAT = "sam3-exportable"
FORMAT_VERSION = 2
KINDS = ("pt2", "aoti", "onnx")
#: sam3-exportable 0.1's formats, read as format_version 1
LEGACY_FORMATS = {"sam3-exportable/pt2": "pt2", "sam3-exportable/aoti": "aoti"}
#: Name of the manifest record inside pt2 archives (under ``<archive>/extra/``).
EMBEDDED_NAME = "sam3_exportable_manifest.json"
#: The ``metadata_props`` key under which an ``.onnx`` graph carries its manifest.
ONNX_METADATA_KEY = "sam3_exportable.manifest"
#: Keys only the copy beside the file has (the file cannot hold its own hash).
FILE_KEYS = ("artifact", "sha256", "size_bytes")
#: Keys a manifest must have, with their types.
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "kind": str,
    "image_size": int,
    "context_length": int,
    "inputs": list,
    "outputs": list,
}


def manifest_path(path: str | os.PathLike[str]) -> Path:
    """The copy of ``model.pt2``'s manifest is ``model.pt2.json``."""
    return Path(f"{os.fspath(path)}.json")


def _version_of(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def versions_record(*extra: str) -> dict[str, str | None]:
    """Versions of python, torch, torchvision, sam3, this package and ``extra`` packages."""
    record = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version_of("torchvision"),
        "sam3": _version_of("sam3"),
        "sam3_exportable": _version_of("sam3-exportable"),
    }
    record.update({name: _version_of(name) for name in extra})
    return record


# --------------------------------------------------------------------------- provenance


@dataclasses.dataclass(frozen=True)
class Provenance:
    """What the export knew about a program that the program itself does not hold."""

    model: dict[str, Any]
    patches: tuple[str, ...]
    autocast_dtype: str | None
    vocab_size: int | None
    audit: dict[str, Any] | None


_PROVENANCE: weakref.WeakKeyDictionary[Any, Provenance] = weakref.WeakKeyDictionary()

#: The manifest keys a Provenance fills (also carried from a source manifest).
_PROVENANCE_KEYS = ("model", "patches", "autocast_dtype", "vocab_size", "audit")


def record_provenance(program: Any, provenance: Provenance) -> None:
    """Attach ``provenance`` to an in-memory program (held as long as the program lives)."""
    _PROVENANCE[program] = provenance


def provenance_of(program: Any) -> Provenance | None:
    """The provenance the export recorded for ``program``, or None (e.g. a loaded one)."""
    return _PROVENANCE.get(program)


# --------------------------------------------------------------------------- describing programs


def _tensor_spec(name: str, meta_val: Any) -> dict[str, Any]:
    shape = [str(d) if isinstance(d, torch.SymInt) else int(d) for d in meta_val.shape]
    return {"name": name, "shape": shape, "dtype": str(meta_val.dtype).replace("torch.", "")}


def program_io(ep: torch.export.ExportedProgram) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Input and output specs of an exported pipeline, named as in :mod:`..contract`."""
    nodes = {n.name: n for n in ep.graph.nodes}
    user_inputs = list(ep.graph_signature.user_inputs)
    names = list(INPUT_NAMES) if len(user_inputs) == len(INPUT_NAMES) else user_inputs
    inputs = [
        _tensor_spec(name, nodes[node].meta["val"]) for name, node in zip(names, user_inputs, strict=True)
    ]
    output_node = next(n for n in ep.graph.nodes if n.op == "output")
    outs = output_node.args[0]
    out_names = (
        list(OUTPUT_NAMES) if len(outs) == len(OUTPUT_NAMES) else [f"output_{i}" for i in range(len(outs))]
    )
    outputs = [_tensor_spec(name, o.meta["val"]) for name, o in zip(out_names, outs, strict=True)]
    return inputs, outputs


def size_hints(ep: torch.export.ExportedProgram) -> dict[str, int]:
    """The size hint ``ep`` carries for each dim of :data:`..contract.DYNAMIC_DIMS`: the size
    it was traced at (kept by ``torch.export.save``/``load``). AOTInductor plans its loops
    by these. Dims that are not symbolic, or inputs the program lacks, are left out."""
    nodes = {n.name: n for n in ep.graph.nodes}
    user_inputs = list(ep.graph_signature.user_inputs)
    hints: dict[str, int] = {}
    for index, dim, name in DYNAMIC_DIMS:
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
    inherit: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of an artifact of ``kind`` made from ``ep``, without the file keys.

    The model, patches, autocast dtype, vocab size and audit come from the provenance the
    export recorded for ``ep`` (:func:`record_provenance`); for a program without one (a
    loaded ``.pt2``) from ``inherit``, the manifest of the artifact it was loaded from;
    otherwise they are recorded as unknown. ``extra`` adds kind-specific keys last.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    inputs, outputs = program_io(ep)
    if len(inputs) != 2 or not all(isinstance(i["shape"][-1], int) for i in inputs):
        raise ArtifactError(
            f"program: expected the two inputs (images, token_ids) of the SAM3 pipeline, got {inputs}"
        )
    prov = provenance_of(ep)
    carried: dict[str, Any]
    if prov is not None:
        carried = {key: getattr(prov, key) for key in _PROVENANCE_KEYS}
        carried["patches"] = list(prov.patches)
    else:
        carried = {key: (inherit or {}).get(key) for key in _PROVENANCE_KEYS}
        carried["model"] = carried["model"] or {"size": "unknown", "random_weights": None}
        carried["patches"] = carried["patches"] if carried["patches"] is not None else []
    doc: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "artifact_id": uuid.uuid4().hex,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "exported_by": f"sam3-exportable {_version_of('sam3-exportable')}",
        "versions": versions_record(),
        **carried,
        "inputs": inputs,
        "outputs": outputs,
        "image_size": int(inputs[0]["shape"][-1]),
        "context_length": int(inputs[1]["shape"][-1]),
        "normalize": {"mean": list(NORMALIZE_MEAN), "std": list(NORMALIZE_STD)},
        "tokenizer": {"kind": TOKENIZER_KIND, "bpe_vocab_sha256": BPE_VOCAB_SHA256},
        "size_hints": size_hints(ep),
        "strict": False,
    }
    if inherit and prov is None and "artifact_id" in inherit:
        doc["source"] = {"kind": inherit.get("kind"), "artifact_id": inherit["artifact_id"]}
    doc.update(extra or {})
    return doc


def derive_manifest(source: dict[str, Any], *, extra: dict[str, Any]) -> dict[str, Any]:
    """The manifest of an artifact made from the artifact ``source`` describes (the same
    program, transformed: a quantized ONNX graph), without the file keys; ``extra`` last."""
    keep = {k: v for k, v in source.items() if k not in (*FILE_KEYS, "data_files", "artifact_id", "created")}
    return {
        **keep,
        "artifact_id": uuid.uuid4().hex,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"artifact": source.get("artifact"), "sha256": source.get("sha256")},
        **extra,
    }


# --------------------------------------------------------------------------- writing


def _dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def embedded_text(doc: dict[str, Any]) -> str:
    """The manifest as the artifact file embeds it (no file keys)."""
    return _dumps({k: v for k, v in doc.items() if k not in FILE_KEYS})


def finish(
    doc: dict[str, Any], target: Path, written: Path, data_files: Iterable[tuple[str, Path]] = ()
) -> dict[str, Any]:
    """``doc`` plus the file keys of ``written`` (the staged file that becomes ``target``)
    and the sha256 and size of each ``(final name, staged path)`` data file."""
    full = {
        **doc,
        "artifact": target.name,
        "sha256": sha256_file(written),
        "size_bytes": written.stat().st_size,
    }
    data = [
        {"name": name, "sha256": sha256_file(p), "size_bytes": p.stat().st_size} for name, p in data_files
    ]
    if data:
        full["data_files"] = data
    return full


def stage_copy(staging: Staging, target: Path, full: dict[str, Any]) -> None:
    """Stage the readable copy ``<target>.json`` of a finished manifest (committed with the file)."""
    staging.file(manifest_path(target)).write_text(_dumps(full))


def publish(
    target: str | os.PathLike[str],
    doc: dict[str, Any],
    write: Callable[[Path, str], None],
    *,
    force: bool = False,
) -> dict[str, Any]:
    """Write a one-file artifact and its manifest copy as one commit; return the manifest.

    ``write(tmp, embedded)`` writes the artifact to ``tmp`` with the manifest text
    ``embedded`` inside it. On any failure (also an interrupt) nothing is replaced.
    Raises :class:`~..errors.OutputPathError` for an existing target without ``force``.
    """
    target = Path(target)
    with Staging(force=force) as staging:
        tmp = staging.file(target)
        write(tmp, embedded_text(doc))
        full = finish(doc, target, tmp)
        stage_copy(staging, target, full)
        staging.commit()
    return full


# --------------------------------------------------------------------------- reading


def _read_zip_embedded(path: Path) -> dict[str, Any] | None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{EMBEDDED_NAME}")]
            if not names:
                return None
            text = archive.read(names[0]).decode("utf-8")
    except (zipfile.BadZipFile, OSError, KeyError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: expected a readable archive, could not read it: {exc}") from None
    return _parse(text, f"{path} (embedded manifest)")


def _read_embedded(path: Path) -> dict[str, Any] | None:
    """The manifest inside the artifact file, or None if it carries none."""
    if zipfile.is_zipfile(path):
        return _read_zip_embedded(path)
    if path.suffix == ".onnx":
        text = _read_onnx_embedded(path)
        return None if text is None else _parse(text, f"{path} (embedded manifest)")
    return None


def _read_onnx_embedded(path: Path) -> str | None:
    """The manifest text in an ``.onnx`` file's ``metadata_props``, or None if it has none."""
    try:
        import onnx
    except ImportError as exc:
        raise ImportError(
            f"onnx is needed to read ONNX artifacts: pip install 'sam3-exportable[onnx]' ({exc})"
        ) from exc
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError for foreign files
        raise ArtifactError(f"{path}: expected an ONNX model, could not parse it: {exc}") from None
    return next((p.value for p in model.metadata_props if p.key == ONNX_METADATA_KEY), None)


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{where}: expected JSON, could not parse it: {exc}") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _read_copy(path: Path) -> dict[str, Any] | None:
    copy = manifest_path(path)
    if not copy.is_file():
        return None
    try:
        text = copy.read_text()
    except OSError as exc:
        raise ArtifactError(f"{copy}: expected a readable manifest, could not read it: {exc}") from None
    return _parse(text, str(copy))


def _upgrade_legacy(doc: dict[str, Any], where: str) -> dict[str, Any]:
    """A 0.1 manifest (sidecar only) in the current schema, ``format_version`` 1."""
    up = {**doc, "format": FORMAT, "format_version": 1, "kind": LEGACY_FORMATS[doc["format"]]}
    inputs = up.get("inputs")
    if isinstance(inputs, list) and len(inputs) == 2:
        up.setdefault("image_size", inputs[0].get("shape", [None])[-1])
        up.setdefault("context_length", inputs[1].get("shape", [None])[-1])
    return up


def _validate(doc: dict[str, Any], where: str) -> dict[str, Any]:
    if doc.get("format") != FORMAT:
        raise ArtifactError(f"{where}: expected format {FORMAT!r}, got {doc.get('format')!r}")
    if doc.get("format_version") not in (1, FORMAT_VERSION):
        raise ArtifactError(
            f"{where}: expected format_version 1 or {FORMAT_VERSION}, got {doc.get('format_version')!r} "
            "(written by a newer sam3-exportable?)"
        )
    for key, kind in _REQUIRED.items():
        if not isinstance(doc.get(key), kind) or isinstance(doc.get(key), bool):
            raise ArtifactError(f"{where}: expected {key!r} of type {kind.__name__}, got {doc.get(key)!r}")
    if doc["kind"] not in KINDS:
        raise ArtifactError(f"{where}: expected kind in {list(KINDS)}, got {doc['kind']!r}")
    for key in ("image_size", "context_length"):
        if doc[key] < 1:
            raise ArtifactError(f"{where}: expected a positive {key}, got {doc[key]}")
    return doc


def read_manifest(path: str | os.PathLike[str], *, kinds: Iterable[str] = KINDS) -> dict[str, Any]:
    """Read and validate the manifest of the artifact at ``path``.

    Returns the copy beside the file when it belongs to it (it then has ``sha256``, which
    loaders check), else the manifest inside the file (no ``sha256``; a warning is logged).
    Raises :class:`~..errors.ArtifactError` when the file is missing or foreign, the
    manifest is malformed or for another file, or its kind is not in ``kinds``.
    """
    target = Path(path)
    accepted = tuple(kinds)
    if not target.is_file():
        raise ArtifactError(f"{target}: expected an artifact file, found none")
    embedded = _read_embedded(target)
    copy = _read_copy(target)
    copy_name = manifest_path(target).name
    if embedded is None:
        if copy is None:
            raise ArtifactError(
                f"{target}: expected a manifest inside it or beside it ({copy_name}, written by "
                "sam3-exportable export); found none, so this is not a sam3-exportable artifact"
            )
        where = str(manifest_path(target))
        if copy.get("format") in LEGACY_FORMATS:
            doc = _validate(_upgrade_legacy(copy, where), where)
        elif copy.get("format") == FORMAT:
            raise ArtifactError(
                f"{target}: expected the artifact that {copy_name} describes (id "
                f"{copy.get('artifact_id')}), got a file that carries no manifest: the file was "
                "replaced or the manifest copied from elsewhere"
            )
        else:
            wanted = " or ".join(repr(f) for f in (FORMAT, *LEGACY_FORMATS))
            raise ArtifactError(f"{where}: expected format {wanted}, got {copy.get('format')!r}")
    else:
        doc = _validate(embedded, f"{target} (embedded manifest)")
        if copy is not None and copy.get("artifact_id") == doc.get("artifact_id"):
            doc = _validate(copy, str(manifest_path(target)))
        else:
            state = "missing" if copy is None else "for another file"
            log.warning(
                "%s: its manifest copy %s is %s; using the manifest inside the file (its sha256 "
                "is not checked)",
                target,
                copy_name,
                state,
            )
    if doc["kind"] not in accepted:
        wanted = " or ".join(repr(k) for k in accepted)
        raise ArtifactError(f"{target}: expected a {wanted} artifact, got a {doc['kind']!r} artifact")
    return doc


def check_sha256(target: Path, manifest: dict[str, Any], digest: str) -> None:
    """Raise :class:`~..errors.ArtifactError` unless ``digest`` is the manifest's sha256."""
    if digest != manifest.get("sha256"):
        raise ArtifactError(
            f"{target}: sha256 mismatch: the manifest expects {manifest.get('sha256')}, "
            f"the file has {digest}; the file was changed or belongs to another manifest"
        )
