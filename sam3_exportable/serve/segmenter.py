"""The model side of one serving replica (:class:`Segmenter`): checks a request against the
artifact, then runs a batch of requests in as few graph calls as their prompts allow.

Packing: requests with the same prompts and threshold (all with boxes or all without) share
graph calls, ``max(1, max_pairs // phrases)`` images a call, so that a call runs all its
phrases at once (a second chunk of phrases would run every image's encoder again; a request
with more phrases than ``max_pairs`` runs alone, its phrases in chunks, as ``predict`` runs
it); requests with other prompts run in calls of their own. The other packing, all images
times the union of all prompts, computes image-phrase pairs nobody asked for: each costs
the fusion encoder and decoder again. With a staged artifact each image is encoded by
itself and its features cached by its pixels (``Predictor(encode_alone=True)``), so a
follow-up request on an image skips the image encoder whatever company either came in.

An answer's ``phrases`` are built by the code that writes ``predict``'s ``results.jsonl``
(:func:`..predict.outputs.encode_image`), so at batch size 1 they are ``predict``'s at the
same ``--threads``, bitwise.

Nothing here imports Ray, FastAPI or torch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

from ..errors import InputSpecError
from ..predict.outputs import encode_image
from ..predict.predictor import Predictor, Prompts
from .options import ServeOptions
from .protocol import RequestError, SegmentRequest

__all__ = ["Answer", "Segmenter"]

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class Answer:
    """What one request gets: ``width``, ``height`` of its image, ``phrases`` (as in
    ``results.jsonl``), the milliseconds of the graph calls it shared with their
    post-processing (masks upsampled and RLE-encoded) and how many requests shared them
    (``batch_size``)."""

    width: int
    height: int
    phrases: list[dict[str, Any]]
    graph_ms: float
    batch_size: int


@dataclasses.dataclass
class _Checked:
    request: SegmentRequest
    prompts: Prompts
    boxes: Any  # the validated boxes of the image, one list per prompt; None without


class Segmenter:
    """One replica's artifact (loaded with ``options.threads`` intra-op threads and a
    feature cache of ``options.cache_bytes``) and the packing of requests into graph calls.

    Raises what :class:`~..predict.predictor.Predictor` raises for a bad artifact.
    """

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.predictor = Predictor(
            options.model,
            max_pixels=options.max_pixels,
            threads=options.threads,
            cache_bytes=options.cache_bytes,
            encode_alone=True,  # a cached image's features never depend on its company
        )

    def check(self, request: SegmentRequest) -> _Checked:
        """``request`` checked against the artifact: its phrases tokenize, its boxes fit the
        image and the artifact takes boxes. Raises :class:`.protocol.RequestError` (422)."""
        try:
            boxes = None if request.boxes is None else [request.boxes]
            prompts, pair_boxes = self.predictor.prompts_and_boxes([request.image], request.prompts, boxes)
        except InputSpecError as exc:
            error = RequestError.of(exc)
            error.field = _request_field(error.field)
            raise error from None
        return _Checked(request, prompts, None if pair_boxes is None else pair_boxes[0])

    def run(self, batch: Sequence[_Checked]) -> list[Answer | RequestError]:
        """Answers for ``batch`` in order. A failing graph call fails only the requests it
        held (500, the error logged with its traceback); never raises."""
        answers: list[Answer | RequestError | None] = [None] * len(batch)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, item in enumerate(batch):
            groups.setdefault(item.request.group_key(), []).append(i)
        for members in groups.values():
            # images per call: all their phrases in one call (a second chunk of phrases would
            # run the image encoder of every image again), at least one image
            step = max(1, self.options.max_pairs // len(batch[members[0]].prompts))
            for start in range(0, len(members), step):
                chunk = members[start : start + step]
                for i, answer in zip(chunk, self._call([batch[i] for i in chunk]), strict=True):
                    answers[i] = answer
        return answers  # type: ignore[return-value]

    def _call(self, items: Sequence[_Checked]) -> list[Answer | RequestError]:
        first = items[0]
        started = time.perf_counter()
        try:
            kept = self.predictor.kept_pairs(
                [item.request.image for item in items],
                first.prompts,
                threshold=first.request.threshold,
                max_pairs=self.options.max_pairs,
                boxes=None if first.boxes is None else [item.boxes for item in items],
            )
            names = list(first.prompts.phrases)
            encoded = [
                encode_image(
                    item.request.image, names, pairs, masks=False, overlay=False, prompt_boxes=item.boxes
                )
                for item, pairs in zip(items, kept, strict=True)
            ]
            for item, image in zip(items, encoded, strict=True):
                if not item.request.rle:
                    for record in image.phrases:
                        for instance in record["instances"]:
                            del instance["rle"]
            graph_ms = (time.perf_counter() - started) * 1000.0  # graph calls and post-processing
            return [Answer(e.width, e.height, e.phrases, graph_ms, len(items)) for e in encoded]
        except Exception as exc:  # one failed call fails its requests, never the replica
            _log.exception("graph call of %d request(s) failed", len(items))
            error = RequestError(500, "server", f"the graph call failed: {type(exc).__name__}: {exc}")
            return [error for _ in items]


def _request_field(field: str) -> str:
    """The request's name for a field the predictor names (``phrases[j]`` is ``prompts[j]``,
    image 0's ``boxes[0][j]`` is ``boxes[j]``)."""
    if field.startswith("phrases"):
        return "prompts" + field[len("phrases") :]
    if field.startswith("boxes[0]"):
        return "boxes" + field[len("boxes[0]") :]
    return field
