"""The output directory of a batch job: its layout, what is complete, and every write.

Layout of ``DIR``:

* ``run.json``: the job (:mod:`.job`), written before anything else;
* ``results.jsonl``: one line per segmented image, appended (whole line, flush, fsync) once
  its files are in place: ``{"index", "path", "width", "height", "overlay", "phrases":
  [{"phrase", "mask_png", "instances": [{"score", "box_xyxy", "area", "rle"}]}]}`` (file
  names relative to ``DIR``, None when not written);
* ``errors.jsonl``: one line per image that failed: ``{"index", "path", "error"}``;
* ``masks/<stem>__<j>_<phrase>.png``: instance labels of image ``stem`` and phrase ``j``;
* ``overlays/<stem>.png``; ``coco.json`` (:mod:`.coco`), written at the end of a run.

``<stem>`` is the image's index in the job, zero-padded, and its file name. Every file is
written to a temporary name and renamed (:class:`~..artifact.files.Staging`), the image's
files and its ``results.jsonl`` line together with SIGINT and SIGTERM held, so an interrupt
leaves an image complete or absent, and no temporary file. A line torn by a crash (no
newline at the end) is cut off when the directory is opened again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ..artifact.files import Staging, atomic_write, check_output_dir, make_dir, signals_deferred
from ..errors import OutputExistsError, OutputPathError
from ..predict.outputs import slug
from .job import FORMAT as JOB_FORMAT
from .job import Job, is_job_record, read_job
from .segment import ImageOutcome

__all__ = [
    "COCO_FILE",
    "ERRORS_FILE",
    "MASKS_DIR",
    "OVERLAYS_DIR",
    "RESULTS_FILE",
    "RUN_FILE",
    "OutputDir",
    "check_output",
]

RUN_FILE = "run.json"
RESULTS_FILE = "results.jsonl"
ERRORS_FILE = "errors.jsonl"
COCO_FILE = "coco.json"
MASKS_DIR = "masks"
OVERLAYS_DIR = "overlays"

#: Everything a job writes at the top of ``DIR``, in the order ``--force`` removes it (the
#: results before the job record, so an interrupted removal never pairs a new job with old
#: results).
_OURS = (RESULTS_FILE, ERRORS_FILE, COCO_FILE, MASKS_DIR, OVERLAYS_DIR, RUN_FILE)
#: The lock a run holds on its output directory (``flock``: released by the kernel when the
#: process dies, so a killed run's leftover file is no obstacle).
LOCK_FILE = ".sam3-exportable.lock"


def lock_holder(path: Path) -> int | None:
    """The process id of a live run holding the lock of the output directory ``path``
    (-1 when it cannot be read), or None when no run holds it."""
    lock = path / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _busy(target: Path, pid: int) -> OutputPathError:
    who = f"pid {pid}" if pid > 0 else "another process"
    return OutputPathError(
        f"--out {target}: expected no other run writing to it, got a run in progress ({who}); "
        "wait for it to finish or choose another --out"
    )


def check_output(path: str | os.PathLike[str], job: Job, *, resume: bool, force: bool) -> tuple[Path, str]:
    """Decide, writing nothing, how ``path`` receives ``job``: ``"new"`` (absent or empty),
    ``"resume"`` (a previous run of the same job, with ``resume``; also ``"new"`` when there
    is none yet) or ``"replace"`` (a previous run of ours, with ``force``).

    Raises :class:`~..errors.OutputPathError` for a location that cannot be an output
    (:func:`~..artifact.files.check_output_dir`), a directory holding anything but a previous
    run of ours (never replaced, even with ``force``), a previous run without ``resume`` or
    ``force``, and a ``resume`` of a job with other settings (named).
    """
    target = check_output_dir(path)
    holder = lock_holder(target) if target.is_dir() else None
    if holder is not None:
        raise _busy(target, holder)
    if not target.exists() or not any(p.name != LOCK_FILE for p in target.iterdir()):
        return target, "new"
    record = target / RUN_FILE
    if not record.is_file():
        raise OutputPathError(
            f"--out {target}: expected a new or empty directory, or a previous output of "
            f"sam3-exportable predict; it holds other files and no {RUN_FILE}, so it is left alone"
            f"{' (even with --force)' if force else ''}; choose another --out"
        )
    if not is_job_record(record):
        raise OutputPathError(
            f"--out {target}: expected a previous output of sam3-exportable predict, got a {RUN_FILE} "
            f"that is not ours (no format {JOB_FORMAT!r}), so the directory is left alone"
            f"{' (even with --force)' if force else ''}; choose another --out"
        )
    if resume:
        differ = read_job(record).differences(job)
        if differ:
            raise OutputPathError(
                f"--resume: {record} is another job: it differs in {'; '.join(differ)}; pass the "
                "arguments of that run, or --force to start over"
            )
        return target, "resume"
    if force:
        return target, "replace"
    raise OutputExistsError(
        f"--out {target}: holds a previous run; pass --resume to continue it or --force to replace it"
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _lines(path: Path, images: int) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """``(offset, length, record)`` of every whole line of a JSON-lines file; a last line
    without its newline (torn by a crash while appending) is not read.

    Raises :class:`~..errors.OutputPathError` naming the file and line for a line that is
    not a JSON object with an image ``index`` in ``[0, images)``.
    """
    if not path.is_file():
        return
    with open(path, "rb") as fh:
        offset = 0
        for number, line in enumerate(fh, 1):
            if not line.endswith(b"\n"):
                return
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if not isinstance(record, dict):
                raise OutputPathError(f"{path} line {number}: expected a JSON object, got {line[:60]!r}")
            index = record.get("index")
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < images:
                raise OutputPathError(
                    f"{path} line {number}: expected an image index in [0, {images}), got {index!r}; "
                    "the file was edited: fix or delete the line, or start over with --force"
                )
            yield offset, len(line), record
            offset += len(line)


def _cut_torn_line(path: Path, block: int = 1 << 16) -> None:
    """Truncate a JSON-lines file after its last newline (a torn last line goes), reading
    only its tail."""
    if not path.is_file():
        return
    with open(path, "r+b") as fh:
        size = pos = fh.seek(0, os.SEEK_END)
        end = 0
        while pos > 0:
            step = min(pos, block)
            pos -= step
            fh.seek(pos)
            newline = fh.read(step).rfind(b"\n")
            if newline >= 0:
                end = pos + newline + 1
                break
        if end != size:
            with signals_deferred():
                fh.truncate(end)


class OutputDir:
    """The files of one job in ``path`` (see the module docstring): names, state, writes.

    Reading the state writes nothing; :meth:`prepare` creates or continues the directory,
    then use it as a context manager while writing images.
    """

    def __init__(self, path: Path, job: Job) -> None:
        self.path, self.job = path, job
        self._digits = max(5, len(str(max(len(job.images) - 1, 0))))
        self._phrase_digits = max(2, len(str(len(job.phrases) - 1)))
        self._results: IO[bytes] | None = None
        self._errors: IO[bytes] | None = None
        self._lock: int | None = None

    def _take_lock(self) -> None:
        """Hold the directory's lock for this run; raises :class:`~..errors.OutputPathError`
        when another live run holds it."""
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(self.path, lock_holder(self.path) or -1) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock = fd

    def close_files(self) -> None:
        """Close ``results.jsonl`` and ``errors.jsonl`` (the lock stays held)."""
        for fh in (self._results, self._errors):
            if fh is not None:
                fh.close()
        self._results = self._errors = None

    def release(self) -> None:
        """Close the files and give the directory's lock back (its file goes too)."""
        self.close_files()
        if self._lock is not None:
            with contextlib.suppress(OSError):
                (self.path / LOCK_FILE).unlink()
            os.close(self._lock)  # closing the last descriptor releases the flock
            self._lock = None

    def prepare(self, mode: str) -> None:
        """Make the directory ready for the job in the ``mode`` :func:`check_output` chose:
        ``replace`` removes the previous run's files first (only ours), ``new`` and
        ``replace`` write ``run.json``; on ``resume`` a line torn by a crash is cut off and
        temporary files a killed run left are removed. Nothing is written before this."""
        path, job = self.path, self.job
        make_dir(path)
        self._take_lock()  # before anything of a previous run is touched
        if mode == "replace":
            with signals_deferred():
                for name in _OURS:
                    _remove(path / name)
        if mode != "resume":
            with atomic_write(path / RUN_FILE, force=True) as tmp:
                tmp.write_text(json.dumps(job.to_json(), indent=1) + "\n")
        for folder, wanted in ((MASKS_DIR, job.masks), (OVERLAYS_DIR, job.overlay)):
            if wanted:
                make_dir(path / folder)
        for name in (RESULTS_FILE, ERRORS_FILE):
            _cut_torn_line(path / name)
        for folder in (path, path / MASKS_DIR, path / OVERLAYS_DIR):
            if folder.is_dir():
                for leftover in folder.glob(".*.tmp"):
                    leftover.unlink()

    # -- names -------------------------------------------------------------------------
    @property
    def results_path(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def errors_path(self) -> Path:
        return self.path / ERRORS_FILE

    @property
    def coco_path(self) -> Path:
        return self.path / COCO_FILE

    def stem(self, index: int) -> str:
        return f"{index:0{self._digits}d}_{slug(Path(self.job.images[index]).stem)}"

    def mask_name(self, index: int, phrase: int) -> str:
        j = f"{phrase:0{self._phrase_digits}d}"
        return f"{MASKS_DIR}/{self.stem(index)}__{j}_{slug(self.job.phrases[phrase])}.png"

    def overlay_name(self, index: int) -> str:
        return f"{OVERLAYS_DIR}/{self.stem(index)}.png"

    def _files(self, index: int) -> list[str]:
        names = [self.mask_name(index, j) for j in range(len(self.job.phrases))] if self.job.masks else []
        return names + ([self.overlay_name(index)] if self.job.overlay else [])

    # -- state -------------------------------------------------------------------------
    def result_offsets(self) -> dict[int, tuple[int, int]]:
        """Image index -> ``(offset, length)`` of its last line in ``results.jsonl``."""
        return {
            record["index"]: (offset, length)
            for offset, length, record in _lines(self.results_path, len(self.job.images))
        }

    def results(self) -> Iterator[dict[str, Any]]:
        """The ``results.jsonl`` record of every segmented image, in job order."""
        offsets = self.result_offsets()
        if not offsets:
            return
        with open(self.results_path, "rb") as fh:
            for index in sorted(offsets):
                offset, length = offsets[index]
                fh.seek(offset)
                yield json.loads(fh.read(length))

    def errors(self) -> dict[int, dict[str, Any]]:
        """Image index -> its ``errors.jsonl`` record, for every image that failed."""
        return {record["index"]: record for _, _, record in _lines(self.errors_path, len(self.job.images))}

    def complete(self) -> set[int]:
        """Indices of the images whose ``results.jsonl`` line and files are all present and
        whose input file is unchanged since (size and mtime as recorded)."""
        done = set()
        for index, record in self._last_records(self.results_path).items():
            if _unchanged(record) and all(_nonempty(self.path / name) for name in self._files(index)):
                done.add(index)
        return done

    def failed_unchanged(self) -> set[int]:
        """Indices of the images that failed and whose input file is unchanged since."""
        return {index for index, record in self.errors().items() if _unchanged(record)}

    def _last_records(self, path: Path) -> dict[int, dict[str, Any]]:
        return {record["index"]: record for _, _, record in _lines(path, len(self.job.images))}

    def compact(self) -> None:
        """One line per image: an image run again (its input changed, or it failed before)
        keeps only its last ``results.jsonl`` line, and no ``errors.jsonl`` line once it has
        results. Rewritten atomically, only when there is something to drop."""
        results = self._last_records(self.results_path)
        errors = {i: r for i, r in self._last_records(self.errors_path).items() if i not in results}
        for path, keep in ((self.results_path, results), (self.errors_path, errors)):
            if not path.is_file():
                continue
            lines = sum(1 for _ in _lines(path, len(self.job.images)))
            if lines == len(keep):
                continue
            with signals_deferred(), atomic_write(path, force=True) as tmp:
                tmp.write_bytes(b"".join((json.dumps(keep[i]) + "\n").encode() for i in sorted(keep)))

    def forget_errors(self) -> None:
        """Empty ``errors.jsonl`` (the failed images are then pending again)."""
        if self.errors_path.exists():
            with atomic_write(self.errors_path, force=True) as tmp:
                tmp.write_bytes(b"")

    # -- writes ------------------------------------------------------------------------
    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _append(self, which: str, record: dict[str, Any]) -> None:
        fh = getattr(self, which)
        if fh is None:
            fh = open(self.path / (RESULTS_FILE if which == "_results" else ERRORS_FILE), "ab")
            setattr(self, which, fh)
        fh.write((json.dumps(record) + "\n").encode())
        fh.flush()
        os.fsync(fh.fileno())

    def write_image(self, index: int, outcome: ImageOutcome) -> dict[str, Any]:
        """Write a segmented image's files and its ``results.jsonl`` line; return the line."""
        encoded = outcome.encoded
        if encoded is None:
            raise ValueError(f"image {outcome.path}: expected a segmented image, got a failure")
        files: list[tuple[str, bytes]] = []
        phrases = []
        for j, entry in enumerate(encoded.phrases):
            name = None
            if self.job.masks:
                name = self.mask_name(index, j)
                files.append((name, encoded.mask_pngs[j]))
            phrase = {"phrase": entry["phrase"], "mask_png": name, "instances": entry["instances"]}
            if "prompt_boxes" in entry:
                phrase["prompt_boxes"] = entry["prompt_boxes"]
            phrases.append(phrase)
        overlay = None
        if self.job.overlay and encoded.overlay_png is not None:
            overlay = self.overlay_name(index)
            files.append((overlay, encoded.overlay_png))
        line = {
            "index": index,
            "path": self.job.images[index],
            "source": source_stamp(self.job.images[index]),
            "width": encoded.width,
            "height": encoded.height,
            "overlay": overlay,
            "phrases": phrases,
        }
        # Signals are held from the first temporary file on (they are bytes already encoded,
        # so briefly): an interrupt between creating a temporary file and registering it for
        # clean-up would leave it behind.
        with signals_deferred(), Staging(force=True) as staging:
            for name, data in files:
                staging.file(self.path / name).write_bytes(data)
            staging.commit()
            self._append("_results", line)
        return line

    def write_error(self, index: int, error: str) -> dict[str, Any]:
        """Append an image's failure to ``errors.jsonl``; return the line."""
        line = {
            "index": index,
            "path": self.job.images[index],
            "source": source_stamp(self.job.images[index]),
            "error": error,
        }
        with signals_deferred():
            self._append("_errors", line)
        return line


def source_stamp(path: str | os.PathLike[str]) -> dict[str, int] | None:
    """What identifies an input file's contents cheaply: its size and modification time in
    nanoseconds (None when it cannot be read). Recorded with each image's line, so a resumed
    run re-runs an image that changed since."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _unchanged(record: dict[str, Any]) -> bool:
    """Whether the input of a ``results.jsonl`` / ``errors.jsonl`` line is as it was then
    (a line without a stamp, written by 0.2, counts as unchanged)."""
    return "source" not in record or record["source"] == source_stamp(record.get("path", ""))


def _nonempty(path: Path) -> bool:
    with contextlib.suppress(OSError):
        return path.stat().st_size > 0
    return False
