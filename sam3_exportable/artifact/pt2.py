"""``.pt2`` programs: :func:`save_pipeline` and :func:`load_pipeline`.

A serving process needs only torch, torchvision and this package to load one; nothing here
imports ``sam3``.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from ..errors import ArtifactError
from .base import Artifact
from .files import check_output_file, sha256_file
from .manifest import EMBEDDED_NAME, check_sha256, describe_program, publish, read_manifest

__all__ = ["LoadedPipeline", "Pt2Artifact", "load_pipeline", "save_pipeline"]

_log = logging.getLogger(__name__)


def save_pipeline(
    ep: ExportedProgram,
    path: str | os.PathLike[str],
    *,
    metadata: dict[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write ``ep`` to ``path`` (``torch.export.save``, manifest inside) and the manifest copy
    ``<path>.json`` beside it, as one commit; return the manifest.

    The manifest is the complete one (:mod:`.manifest`) whoever calls this: the model, patch
    set and audit come from the export that made ``ep`` (:func:`..export.export_full_pipeline`
    records them), so the CLI and a Python caller write the same fields. ``metadata`` is
    merged last. An existing file is kept unless ``force=True``
    (:class:`~..errors.OutputExistsError`, a ``FileExistsError``); an interrupt or a full disk
    leaves the previous artifact in place.
    """
    target = check_output_file(path, force=force, what="save_pipeline path")
    doc = describe_program(ep, "pt2", extra=metadata)

    def write(tmp: Path, embedded: str) -> None:
        torch.export.save(ep, tmp, extra_files={EMBEDDED_NAME: embedded})

    return publish(target, doc, write, force=force)


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

    def __init__(self, program: ExportedProgram, manifest: dict[str, Any], path: Path | None) -> None:
        super().__init__(manifest, path)
        self.program = program
        self._module: Any = None

    @classmethod
    def from_program(cls, program: ExportedProgram) -> Pt2Artifact:
        """An artifact of an in-memory program (manifest described from it, no file)."""
        return cls(program, describe_program(program, "pt2"), None)

    def module(self) -> torch.nn.Module:
        """The program's callable module (no input checks), as ``ExportedProgram.module()``."""
        if self._module is None:
            self._module = self.program.module()
        return self._module

    def _run(self, images: torch.Tensor, token_ids: torch.Tensor) -> Any:
        return self.module()(images, token_ids)


#: The name of :class:`Pt2Artifact` in sam3-exportable 0.1.
LoadedPipeline = Pt2Artifact


def load_pipeline(
    path: str | os.PathLike[str],
    *,
    verify_hash: bool = True,
    hash_first: bool = False,
    fast: bool = True,
) -> Pt2Artifact:
    """Load a ``.pt2`` written by :func:`save_pipeline`, checking its manifest and sha256.

    Raises :class:`~..errors.ArtifactError` when the file is missing or foreign, torch cannot
    load it, or its sha256 differs from the manifest copy's; no program is returned unless
    the whole file's sha256 matched (with ``verify_hash=True``, the default, and a manifest
    copy that belongs to the file; without one, the manifest inside the file is used and the
    hash cannot be checked: a warning says so).

    Hash timing: by default the sha256 is computed by a child Python process *while* the file
    is deserialized and checked before returning, so it costs little wall time on a machine
    with a spare core; a corrupted file is then parsed before it is rejected (a parse error
    surfaces as the sha256 mismatch). ``hash_first=True`` checks the hash before reading
    anything else. Neither makes it safe to load files from an untrusted source:
    ``torch.export.load`` unpickles and evaluates parts of the file.

    ``fast=True`` (default) loads with :func:`.fast_load.load_program`: ``torch.export.load``
    with memoized parsing and the weights memory-mapped from the file (copy-on-write: writing
    to the tensors never changes the file; the file must not be truncated or rewritten in
    place while the program is alive, replacing it by a rename is safe). If torch's internals
    differ, it logs a warning and uses ``torch.export.load``. ``fast=False`` always uses
    ``torch.export.load`` (weights copied into private memory).
    """
    target = Path(path)
    manifest = read_manifest(target, kinds=("pt2",))
    check = verify_hash and "sha256" in manifest
    hasher: _BackgroundSha256 | None = None
    if check and hash_first:
        check_sha256(target, manifest, sha256_file(target))
    elif check:
        hasher = _BackgroundSha256(target)
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
            program = _load_program(target, fast)
    except _FOREIGN_FILE_ERRORS as exc:
        if hasher is not None:
            check_sha256(target, manifest, hasher.result())  # a corrupt file explains the failure
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
    if hasher is not None:
        check_sha256(target, manifest, hasher.result())
    return Pt2Artifact(program, manifest, target)
