"""``.pt2`` programs: :func:`save_pipeline` and :func:`load_pipeline`.

A staged archive (``save_pipeline(..., stages=...)``) holds three programs, ``model`` (the
one graph, what ``torch.export.load`` returns), ``encode_images`` and ``ground``, written by
torch's own packager through :class:`_SharedPayloadWriter`, which stores each weight record
once; the loaded :class:`Pt2Artifact` runs the stages (:attr:`Pt2Artifact.stage_programs`).

A serving process needs only torch, torchvision and this package to load one; nothing here
imports ``sam3``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import pickle
import re
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.export import ExportedProgram
from torch.export.pt2_archive._package import PT2ArchiveWriter

from ..errors import ArtifactError
from .base import Artifact
from .files import Staging, check_output_file, sha256_file
from .manifest import (
    EMBEDDED_NAME,
    GROUND,
    STAGE_NAMES,
    Manifest,
    StagesInfo,
    check_file,
    publish,
    read_manifest,
)
from .program import Provenance, describe_program

__all__ = [
    "LoadedPipeline",
    "Pt2Artifact",
    "StagedPrograms",
    "check_no_pickles",
    "load_pipeline",
    "load_pipeline_checked",
    "save_pipeline",
    "write_programs",
]

_log = logging.getLogger(__name__)


class StagedPrograms(Protocol):
    """What :func:`save_pipeline` takes as ``stages`` (``export.stages.StagePrograms``)."""

    info: StagesInfo

    def programs(self) -> Mapping[str, ExportedProgram]: ...


def save_pipeline(
    ep: ExportedProgram,
    path: str | os.PathLike[str],
    *,
    provenance: Provenance | None = None,
    force: bool = False,
    stages: StagedPrograms | None = None,
) -> Manifest:
    """Write ``ep`` to ``path`` (``torch.export.save``, manifest inside) and the manifest copy
    ``<path>.json`` beside it, as one commit; return the manifest.

    The manifest is the complete one (:mod:`.manifest`) whoever calls this: the model, patch
    set and audit come from the provenance :func:`..export.export_full_pipeline` attached to
    the program it returned (or ``provenance``, for a program transformed since), so the CLI
    and a Python caller write the same fields. Raises :class:`~..errors.ArtifactError` for a
    program without provenance. An existing file is kept unless ``force=True``
    (:class:`~..errors.OutputExistsError`, a ``FileExistsError``); an interrupt or a full disk
    leaves the previous artifact in place.

    ``stages`` (:func:`..export.export_stages` of the same model and options) adds the
    ``encode_images`` and ``ground`` programs to the archive beside the one graph
    (``models/<name>.json``), their weights stored once (:class:`_SharedPayloadWriter`), and
    their record to the manifest (:attr:`.manifest.Manifest.stages`).
    """
    target = check_output_file(path, force=force, what="save_pipeline path")
    doc = describe_program(ep, "pt2", provenance=provenance)
    if stages is not None:
        doc = dataclasses.replace(doc, stages=stages.info)

    def write(tmp: Path, manifest: Manifest, staging: Staging) -> Manifest:
        if stages is None:
            torch.export.save(ep, tmp, extra_files={EMBEDDED_NAME: manifest.dumps()})
        else:
            write_programs(tmp, {"model": ep, **stages.programs()}, {EMBEDDED_NAME: manifest.dumps()})
        return manifest

    return publish(target, doc, write, force=force)


#: Weight and constant payload records of a pt2 archive (raw tensor bytes).
_PAYLOAD_RECORD = re.compile(r"^(data/(?:weights|constants)/)((?:weight|tensor)_)\d+$")
_CONFIG_RECORD = re.compile(r"^data/(?:weights|constants)/[^/]+_config\.json$")


class _SharedPayloadWriter(PT2ArchiveWriter):
    """torch's archive writer, storing a payload record whose bytes an earlier program's
    record already holds only once: the later program's config points at that record.

    torch writes each program's payloads, then its config (``path_name`` per tensor); this
    writer renames or drops payloads as they come and rewrites the names in the config that
    follows. A record is shared across programs only, never between two tensors of one
    program (torch's loader would alias them).
    """

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._by_content: dict[tuple[str, bytes, int], list[str]] = {}
        self._names: set[str] = set()
        self._renamed: dict[str, str] = {}  # this config's path_name -> record written
        self._taken: set[str] = set()  # records this config already points at

    def write_bytes(self, name: str, data: bytes) -> None:
        payload = _PAYLOAD_RECORD.match(name)
        if payload is None:
            if _CONFIG_RECORD.match(name):
                data = self._rename_config(data)
            super().write_bytes(name, data)
            return
        folder, prefix = payload.group(1), payload.group(2)
        key = (folder, hashlib.sha256(data).digest(), len(data))
        for record in self._by_content.get(key, []):
            if record not in self._taken:  # an earlier program's: share it
                self._renamed[name[len(folder) :]] = record[len(folder) :]
                self._taken.add(record)
                return
        record, index = name, len(self._names)
        while record in self._names:  # torch counts written records: a dropped one's index recurs
            record, index = f"{folder}{prefix}{index}", index + 1
        self._names.add(record)
        self._by_content.setdefault(key, []).append(record)
        self._taken.add(record)
        self._renamed[name[len(folder) :]] = record[len(folder) :]
        super().write_bytes(record, data)

    def _rename_config(self, data: bytes) -> bytes:
        doc = json.loads(data)
        for meta in (doc.get("config") or {}).values():
            meta["path_name"] = self._renamed.get(meta["path_name"], meta["path_name"])
        self._renamed, self._taken = {}, set()
        return json.dumps(doc).encode()


def write_programs(
    path: Path, programs: Mapping[str, ExportedProgram], extra_files: Mapping[str, str]
) -> None:
    """Write ``programs`` (name -> program; ``"model"`` is what ``torch.export.load`` returns)
    and ``extra_files`` into one pt2 archive at ``path`` with torch's packager, each payload
    stored once however many programs hold it. Raises
    :class:`~..errors.ArtifactError` when this torch lacks the packager's parts."""
    from torch.export.pt2_archive import _package

    package = getattr(_package, "_package_exported_programs", None)
    extras = getattr(_package, "_package_extra_files", None)
    if package is None or extras is None:
        raise ArtifactError(
            f"torch {torch.__version__}: expected torch.export.pt2_archive._package to have "
            "_package_exported_programs and _package_extra_files to write a staged artifact, got none"
        )
    with _SharedPayloadWriter(os.fspath(path)) as writer:
        package(writer, dict(programs))
        extras(writer, dict(extra_files))


_SHA256_CHILD = (
    "import hashlib, sys\n"
    "h = hashlib.sha256()\n"
    "buf = bytearray(1 << 24)\n"
    "view = memoryview(buf)\n"
    "with open(sys.argv[1], 'rb', buffering=0) as fh:\n"
    "    while n := fh.readinto(buf):\n"
    "        h.update(view[:n])\n"
    "print(h.hexdigest())\n"
)


class _BackgroundSha256:
    """sha256 of a file computed by a child Python process while the caller works.

    A child process rather than a thread: the caller's deserialization holds the GIL almost
    all the time, so a hashing thread would slow the load by more than the hash costs. The
    child imports only ``hashlib``. If it cannot be started, :meth:`result` hashes in this
    process instead.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._proc: subprocess.Popen[str] | None
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _SHA256_CHILD, os.fspath(path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        except OSError as exc:
            _log.debug("could not start a sha256 child process (%s); hashing in-process", exc)
            self._proc = None

    def cancel(self) -> None:
        """Stop the child (if any) and reap it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.communicate()

    def result(self) -> str:
        """The file's sha256 hex digest; raises ArtifactError if the file could not be read."""
        if self._proc is None:
            return sha256_file(self._path)
        out, err = self._proc.communicate()
        digest = out.strip()
        if self._proc.returncode != 0 or len(digest) != 64:
            raise ArtifactError(f"{self._path}: could not read it to check its sha256: {err.strip()[-500:]}")
        return digest


#: Payload names torch's ``.pt2`` loader reads as raw tensor bytes; anything else
#: (``custom_obj_*``, ``opaque_obj_*``, entries marked ``use_pickle``) it unpickles.
_TENSOR_PAYLOADS = ("weight_", "tensor_")
_PAYLOAD_CONFIG = re.compile(r"(?:^|/)data/(?:weights|constants)/[^/]+_config\.json$")
_SAMPLE_INPUTS = re.compile(r"(?:^|/)data/sample_inputs/[^/]+\.pt$")
_MODEL = re.compile(r"(?:^|/)models/([^/]+)\.json$")


def check_no_pickles(target: Path) -> None:
    """Raise :class:`~..errors.ArtifactError` unless loading the ``.pt2`` at ``target``
    unpickles nothing: every weight and constant is stored as raw tensor bytes (no entry
    marked ``use_pickle``, no custom or opaque object, no legacy pickled payload), and the
    sample inputs, where a program has any, load with ``torch.load(weights_only=True)``.
    torch's loader would otherwise run ``torch.load(weights_only=False)`` or ``pickle.loads``
    on those entries, executing whatever the file holds; programs this package exports have
    none of them.
    """
    try:
        with zipfile.ZipFile(target) as archive:
            names = archive.namelist()
            models = [m.group(1) for n in names if (m := _MODEL.search(n))]
            configs = [n for n in names if _PAYLOAD_CONFIG.search(n)]
            for model in models:
                for part in ("weights", "constants"):
                    if not any(n.endswith(f"data/{part}/{model}_{part}_config.json") for n in configs):
                        raise ArtifactError(
                            f"{target}: expected {part} stored as tensors with a {part} config, got a "
                            "legacy archive whose payload torch unpickles; refusing to load it"
                        )
            for name in configs:
                doc = json.loads(archive.read(name))
                for fqn, meta in (doc.get("config") or {}).items():
                    path_name = str(meta.get("path_name", ""))
                    if meta.get("use_pickle") or not path_name.startswith(_TENSOR_PAYLOADS):
                        raise ArtifactError(
                            f"{target}: expected every weight and constant stored as tensor bytes, got "
                            f"{fqn!r} as a pickled object ({path_name}); loading would run code from "
                            "the file, so it is refused"
                        )
            for name in (n for n in names if _SAMPLE_INPUTS.search(n)):
                data = archive.read(name)
                if not data:  # a program saved without example inputs (the stages)
                    continue
                try:
                    torch.load(io.BytesIO(data), weights_only=True)
                except Exception as exc:  # the restricted unpickler refuses anything but tensors
                    raise ArtifactError(
                        f"{target}: expected sample inputs of plain tensors, got {name.split('/')[-1]} "
                        f"that only a full unpickler reads ({type(exc).__name__}); refusing to load it"
                    ) from None
    except (zipfile.BadZipFile, OSError, KeyError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"{target}: expected a readable .pt2 archive, could not read it: {exc}") from None


def _load_program(target: Path, fast: bool) -> ExportedProgram:
    if fast:
        from .fast_load import FastLoadUnavailable, load_program

        try:
            return load_program(target)
        except FastLoadUnavailable as exc:
            _log.warning(
                "fast .pt2 loading is unavailable with torch %s (%s); using torch.export.load",
                torch.__version__,
                exc,
            )
    return torch.export.load(target)


def _load_programs(target: Path, fast: bool) -> dict[str, ExportedProgram]:
    """Every program of a staged archive by name (``"model"`` and the stages)."""
    if fast:
        from .fast_load import FastLoadUnavailable, load_programs

        try:
            return load_programs(target)
        except FastLoadUnavailable as exc:
            _log.warning(
                "fast .pt2 loading is unavailable with torch %s (%s); using torch's load_pt2",
                torch.__version__,
                exc,
            )
    from torch.export.pt2_archive._package import load_pt2

    return dict(load_pt2(os.fspath(target)).exported_programs)


#: What torch raises for a file that is not a torch.export program (or a damaged one).
_FOREIGN_FILE_ERRORS = (
    RuntimeError,
    KeyError,
    ValueError,
    OSError,
    EOFError,
    zipfile.BadZipFile,
    pickle.UnpicklingError,
)


class Pt2Artifact(Artifact):
    """A ``.pt2`` program and its manifest (what :func:`load_pipeline` returns).

    Also built from an in-memory program with :meth:`from_program`.
    """

    kind = "pt2"
    array_library = "torch"

    def __init__(
        self,
        program: ExportedProgram,
        manifest: Manifest,
        path: Path | None,
        stages: Mapping[str, ExportedProgram] | None = None,
    ) -> None:
        super().__init__(manifest, path)
        self.program = program
        self._module: Any = None
        #: The stage programs by name (:data:`.manifest.STAGE_NAMES`) of a staged artifact.
        self.stage_programs: dict[str, ExportedProgram] = dict(stages or {})
        self._stage_modules: dict[str, Any] = {}

    @classmethod
    def from_program(cls, program: ExportedProgram) -> Pt2Artifact:
        """An artifact of an in-memory program (manifest described from it, no file)."""
        return cls(program, describe_program(program, "pt2", require_provenance=False), None)

    def module(self) -> torch.nn.Module:
        """The program's callable module (no input checks), as ``ExportedProgram.module()``."""
        if self._module is None:
            self._module = self.program.module()
        return self._module

    def set_threads(self, threads: int) -> None:
        """``torch.set_num_threads(threads)`` (process-wide)."""
        torch.set_num_threads(int(threads))

    def _run(self, *inputs: Any) -> Any:
        return self.module()(*(torch.as_tensor(x) for x in inputs))

    def _run_stage(self, name: str, *inputs: Any) -> Any:
        if name not in self._stage_modules:
            self._stage_modules[name] = self.stage_programs[name].module()
        if name == GROUND:
            features, *rest = inputs
            return self._stage_modules[name](
                tuple(torch.as_tensor(x) for x in features), *(torch.as_tensor(x) for x in rest)
            )
        return self._stage_modules[name](*(torch.as_tensor(x) for x in inputs))


#: The name of :class:`Pt2Artifact` in sam3-exportable 0.1.
LoadedPipeline = Pt2Artifact


def load_pipeline(
    path: str | os.PathLike[str],
    *,
    verify_hash: bool = True,
    hash_first: bool = False,
    fast: bool = True,
) -> Pt2Artifact:
    """Read the manifest of the ``.pt2`` at ``path`` and load it (:func:`load_pipeline_checked`)."""
    target = Path(path)
    manifest = read_manifest(target, kinds=("pt2",))
    return load_pipeline_checked(target, manifest, verify_hash=verify_hash, hash_first=hash_first, fast=fast)


def load_pipeline_checked(
    target: Path,
    manifest: Manifest,
    *,
    verify_hash: bool = True,
    hash_first: bool = False,
    fast: bool = True,
    threads: int | None = None,
) -> Pt2Artifact:
    """Load a ``.pt2`` written by :func:`save_pipeline` whose manifest was read already,
    checking its sha256.

    Raises :class:`~..errors.ArtifactError` when the file is foreign, torch cannot load it,
    or its sha256 differs from the manifest copy's; no program is returned unless the whole
    file's sha256 matched (with ``verify_hash=True``, the default, and a manifest copy that
    belongs to the file; without one the hash cannot be checked: :func:`.manifest.read_manifest`
    warns). ``threads`` sets ``torch.set_num_threads`` (process-wide) when given.

    Hash timing: by default the sha256 is computed by a child Python process *while* the file
    is deserialized and checked before returning, so it costs little wall time on a machine
    with a spare core; a corrupted file is then parsed before it is rejected (a parse error
    surfaces as the sha256 mismatch). ``hash_first=True`` checks the hash before reading
    anything else. Before torch reads the program, :func:`check_no_pickles` refuses a file
    whose loading would unpickle anything (torch's loader runs ``torch.load(weights_only=
    False)`` on entries marked ``use_pickle``): loading runs no code from the file.

    ``fast=True`` (default) loads with :func:`.fast_load.load_program`: ``torch.export.load``
    with memoized parsing and the weights memory-mapped from the file (copy-on-write: writing
    to the tensors never changes the file; the file must not be truncated or rewritten in
    place while the program is alive, replacing it by a rename is safe). If torch's internals
    differ, it logs a warning and uses ``torch.export.load``. ``fast=False`` always uses
    ``torch.export.load`` (weights copied into private memory).
    """
    if manifest.kind != "pt2":
        raise ArtifactError(f"{target}: expected a 'pt2' artifact, got a {manifest.kind!r} artifact")
    if threads:
        torch.set_num_threads(int(threads))
    record = manifest.file if verify_hash else None
    hasher: _BackgroundSha256 | None = None
    if record is not None and hash_first:
        check_file(target, record)
    elif record is not None:
        hasher = _BackgroundSha256(target)
    try:
        check_no_pickles(target)
    except BaseException:
        if hasher is not None:
            hasher.cancel()
        raise
    import torchvision  # noqa: F401  registers torchvision::roi_align before load

    # torch warns once per unbacked symbol of the box-RPB size check ("Symbol u0 did not
    # appear in the graph"): expected for this graph, so not shown to users.
    serde_log = logging.getLogger("torch._export.serde.serialize")
    level = serde_log.level
    serde_log.setLevel(logging.ERROR)
    try:
        # Weights created under inference_mode are inference tensors, and the program then
        # runs other kernels than eager (outputs differ in the last bits): load outside it.
        with torch.inference_mode(False):
            if manifest.stages is None:
                programs = {"model": _load_program(target, fast)}
            else:
                programs = _load_programs(target, fast)
    except _FOREIGN_FILE_ERRORS as exc:
        if hasher is not None and record is not None:
            check_file(target, record, hasher.result())  # a corrupt file explains the failure
        raise ArtifactError(
            f"{target}: expected a torch.export program, torch could not load it: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        ) from exc
    except BaseException:  # KeyboardInterrupt and the like: don't leave the hasher running
        if hasher is not None:
            hasher.cancel()
        raise
    finally:
        serde_log.setLevel(level)
    if hasher is not None and record is not None:
        check_file(target, record, hasher.result())
    missing = [name for name in ("model", *(STAGE_NAMES if manifest.stages else ())) if name not in programs]
    if missing:
        raise ArtifactError(
            f"{target}: expected the programs {missing} in the archive, got {sorted(programs)}"
        )
    stages = {name: programs[name] for name in STAGE_NAMES} if manifest.stages else None
    return Pt2Artifact(programs["model"], manifest, target, stages)
