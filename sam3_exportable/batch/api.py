"""``segment_images``: a folder (or list, or pattern) of images through an artifact, in
batches, with streamed outputs, progress and resume, in this process or on Ray."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..allocator import current_malloc_policy
from ..artifact.base import Artifact, default_threads, text_only_refusal
from ..artifact.files import check_output_dir
from ..artifact.loader import load_checked
from ..artifact.manifest import Manifest, check_file, read_manifest
from ..errors import InputSpecError
from ..predict.boxes import VISUAL_PHRASE
from ..predict.images import DEFAULT_MAX_PIXELS
from ..predict.predictor import DEFAULT_MAX_PAIRS, make_prompts, manifest_tokenizer
from .coco import write_coco
from .engines import import_ray, local_outcomes, ray_outcomes, ray_session
from .inputs import expand_images, job_boxes
from .job import Job
from .progress import Progress
from .segment import ImageOutcome, SegmentBatch
from .store import RUN_FILE, OutputDir, check_output

__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_MAX_PAIRS", "BatchSummary", "Failure", "segment_images"]

#: Images per graph call. On CPU a batch of B images costs about B single calls (no saving)
#: while memory grows with B; larger batches pay on accelerators.
DEFAULT_BATCH_SIZE = 1

ENGINES = ("local", "ray")


@dataclasses.dataclass
class Failure:
    """An image that could not be segmented, and why (one line)."""

    path: str
    error: str


@dataclasses.dataclass
class BatchSummary:
    """What a :func:`segment_images` call did.

    ``images``: in the job; ``segmented`` and ``failed``: of them, by the end of this call
    (earlier runs of a resumed job included); ``written``: images this call wrote (segmented
    or failed); ``skipped``: already done when it started. ``failures``: every failed image
    of the job. ``seconds``: wall time of the call; ``first_result_seconds``: until the
    first batch came back (start-up included), None when nothing ran. ``workers``: worker
    processes that returned images (this process for the local engine), ``worker_peak_rss``
    their peak RSS in bytes by process id; ``threads``: intra-op threads of each.
    """

    out: Path
    images: int
    segmented: int
    failed: int
    written: int
    skipped: int
    seconds: float
    first_result_seconds: float | None
    engine: str
    workers: int
    threads: int
    failures: list[Failure]
    worker_peak_rss: dict[int, int]
    run_json: Path
    results_jsonl: Path
    errors_jsonl: Path
    coco_json: Path

    @property
    def images_per_hour(self) -> float:
        """Images this call wrote per hour of its wall time (start-up included)."""
        return self.written * 3600.0 / self.seconds if self.seconds > 0 else 0.0


def _check_options(
    engine: str,
    batch_size: int,
    max_pairs: int,
    threshold: float,
    workers: int | None,
    threads: int | None,
    ray_address: str | None,
    resume: bool,
    force: bool,
    retry_failed: bool,
) -> None:
    if engine not in ENGINES:
        raise InputSpecError(f"engine: expected one of {list(ENGINES)}, got {engine!r}")
    for name, value in (
        ("batch_size", batch_size),
        ("max_pairs", max_pairs),
        ("workers", workers),
        ("threads", threads),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputSpecError(f"{name}: expected a positive integer, got {value!r}")
    if max_pairs < batch_size:
        raise InputSpecError(
            f"max_pairs: expected at least batch_size ({batch_size}) pairs per graph call, got {max_pairs}"
        )
    if not 0.0 <= threshold <= 1.0:
        raise InputSpecError(f"threshold: expected a value in [0, 1], got {threshold}")
    if engine == "local" and workers not in (None, 1):
        raise InputSpecError(f"workers: the local engine runs one worker, got {workers}; use engine='ray'")
    if engine == "local" and ray_address:
        raise InputSpecError("ray_address: expected engine='ray' with it, got the local engine")
    if resume and force:
        raise InputSpecError("resume and force: expected one of them, got both")
    if retry_failed and not resume:
        raise InputSpecError("retry_failed (--retry-failed): expected with resume (--resume)")


def _artifact_record(path: Path, manifest: Manifest | None) -> tuple[Manifest, dict[str, Any]]:
    """(manifest, the job's artifact record) of the artifact at ``path``: its manifest read
    unless given, not loaded."""
    manifest = manifest or read_manifest(path)
    record = {
        "path": str(path.resolve()),
        "kind": manifest.kind,
        "artifact_id": manifest.artifact_id,
        "sha256": manifest.file.sha256 if manifest.file else None,
    }
    return manifest, record


def _verify_hashes(path: Path, manifest: Manifest) -> None:
    """Raises :class:`~..errors.ArtifactError` unless the file and its data files have the
    sizes and hashes of the manifest (what the Ray workers then skip)."""
    if manifest.file is not None:
        check_file(path, manifest.file)
    for record in manifest.data_files:
        check_file(path.with_name(record.name), record)


def _torch_threads() -> int | None:
    """torch's thread count when torch is loaded in this process (to restore it), else None."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def segment_images(
    paths: Iterable[str | os.PathLike[str]],
    phrases: Sequence[str | None],
    *,
    artifact: str | os.PathLike[str],
    manifest: Manifest | None = None,
    out: str | os.PathLike[str],
    image_lists: Iterable[str | os.PathLike[str]] = (),
    engine: str = "local",
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    threshold: float = 0.5,
    workers: int | None = None,
    threads: int | None = None,
    ray_address: str | None = None,
    ray_runtime_env: dict[str, Any] | None = None,
    resume: bool = False,
    force: bool = False,
    retry_failed: bool = False,
    overlay: bool = True,
    masks: bool = True,
    strict: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    boxes: Sequence[Any] | Mapping[str, Any] | None = None,
) -> BatchSummary:
    """Segment every image ``paths`` and ``image_lists`` name (:func:`.inputs.expand_images`)
    by ``phrases`` with the artifact at ``artifact`` (``manifest``: its manifest when the
    caller read it already with :func:`~..artifact.manifest.read_manifest`), writing into the
    directory ``out``
    (:mod:`.store`: per image its mask PNGs, overlay and ``results.jsonl`` line as soon as
    its batch is done; ``errors.jsonl``; ``coco.json`` at the end).

    Batches of ``batch_size`` images, phrases in chunks so that a graph call holds at most
    ``max_pairs`` pairs. ``engine="local"`` runs in this process with ``threads`` threads
    (default: the CPUs this process may use; torch's setting is restored after);
    ``engine="ray"`` runs ``workers`` actors of ``threads`` threads each (default 1) on a
    fresh local Ray instance
    or, with ``ray_address``, on that cluster, whose nodes must have this package installed
    (or ship it: ``ray_runtime_env={"py_modules": [...]}``). Results are bitwise the same
    for either engine and any ``workers`` at the same ``batch_size``, ``max_pairs`` and
    ``threads``.

    ``boxes`` (box-capable artifacts, exported with ``--boxes``): exemplar boxes, a list for
    every image and phrase or a mapping from image path to one list per phrase
    (:func:`.inputs.job_boxes`; each box ``(x0, y0, x1, y1[, label])`` in the image's
    pixels); a phrase of None prompts with the boxes alone (upstream's phrase "visual", as
    it is recorded). Each phrase's boxes are recorded in ``results.jsonl``
    (``"prompt_boxes"``) and ``coco.json``.

    ``resume`` continues a previous run of the same job in ``out`` (refused, naming what
    differs, for another job): images already complete are skipped, the batches of the
    plan that hold a missing image run again and only the missing images are written, so
    the outputs equal an uninterrupted run's; failed images stay failed unless
    ``retry_failed``. ``force`` replaces a previous run of ours; a directory holding
    anything else is never touched. A bad image is recorded in ``errors.jsonl`` and skipped;
    with ``strict`` it stops the run instead.

    Everything is checked before the artifact is loaded and before anything is written.
    Raises :class:`~..errors.InputSpecError` (a bad option or phrase, no image matched, a
    bad image with ``strict``), :class:`~..errors.OutputPathError` (the output directory),
    :class:`~..errors.ArtifactError` (the artifact), ``ImportError`` naming the extra when
    Ray is asked for and missing, and :class:`~..errors.WorkerError` when a Ray worker dies.
    """
    start = time.perf_counter()
    _check_options(
        engine, batch_size, max_pairs, threshold, workers, threads, ray_address, resume, force, retry_failed
    )
    target = check_output_dir(out)
    images = expand_images(paths, image_lists, exclude=[target])
    artifact_path = Path(artifact)
    manifest, artifact_record = _artifact_record(artifact_path, manifest)  # the one read of the manifest
    box_records = job_boxes(boxes, images, phrases)
    if box_records is not None and not manifest.takes_boxes:
        raise text_only_refusal("--box/--boxes", artifact)
    if box_records is None and any(p is None for p in phrases):
        raise InputSpecError(
            "--prompt: expected a phrase, or boxes (--box, --boxes) to prompt with boxes alone"
        )
    named = [VISUAL_PHRASE if p is None else p for p in phrases]
    prompts = make_prompts(manifest_tokenizer(manifest), named)  # validated and tokenized once
    phrases = list(prompts.phrases)
    if engine == "ray":
        import_ray()
    saved_threads = _torch_threads()
    threads = threads or (default_threads() if engine == "local" else 1)
    job = Job(
        artifact=artifact_record,
        phrases=tuple(phrases),
        threshold=float(threshold),
        batch_size=batch_size,
        max_pairs=max_pairs,
        threads=threads,
        max_pixels=max_pixels,
        masks=masks,
        overlay=overlay,
        images=tuple(str(p) for p in images),
        boxes=box_records,
    )
    target, mode = check_output(target, job, resume=resume, force=force)
    segmenter_kwargs: dict[str, Any] = {
        "artifact": str(artifact_path),
        "phrases": prompts,
        "threshold": float(threshold),
        "max_pairs": max_pairs,
        "masks": masks,
        "overlay": overlay,
        "max_pixels": max_pixels,
        "boxes": box_records,
    }
    try:
        segmenter = None
        if engine == "local":
            loaded: Artifact = load_checked(artifact_path, manifest, threads=threads)
            segmenter = SegmentBatch(**{**segmenter_kwargs, "artifact": loaded}, threads=threads)
        else:
            _verify_hashes(artifact_path, manifest)
        store = OutputDir(target, job)
        failed = store.failed_unchanged() if mode == "resume" and not retry_failed else set()
        done = (store.complete() if mode == "resume" else set()) | failed
        skipped = len(done)
        batches = [[job.images[i] for i in b] for b in job.batches() if any(i not in done for i in b)]
        with contextlib.ExitStack() as stack:
            stream = _stream(
                stack,
                engine,
                batches,
                segmenter,
                segmenter_kwargs,
                workers,
                threads,
                ray_address,
                ray_runtime_env,
            )
            stack.enter_context(store)  # its lock is held from prepare() to the end
            store.prepare(mode)  # the first write, once Ray is up or the cluster reached
            if retry_failed:
                store.forget_errors()
            report = stack.enter_context(
                contextlib.closing(Progress(len(job.images), skipped, enabled=progress))
            )
            written, first, peaks = _write(store, stream, done, report, strict=strict, start=start)
            store.close_files()
            store.compact()
            write_coco(store.coco_path, job.phrases, store.results)
        failures = [Failure(r["path"], r["error"]) for _, r in sorted(store.errors().items())]
    finally:
        if saved_threads is not None:
            sys.modules["torch"].set_num_threads(saved_threads)
    return BatchSummary(
        out=target,
        images=len(job.images),
        segmented=len(store.result_offsets()),
        failed=len(failures),
        written=written,
        skipped=skipped,
        seconds=time.perf_counter() - start,
        first_result_seconds=first,
        engine=engine,
        workers=len(peaks),
        threads=threads,
        failures=failures,
        worker_peak_rss=peaks,
        run_json=target / RUN_FILE,
        results_jsonl=store.results_path,
        errors_jsonl=store.errors_path,
        coco_json=store.coco_path,
    )


def _write(
    store: OutputDir,
    stream: Iterator[list[ImageOutcome]],
    done: set[int],
    report: Progress,
    *,
    strict: bool,
    start: float,
) -> tuple[int, float | None, dict[int, int]]:
    """Write every outcome of ``stream`` whose image is not in ``done`` (adding it there).
    Returns (images written, seconds from ``start`` to the first batch, peak RSS per worker
    process id). Raises :class:`~..errors.InputSpecError` at a bad image with ``strict``."""
    index_of = {path: i for i, path in enumerate(store.job.images)}
    written, first, peaks = 0, None, {}
    for outcomes in stream:
        first = time.perf_counter() - start if first is None else first
        for outcome in outcomes:
            peaks[outcome.worker_pid] = max(peaks.get(outcome.worker_pid, 0), outcome.peak_rss_bytes)
            index = index_of[outcome.path]
            if index in done:
                continue  # ran again only to keep its batch as the plan made it
            if outcome.ok:
                store.write_image(index, outcome)
            else:
                error = outcome.error or "failed"
                if strict:
                    raise InputSpecError(f"{error} (--strict: stopped at the first bad image)")
                store.write_error(index, error)
                report.note(
                    f"skipped {error}" if outcome.path in error else f"skipped {outcome.path}: {error}"
                )
            done.add(index)
            written += 1
            report.update(1, failed=0 if outcome.ok else 1)
    return written, first, peaks


def _stream(
    stack: contextlib.ExitStack,
    engine: str,
    batches: list[list[str]],
    segmenter: SegmentBatch | None,
    segmenter_kwargs: dict[str, Any],
    workers: int | None,
    threads: int,
    ray_address: str | None,
    ray_runtime_env: dict[str, Any] | None,
) -> Iterator[list[ImageOutcome]]:
    """The outcomes of ``batches`` on ``engine``, closed (and Ray shut down) with ``stack``;
    Ray is started or reached here, only when there is a batch to run."""
    if not batches:
        return iter(())
    if engine == "local":
        assert segmenter is not None
        return stack.enter_context(contextlib.closing(local_outcomes(segmenter, batches)))
    local_workers = max(1, (os.cpu_count() or 1) // threads)
    ray = stack.enter_context(
        ray_session(
            address=ray_address, num_cpus=(workers or local_workers) * threads, runtime_env=ray_runtime_env
        )
    )
    wanted = workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
    # the driver checked the hash; each worker takes this process's malloc policy
    kwargs = {**segmenter_kwargs, "verify_hash": False, "malloc": current_malloc_policy()["policy"]}
    outcomes = ray_outcomes(ray, batches, kwargs, workers=min(wanted, len(batches)), threads=threads)
    return stack.enter_context(contextlib.closing(outcomes))
