"""What a batch job computes (:class:`Job`), fixed by its first run and recorded in
``<out>/run.json``, so that ``--resume`` continues exactly that job or refuses.

The batch plan is part of the job: image ``i`` of the sorted image list is in graph batch
``i // batch_size``, and each batch runs its phrases in chunks of ``max_pairs //
batch_size``. Scores depend in their last bits on the batch an image ran in and on the
phrase chunks (other matmul sizes) and on the torch thread count, so all three are fixed
here; the engine and the number of workers are not (they change no bit).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any

from ..errors import OutputPathError

__all__ = ["FORMAT", "FORMAT_VERSION", "Job", "is_job_record", "read_job"]

FORMAT = "sam3-exportable/batch-job"
FORMAT_VERSION = 1

#: Job fields a continuation must share with the run it continues.
_COMPARED = (
    "phrases",
    "threshold",
    "batch_size",
    "max_pairs",
    "threads",
    "max_pixels",
    "masks",
    "overlay",
    "boxes",
)


def _short(value: Any) -> str:
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclasses.dataclass(frozen=True)
class Job:
    """A batch job: which images, which phrases, how they are batched, what is written.

    ``artifact`` is ``{"path", "kind", "artifact_id", "sha256"}`` from the artifact's
    manifest (a continuation must use the same artifact, wherever it now lies); ``images``
    the resolved image paths in job order.
    """

    artifact: dict[str, Any]
    phrases: tuple[str, ...]
    threshold: float
    batch_size: int
    max_pairs: int
    threads: int
    max_pixels: int
    masks: bool
    overlay: bool
    images: tuple[str, ...]
    boxes: dict[str, Any] | None = None

    @property
    def phrase_chunk(self) -> int:
        """Phrases per graph call: ``min(P, max_pairs // batch_size)``."""
        return max(1, min(len(self.phrases), self.max_pairs // self.batch_size))

    def batches(self) -> list[list[int]]:
        """Image indices of each graph batch, in order."""
        n, b = len(self.images), self.batch_size
        return [list(range(start, min(start + b, n))) for start in range(0, n, b)]

    def differences(self, other: Job) -> list[str]:
        """Names of what ``other`` does differently (empty: it may continue this job)."""
        names = [
            f"{name} ({_short(getattr(self, name))} in the job, {_short(getattr(other, name))} now)"
            for name in _COMPARED
            if getattr(self, name) != getattr(other, name)
        ]
        artifact = _artifact_difference(self.artifact, other.artifact)
        if artifact:
            names.append(artifact)
        if self.images != other.images:
            before, after = set(self.images), set(other.images)
            names.append(f"images ({len(after - before)} added, {len(before - after)} gone)")
        return names

    def to_json(self) -> dict[str, Any]:
        from ..artifact.manifest import versions_record

        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions_record("ray"),
            "artifact": dict(self.artifact),
            "phrases": list(self.phrases),
            "threshold": self.threshold,
            "batch_size": self.batch_size,
            "max_pairs": self.max_pairs,
            "threads": self.threads,
            "max_pixels": self.max_pixels,
            "masks": self.masks,
            "overlay": self.overlay,
            "plan": {"batches": len(self.batches()), "phrase_chunk": self.phrase_chunk},
            "images": list(self.images),
            "boxes": self.boxes,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], where: str) -> Job:
        """Raises :class:`~..errors.OutputPathError` when ``doc`` is not a job record."""
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise OutputPathError(f"{where}: expected a job record of format {FORMAT!r}, got {got!r}")
        if doc.get("format_version") != FORMAT_VERSION:
            raise OutputPathError(
                f"{where}: expected format_version {FORMAT_VERSION}, got {doc.get('format_version')!r} "
                "(written by another sam3-exportable?)"
            )
        try:
            return cls(
                artifact=dict(doc["artifact"]),
                phrases=tuple(doc["phrases"]),
                threshold=float(doc["threshold"]),
                batch_size=int(doc["batch_size"]),
                max_pairs=int(doc["max_pairs"]),
                threads=int(doc["threads"]),
                max_pixels=int(doc["max_pixels"]),
                masks=bool(doc["masks"]),
                overlay=bool(doc["overlay"]),
                images=tuple(doc["images"]),
                boxes=None if doc.get("boxes") is None else dict(doc["boxes"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise OutputPathError(
                f"{where}: expected a complete job record, got an error reading it: {exc}"
            ) from None


def _artifact_difference(ours: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    """What makes ``theirs`` another artifact than the job's ``ours``, or None.

    The export id (embedded in every artifact) must match; the file's sha256 is compared
    only where both are known (it lives in the manifest copy beside the file, which a
    deployment may drop). The path may differ: an artifact may have moved.
    """
    if ours.get("artifact_id") != theirs.get("artifact_id"):
        return (
            f"artifact (export id {_short(ours.get('artifact_id'))} of {ours.get('path')} in the job, "
            f"{_short(theirs.get('artifact_id'))} of {theirs.get('path')} now: another export)"
        )
    known = ours.get("sha256") is not None and theirs.get("sha256") is not None
    if known and ours.get("sha256") != theirs.get("sha256"):
        return (
            f"artifact (sha256 {str(ours.get('sha256'))[:12]}... in the job, "
            f"{str(theirs.get('sha256'))[:12]}... now: the file of export {ours.get('artifact_id')} changed)"
        )
    return None


def is_job_record(path: Path) -> bool:
    """Whether ``path`` is a ``run.json`` this tool wrote (its format marker), of any version."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def read_job(path: Path) -> Job:
    """The job recorded at ``path`` (a ``run.json``). Raises :class:`~..errors.OutputPathError`
    when it cannot be read or is not a job record."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OutputPathError(f"{path}: expected a readable job record, got {exc}") from None
    return Job.from_json(doc, str(path))
