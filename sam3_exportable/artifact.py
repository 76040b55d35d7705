"""Saving and loading ``.pt2`` pipelines with a JSON manifest beside them.

This module imports neither ``sam3`` nor anything that does: a serving process needs only
torch, torchvision and this package to load an artifact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from .errors import ArtifactError

__all__ = [
    "FORMAT",
    "LoadedPipeline",
    "atomic_write",
    "load_pipeline",
    "manifest_path",
    "save_pipeline",
    "sha256_file",
]

#: Identifies manifests written by this library.
FORMAT = "sam3-exportable/pt2"
FORMAT_VERSION = 1

_log = logging.getLogger(__name__)


def manifest_path(path: str | os.PathLike[str]) -> Path:
    """The manifest of ``model.pt2`` is ``model.pt2.json``."""
    return Path(f"{os.fspath(path)}.json")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the body succeeds.

    Raises ``FileExistsError`` if ``path`` exists and ``force`` is False (checked before
    and again just before the move). Nothing is left behind on failure.
    """
    target = Path(path)
    if target.exists() and not force:
        raise FileExistsError(f"{target}: exists; pass force=True (or --force) to overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if target.exists() and not force:
            raise FileExistsError(f"{target}: appeared while writing; pass force=True to overwrite")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _version_of(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def versions_record() -> dict[str, str | None]:
    """Versions of python, torch, torchvision, sam3 and this package, for manifests and results."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version_of("torchvision"),
        "sam3": _version_of("sam3"),
        "sam3_exportable": _version_of("sam3-exportable"),
    }


def write_manifest(
    artifact: str | os.PathLike[str], manifest: dict[str, Any], *, force: bool = False
) -> None:
    """Write ``manifest`` as sorted, indented JSON to ``<artifact>.json``, atomically."""
    with atomic_write(manifest_path(artifact), force=force) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _tensor_spec(meta_val: Any) -> dict[str, Any]:
    shape = [str(d) if isinstance(d, torch.SymInt) else int(d) for d in meta_val.shape]
    return {"shape": shape, "dtype": str(meta_val.dtype).replace("torch.", "")}


def _io_specs(ep: ExportedProgram) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    nodes = {n.name: n for n in ep.graph.nodes}
    inputs = [
        {"name": name, **_tensor_spec(nodes[name].meta["val"])} for name in ep.graph_signature.user_inputs
    ]
    output_node = next(n for n in ep.graph.nodes if n.op == "output")
    outs = output_node.args[0]
    outputs = [{"index": i, **_tensor_spec(o.meta["val"])} for i, o in enumerate(outs)]
    return inputs, outputs


def save_pipeline(
    ep: ExportedProgram,
    path: str | os.PathLike[str],
    *,
    metadata: dict[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write ``ep`` to ``path`` (``torch.export.save``) and its manifest beside it.

    ``metadata`` is merged into the manifest (the export command records the model size,
    image size, context length, tokenizer, patch set and autocast dtype there). Both files
    are written atomically; an existing file is kept unless ``force=True``
    (``FileExistsError``). Returns the manifest.
    """
    target = Path(path)
    manifest_file = manifest_path(target)
    for existing in (target, manifest_file):
        if existing.exists() and not force:
            raise FileExistsError(f"{existing}: exists; pass force=True (or --force) to overwrite")
    inputs, outputs = _io_specs(ep)
    with atomic_write(target, force=force) as tmp:
        torch.export.save(ep, tmp)
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "artifact": target.name,
        "sha256": digest,
        "size_bytes": size,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions_record(),
        "inputs": inputs,
        "outputs": outputs,
        **(metadata or {}),
    }
    write_manifest(target, manifest, force=force)
    return manifest


@dataclasses.dataclass
class LoadedPipeline:
    """An exported program and the manifest it was saved with."""

    program: ExportedProgram
    manifest: dict[str, Any]
    path: Path

    def module(self) -> torch.nn.Module:
        return self.program.module()


def read_manifest(
    path: str | os.PathLike[str], *, expected_format: str | tuple[str, ...] = FORMAT
) -> dict[str, Any]:
    """Read and validate the manifest of the artifact at ``path``; raise ArtifactError.

    ``expected_format`` is :data:`FORMAT` for ``.pt2`` programs, ``aoti.AOTI_FORMAT`` for
    AOTInductor packages, or a tuple of accepted formats."""
    accepted = (expected_format,) if isinstance(expected_format, str) else expected_format
    target = Path(path)
    if not target.is_file():
        raise ArtifactError(f"{target}: expected a .pt2 file, found none")
    manifest_file = manifest_path(target)
    if not manifest_file.is_file():
        raise ArtifactError(
            f"{target}: expected its manifest {manifest_file.name} beside it (written by "
            "sam3-exportable export); found none, so this is not a sam3-exportable artifact"
        )
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{manifest_file}: expected JSON, could not read it: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") not in accepted:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        wanted = " or ".join(repr(f) for f in accepted)
        raise ArtifactError(f"{manifest_file}: expected format {wanted}, got {got!r}")
    return manifest


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
    all the time and a hashing thread slowed the load by more than the hash costs (measured:
    14.8 s vs 9.8 s + 2.6 s). The child imports only ``hashlib``. If it cannot be started,
    :meth:`result` hashes in this process instead.
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


def _check_digest(target: Path, manifest: dict[str, Any], digest: str) -> None:
    if digest != manifest.get("sha256"):
        raise ArtifactError(
            f"{target}: sha256 mismatch: the manifest expects {manifest.get('sha256')}, "
            f"the file has {digest}; the file was changed or belongs to another manifest"
        )


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


def load_pipeline(
    path: str | os.PathLike[str],
    *,
    verify_hash: bool = True,
    hash_first: bool = False,
    fast: bool = True,
) -> LoadedPipeline:
    """Load a ``.pt2`` written by :func:`save_pipeline`, checking its manifest and sha256.

    Raises :class:`ArtifactError` when the file or manifest is missing or foreign, or the
    file's sha256 differs from the manifest's; no program is returned unless the whole
    file's sha256 matched (with ``verify_hash=True``, the default).

    Hash timing: the sha256 of a 3.4 GB file costs ~2.6 s of one core. By default it is
    computed by a child Python process *while* the file is deserialized and checked before
    returning, so it costs little wall time on a machine with a spare core; the trade-off is
    that a corrupted file is parsed before it is rejected (a parse error then surfaces as the
    sha256 mismatch). ``hash_first=True`` checks the hash before reading anything else
    (the previous behaviour; slower by the hash time). Neither makes it safe to load files
    from an untrusted source: the manifest sits beside the file, and ``torch.export.load``
    unpickles and evaluates parts of it.

    ``fast=True`` (default) loads with :func:`sam3_exportable.fast_load.load_program`:
    ``torch.export.load`` with memoized parsing and the weights memory-mapped from the file
    (copy-on-write: writing to the tensors never changes the file; the file must not be
    truncated or rewritten in place while the program is alive, replacing it by a rename is
    safe). If torch's internals it needs differ, it logs a warning naming what and uses
    ``torch.export.load``. ``fast=False`` always uses ``torch.export.load`` (weights copied
    into private memory).
    """
    target = Path(path)
    manifest = read_manifest(target)
    hasher: _BackgroundSha256 | None = None
    if verify_hash and hash_first:
        _check_digest(target, manifest, sha256_file(target))
    elif verify_hash:
        hasher = _BackgroundSha256(target)
    import torchvision  # noqa: F401  registers torchvision::roi_align before load

    # torch warns once per unbacked symbol of the box-RPB size check ("Symbol u0 did not
    # appear in the graph"): expected for this graph, so not shown to users.
    serde_log = logging.getLogger("torch._export.serde.serialize")
    level = serde_log.level
    serde_log.setLevel(logging.ERROR)
    try:
        program = _load_program(target, fast)
    except Exception:
        if hasher is not None:
            _check_digest(target, manifest, hasher.result())  # a corrupt file explains the failure
        raise
    except BaseException:  # KeyboardInterrupt and the like: don't leave the hasher running
        if hasher is not None:
            hasher.cancel()
        raise
    finally:
        serde_log.setLevel(level)
    if hasher is not None:
        _check_digest(target, manifest, hasher.result())
    return LoadedPipeline(program=program, manifest=manifest, path=target)
