"""The unit of work of a batch job: :class:`SegmentBatch` segments one batch of images and
encodes each image's outputs (:class:`ImageOutcome`).

Both engines run it: the local engine calls :meth:`SegmentBatch.segment` in the driver
process, the Ray engine runs one instance per worker as a Ray Data callable class. It is the
class to put into your own ``ray.data`` pipeline too (:meth:`SegmentBatch.__call__`). A bad
image never raises: it comes back as an outcome with its reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..allocator import apply_malloc_policy, peak_rss_bytes
from ..errors import InputSpecError
from ..predict.boxes import ExemplarBox, parse_pair_boxes
from ..predict.images import DEFAULT_MAX_PIXELS
from ..predict.outputs import EncodedImage, encode_image
from ..predict.predictor import DEFAULT_MAX_PAIRS, Predictor, Prompts

__all__ = ["OUTPUT_COLUMNS", "ImageOutcome", "SegmentBatch", "outcomes_from_columns"]

#: Columns of what :meth:`SegmentBatch.__call__` returns, one row per image.
OUTPUT_COLUMNS = (
    "path",
    "ok",
    "error",
    "record",
    "mask_pngs",
    "overlay_png",
    "worker_pid",
    "peak_rss_bytes",
    "batch_seconds",
)


@dataclasses.dataclass
class ImageOutcome:
    """One image of a batch: its encoded outputs, or why it failed (``error``, one line).

    ``worker_pid`` and ``peak_rss_bytes`` say which process ran it and that process's peak
    memory after the batch; ``batch_seconds`` is the wall time of the whole batch.
    """

    path: str
    encoded: EncodedImage | None
    error: str | None
    worker_pid: int
    peak_rss_bytes: int
    batch_seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None

    def record(self) -> dict[str, Any]:
        """``{"width", "height", "phrases"}`` of :class:`~..predict.outputs.EncodedImage`
        (empty for a failed image)."""
        if self.encoded is None:
            return {}
        e = self.encoded
        return {"width": e.width, "height": e.height, "phrases": e.phrases}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {text}"


def _objects(values: Sequence[Any]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = list(values)
    return array


class SegmentBatch:
    """Segments batches of images with one artifact and a fixed list of phrases.

    Args:
        artifact: path of an artifact written by ``sam3-exportable export`` (loaded with
            :func:`~..artifact.loader.load_artifact`), or a loaded artifact / program.
        phrases: the text prompts, the same for every image, or their
            :class:`~..predict.predictor.Prompts` (tokenized once by the job's driver).
        threshold: score above which a query is kept (upstream's rule).
        threads: intra-op threads of the artifact (:meth:`~..artifact.base.Artifact.set_threads`;
            for torch kinds process-wide); None keeps the artifact's. Results are bitwise
            reproducible only at the same thread count.
        max_pairs: most image-phrase pairs per graph call; a batch of ``B`` images runs its
            phrases in chunks of ``max_pairs // B`` (:meth:`..predict.Predictor.kept_pairs`).
        masks, overlay: encode the instance-label PNGs, the overlay PNG.
        max_pixels: images with more pixels fail (a decompression-bomb guard).
        verify_hash: check the artifact's sha256 on load (the Ray engine checks it once on
            the driver and passes False).
        malloc: malloc policy to apply in this process (:func:`..allocator.apply_malloc_policy`);
            None changes nothing.
        boxes: exemplar boxes by image (box-capable artifacts): ``boxes[path][j]`` the boxes
            of that image and phrase ``j`` (:mod:`..predict.boxes`), looked up by the
            outcome's path; an image without an entry runs on its phrases alone. A box with
            nothing inside its image fails that image only.

    Raises what :func:`~..artifact.loader.load_artifact` and the tokenizer raise for a bad
    artifact or phrase, and :class:`~..errors.InputSpecError` for ``max_pairs < 1``.
    """

    def __init__(
        self,
        artifact: Any,
        phrases: Sequence[str] | Prompts,
        threshold: float = 0.5,
        *,
        threads: int | None = 1,
        max_pairs: int = DEFAULT_MAX_PAIRS,
        masks: bool = True,
        overlay: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        verify_hash: bool = True,
        malloc: str | None = None,
        boxes: Mapping[str, Sequence[Sequence[Any]]] | None = None,
    ) -> None:
        from ..artifact.loader import as_artifact, load_artifact

        if malloc is not None:
            apply_malloc_policy(malloc)
        if max_pairs < 1:
            raise InputSpecError(f"max_pairs: expected a positive integer, got {max_pairs}")
        if isinstance(artifact, (str, os.PathLike)):
            artifact = load_artifact(artifact, verify_hash=verify_hash, threads=threads)
        elif threads:
            artifact = as_artifact(artifact)
            artifact.set_threads(int(threads))
        # each batch is encoded once for all its chunks of phrases; batches never recur
        self.predictor = Predictor(artifact, max_pixels=max_pixels, cache_bytes=0)
        self.prompts = self.predictor.prompts(phrases)  # validated and tokenized once per job
        self.phrases = list(self.prompts.phrases)
        self.threshold = float(threshold)
        self.max_pairs = int(max_pairs)
        self.masks, self.overlay = bool(masks), bool(overlay)
        self.boxes = None if boxes is None else dict(boxes)

    def segment(
        self, sources: Sequence[str | os.PathLike[str] | bytes], names: Sequence[str] | None = None
    ) -> list[ImageOutcome]:
        """Segment ``sources`` (image paths, or image files' bytes) as one batch, in order.

        ``names`` label the outcomes (default: the paths). An image that cannot be read fails
        alone; the rest run as a smaller batch. When the graph call fails, every image of
        the batch fails with its reason. Never raises for an image or a graph failure.
        """
        start = time.perf_counter()
        labels = [os.fspath(s) if names is None else names[i] for i, s in enumerate(sources)]  # type: ignore[arg-type]
        errors: dict[int, str] = {}
        images = []
        for i, source in enumerate(sources):
            try:
                images.append((i, self.predictor.load([source])[0]))
            except Exception as exc:  # a bad image is reported, never stops the batch
                errors[i] = _one_line(exc)
        prompt_boxes: list[list[list[ExemplarBox]]] | None = None
        if self.boxes is not None:
            prompt_boxes, images = self._boxes_of(images, labels, errors)
        encoded: dict[int, EncodedImage] = {}
        if images:
            try:
                kept = self.predictor.kept_pairs(
                    [img for _, img in images],
                    self.prompts,
                    threshold=self.threshold,
                    max_pairs=self.max_pairs,
                    boxes=prompt_boxes,
                )
                for n, ((i, img), pairs) in enumerate(zip(images, kept, strict=True)):
                    encoded[i] = encode_image(
                        img,
                        self.phrases,
                        pairs,
                        masks=self.masks,
                        overlay=self.overlay,
                        prompt_boxes=None if prompt_boxes is None else prompt_boxes[n],
                    )
            except Exception as exc:  # the whole batch failed (memory, runtime): every image says so
                for i, _ in images:
                    errors.setdefault(i, f"batch failed: {_one_line(exc)}")
        seconds = time.perf_counter() - start
        peak, pid = peak_rss_bytes(), os.getpid()
        return [
            ImageOutcome(
                path=labels[i],
                encoded=encoded.get(i),
                error=errors.get(i) if i not in encoded else None,
                worker_pid=pid,
                peak_rss_bytes=peak,
                batch_seconds=seconds,
            )
            for i in range(len(sources))
        ]

    def _boxes_of(
        self, images: list[tuple[int, Image.Image]], labels: Sequence[str], errors: dict[int, str]
    ) -> tuple[list[list[list[ExemplarBox]]], list[tuple[int, Image.Image]]]:
        """Each loaded image's boxes, validated against its size; an image whose boxes are
        bad fails alone (into ``errors``). Returns the boxes and the images that remain."""
        assert self.boxes is not None
        parsed, kept = [], []
        for i, img in images:
            rows = self.boxes.get(labels[i]) or [[] for _ in self.phrases]
            try:
                parsed.append(parse_pair_boxes([rows], [img.size], len(self.phrases))[0])
                kept.append((i, img))
            except InputSpecError as exc:
                errors[i] = _one_line(exc)
        return parsed, kept

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A Ray Data batch in, one row per image out (``batch_format="numpy"``).

        Input columns: ``path`` (one image per row; the whole batch is one model batch, so
        Ray's ``batch_size`` is the images per call) with an optional ``image`` column of the
        files' bytes (then read instead of the path, e.g. from ``ray.data.read_binary_files``);
        or ``paths`` (each row a list of paths that is one model batch, with
        ``batch_size=1``: a fixed batch plan). Output columns: :data:`OUTPUT_COLUMNS`:
        ``path`` (str), ``ok`` (bool), ``error`` (str, empty when ok), ``record`` (JSON of
        :meth:`ImageOutcome.record`, empty when failed), ``mask_pngs`` (list of PNG bytes, one
        per phrase), ``overlay_png`` (bytes, empty when not asked for), ``worker_pid``,
        ``peak_rss_bytes``, ``batch_seconds``.

        Raises ``KeyError`` when neither ``path`` nor ``paths`` is a column.
        """
        if "paths" in batch:
            outcomes = [o for paths in batch["paths"] for o in self.segment([str(p) for p in paths])]
        elif "path" in batch:
            names = [str(p) for p in batch["path"]]
            sources = [bytes(b) for b in batch["image"]] if "image" in batch else names
            outcomes = self.segment(sources, names)
        else:
            raise KeyError(f"SegmentBatch: expected a 'path' or 'paths' column, got {sorted(batch)}")
        return {
            "path": np.array([o.path for o in outcomes], dtype=object),
            "ok": np.array([o.ok for o in outcomes], dtype=bool),
            "error": np.array([o.error or "" for o in outcomes], dtype=object),
            "record": np.array([json.dumps(o.record()) if o.ok else "" for o in outcomes], dtype=object),
            "mask_pngs": _objects([o.encoded.mask_pngs if o.encoded else [] for o in outcomes]),
            "overlay_png": _objects([(o.encoded.overlay_png or b"") if o.encoded else b"" for o in outcomes]),
            "worker_pid": np.array([o.worker_pid for o in outcomes], dtype=np.int64),
            "peak_rss_bytes": np.array([o.peak_rss_bytes for o in outcomes], dtype=np.int64),
            "batch_seconds": np.array([o.batch_seconds for o in outcomes], dtype=np.float64),
        }


def outcomes_from_columns(columns: dict[str, np.ndarray]) -> list[ImageOutcome]:
    """The :class:`ImageOutcome` rows of a :meth:`SegmentBatch.__call__` result."""
    outcomes = []
    for i in range(len(columns["path"])):
        encoded = None
        if bool(columns["ok"][i]):
            record = json.loads(str(columns["record"][i]))
            overlay = bytes(columns["overlay_png"][i])
            encoded = EncodedImage(
                width=int(record["width"]),
                height=int(record["height"]),
                phrases=record["phrases"],
                mask_pngs=[bytes(b) for b in columns["mask_pngs"][i]],
                overlay_png=overlay or None,
            )
        outcomes.append(
            ImageOutcome(
                path=str(columns["path"][i]),
                encoded=encoded,
                error=None if encoded is not None else str(columns["error"][i]),
                worker_pid=int(columns["worker_pid"][i]),
                peak_rss_bytes=int(columns["peak_rss_bytes"][i]),
                batch_seconds=float(columns["batch_seconds"][i]),
            )
        )
    return outcomes
