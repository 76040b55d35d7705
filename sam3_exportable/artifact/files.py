"""Writing files so that no interrupt, full disk or crash leaves a half-written one.

Every output of this package is written to a temporary file beside its final path and moved
into place with ``os.replace`` only once complete (:class:`Staging` for several files that
go together, :func:`atomic_write` for one). Files get the permissions a plain ``open()``
would give them under the process's umask (``0o666 & ~umask``; directories ``0o777 &
~umask``), not the 0600 of ``tempfile``. :func:`check_output_file` and
:func:`check_output_dir` refuse an output location before any heavy work runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import OutputExistsError, OutputPathError

__all__ = [
    "Staging",
    "atomic_write",
    "check_output_dir",
    "check_output_file",
    "current_umask",
    "free_bytes",
    "make_dir",
    "sha256_file",
    "signals_deferred",
    "staged_dir",
]

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``/proc``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere: set and restore (not atomic for other threads' files)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes available to this user on the file system holding ``path`` (or its nearest
    existing ancestor)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    st = os.statvfs(probe)
    return st.f_bavail * st.f_frsize


def _nearest_existing(path: Path) -> Path:
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _probe_writable(directory: Path, what: str) -> None:
    """Raise :class:`OutputPathError` unless a file can be created in ``directory`` (or, if it
    does not exist yet, in its nearest existing ancestor)."""
    existing = _nearest_existing(directory)
    if not existing.is_dir():
        raise OutputPathError(f"{what}: expected a directory at {existing}, found a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sam3-exportable-probe.", dir=existing)
    except OSError as exc:
        raise OutputPathError(f"{what}: cannot write in {existing}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str | os.PathLike[str], *, force: bool, what: str = "--out") -> Path:
    """Refuse ``path`` as an output file before heavy work: a directory, an existing file
    without ``force``, or a location that cannot be written. Returns it as a Path.

    Raises :class:`OutputPathError` naming ``what`` and the reason.
    """
    target = Path(path)
    if target.is_dir():
        raise OutputPathError(
            f"{what} {target}: is a directory; expected the path of a file to write, "
            f"e.g. {target / 'sam3.pt2'}"
        )
    if target.exists() and not force:
        raise OutputExistsError(f"{what} {target}: exists; pass --force (force=True) to overwrite")
    _probe_writable(target.parent, f"{what} {target}")
    return target


def check_output_dir(path: str | os.PathLike[str], *, what: str = "--out") -> Path:
    """Refuse ``path`` as an output directory to create or replace: the current directory or
    one of its ancestors, a file, or a location that cannot be written. Returns it as a Path.

    Whether an existing directory may be reused is the caller's decision (resume, force).
    Raises :class:`OutputPathError`.
    """
    target = Path(path)
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputPathError(
            f"{what} {path}: is the current directory or one of its parents; expected a new "
            "directory for the outputs, e.g. out/"
        )
    if target.is_symlink() and not target.exists():
        raise OutputPathError(
            f"{what} {target}: is a symbolic link to {os.readlink(target)}, which does not exist; "
            "expected a directory (create its target, or choose another --out)"
        )
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{what} {target}: is a file; expected a directory")
    _probe_writable(target, f"{what} {target}")
    return target


def make_dir(path: str | os.PathLike[str]) -> Path:
    """``mkdir -p`` with the umask's permissions (what ``mkdir`` gives); returns the Path."""
    target = Path(path)
    target.mkdir(parents=True, exist_ok=True, mode=0o777)
    return target


def _give_umask_permissions(path: Path, directory: bool = False) -> None:
    base = 0o777 if directory else 0o666
    os.chmod(path, base & ~current_umask())


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the body runs (a handful of renames), then deliver them:
    an interrupt lands before or after the body, never inside it. No effect off the main
    thread.

    The Python-level handlers are swapped for ones that only record the signal, and the
    recorded signals are raised again once the previous handlers are back. (A thread signal
    mask would not do: the kernel hands a process-directed signal to any thread that does not
    block it, torch's worker threads included, and Python then runs the handler in the main
    thread inside the body.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def record(signum: int, frame: Any) -> None:
        pending.append(signum)

    previous = {signum: signal.signal(signum, record) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


class Staging:
    """Temporary files for a set of outputs that are published together.

    ``staging.file(target)`` returns a temporary path beside ``target`` to write; after the
    body, :meth:`commit` moves every staged file into place in the order staged (with SIGINT
    and SIGTERM held, so an interrupt lands before or after the renames), each with umask
    permissions. Anything not committed is deleted when the context exits, also on
    exceptions, so a failure (disk full, interrupt, error) leaves the previous outputs as
    they were. Existing targets are replaced only with ``force`` (checked at staging and
    again at commit): ``OutputPathError`` otherwise.
    """

    def __init__(self, *, force: bool = False) -> None:
        self.force = force
        self._staged: list[tuple[Path, Path]] = []
        self._new: list[Path] = []
        self.committed = False

    def file(self, target: str | os.PathLike[str], *, suffix: str = ".tmp") -> Path:
        """A new empty temporary file beside ``target`` (name ending in ``suffix``) that
        :meth:`commit` moves to ``target``."""
        target = Path(target)
        if target.exists() and not self.force:
            raise OutputExistsError(f"{target}: exists; pass --force (force=True) to overwrite")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
        self._staged.append((tmp, target))
        return tmp

    def new_file(self, target: str | os.PathLike[str]) -> Path:
        """Reserve a file that is written at its final path, which must not exist (a name no
        other file uses, like an artifact's own external-data file): it is deleted unless
        committed, and kept as it is by :meth:`commit`."""
        target = Path(target)
        if target.exists():
            raise OutputExistsError(f"{target}: exists; expected a new file name")
        self._new.append(target)
        return target

    def commit(self) -> None:
        for path in self._new:
            if path.exists():
                _give_umask_permissions(path)
        for tmp, target in self._staged:
            if target.exists() and not self.force:
                raise OutputExistsError(f"{target}: appeared while writing; pass --force to overwrite")
            if target.is_dir():
                raise OutputPathError(f"{target}: is a directory; expected a file path")
            _give_umask_permissions(tmp)
        with signals_deferred():
            for tmp, target in self._staged:
                os.replace(tmp, target)
            self.committed = True

    def discard(self) -> None:
        for tmp, _ in self._staged:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if not self.committed:
            for path in self._new:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the body succeeds.

    Raises :class:`OutputPathError` if ``path`` exists and ``force`` is False (checked before
    and again just before the move). Nothing is left behind on failure.
    """
    with Staging(force=force) as staging:
        tmp = staging.file(path)
        yield tmp
        staging.commit()


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new temporary directory beside ``target`` (umask permissions); it is removed
    with its contents when the context exits unless the body moved it away."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    _give_umask_permissions(tmp, directory=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
