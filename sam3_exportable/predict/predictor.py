"""Run any artifact on images and phrases, as upstream's ``Sam3Processor`` does.

Pre-processing (images to 8-bit RGB by one path, :mod:`.images`; resize and normalise,
:mod:`.processing`), tokenization (:class:`..tokenizer.Tokenizer`, upstream's ids, context
length from the artifact; once per job, :class:`Prompts`) and post-processing (one path,
:mod:`.processing`: upstream's score rule, threshold, boxes to pixel xyxy, masks upsampled to
the image size then thresholded at 0.5), applied to every image-phrase pair of one batched
call of the graph. Nothing here imports torch or ``sam3``: an ONNX artifact predicts in the
runtime install; torch kinds compute with torch kernels (upstream's numbers).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..artifact.base import Artifact, Outputs, text_only_refusal
from ..artifact.loader import as_artifact
from ..artifact.manifest import Manifest
from ..errors import ArtifactError, InputSpecError
from ..tokenizer import BPE_VOCAB_SHA256, Tokenizer, validate_phrases
from ..verify import to_numpy
from .boxes import VISUAL_PHRASE, ExemplarBox, box_inputs, parse_pair_boxes
from .cache import DEFAULT_CACHE_BYTES, FeatureCache, pixels_key
from .images import DEFAULT_MAX_PIXELS, ImageInput, to_rgb
from .processing import (
    concat_batch,
    preprocess,
    run_encode,
    run_graph,
    run_ground,
    select_kept,
    upsample_probabilities,
)

__all__ = [
    "DEFAULT_MAX_PAIRS",
    "Instance",
    "KeptPair",
    "PairResult",
    "Predictor",
    "Prompts",
    "iter_instances",
    "keep_pair",
    "make_prompts",
    "manifest_tokenizer",
    "postprocess",
]


#: Most image-phrase pairs per graph call of a job, unless asked otherwise (``--max-pairs``):
#: a call's memory grows with its pairs (docs/performance.md has the figures).
DEFAULT_MAX_PAIRS = 4


@dataclasses.dataclass
class Instance:
    """One kept instance: score, box in pixels (x0, y0, x1, y1), boolean mask (H, W)."""

    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray


@dataclasses.dataclass
class PairResult:
    """Upstream-style arrays for one image and phrase (what ``Sam3Processor`` returns), of
    the artifact's array library (torch tensors for torch kinds, numpy arrays for ONNX)."""

    scores: Any  # [K]
    boxes: Any  # [K, 4] pixel xyxy
    masks: Any  # [K, 1, H, W] bool
    masks_logits: Any  # [K, 1, H, W] probabilities after sigmoid

    @classmethod
    def of(cls, kept: KeptPair) -> PairResult:
        """Every kept mask of ``kept`` upsampled at once, as upstream does."""
        up = kept.probabilities()
        return cls(scores=kept.scores, boxes=kept.boxes, masks=up > 0.5, masks_logits=up)

    def instances(self) -> list[Instance]:
        scores, boxes, masks = to_numpy(self.scores), to_numpy(self.boxes), to_numpy(self.masks)
        return [
            Instance(score=float(scores[k]), box=tuple(float(v) for v in boxes[k]), mask=masks[k, 0])  # type: ignore[arg-type]
            for k in range(scores.shape[0])
        ]


@dataclasses.dataclass
class KeptPair:
    """The queries one image-phrase pair keeps, before upsampling (what :func:`keep_pair`
    returns): ``scores`` float32 ``[K]``, ``boxes`` float32 ``[K, 4]`` pixel xyxy,
    ``low_masks`` float32 ``[K, h, w]`` mask logits at the graph's resolution (arrays of the
    artifact's library), and the image size ``height`` x ``width`` the masks upsample to.
    The arrays are copies, so the graph's outputs can be freed while a ``KeptPair`` is kept."""

    scores: Any
    boxes: Any
    low_masks: Any
    height: int
    width: int

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def probabilities(self, k: int | None = None) -> Any:
        """Upsampled probabilities ``[K, 1, H, W]`` of every kept mask, or ``[1, 1, H, W]`` of
        mask ``k`` (:func:`.processing.upsample_probabilities`, the one upsampling)."""
        low = self.low_masks if k is None else self.low_masks[k : k + 1]
        return upsample_probabilities(low, self.height, self.width)

    def instances(self) -> Iterator[Instance]:
        """The kept instances with the masks :func:`postprocess` gives, one upsampled at a
        time: memory stays at one full-size mask however many instances a large image has."""
        scores, boxes = to_numpy(self.scores), to_numpy(self.boxes)
        for k in range(len(self)):
            mask = to_numpy(self.probabilities(k)[0, 0] > 0.5)
            yield Instance(score=float(scores[k]), box=tuple(float(v) for v in boxes[k]), mask=mask)  # type: ignore[arg-type]


def keep_pair(
    logits: Any, boxes: Any, masks: Any, presence: Any, *, height: int, width: int, threshold: float
) -> KeptPair:
    """The queries of one pair (inputs with a leading pair dim of 1) whose score exceeds
    ``threshold``, by upstream's rule (:func:`postprocess` without the upsampling)."""
    probs, pixel_boxes, low = select_kept(
        logits, boxes, masks, presence, threshold=threshold, height=height, width=width
    )
    return KeptPair(scores=probs, boxes=pixel_boxes, low_masks=low, height=height, width=width)


def postprocess(
    logits: Any, boxes: Any, masks: Any, presence: Any, *, height: int, width: int, threshold: float
) -> PairResult:
    """Upstream ``Sam3Processor._forward_grounding`` post-processing for one pair (inputs
    with a leading pair dim of 1): every kept mask upsampled at once, as upstream does."""
    return PairResult.of(
        keep_pair(logits, boxes, masks, presence, height=height, width=width, threshold=threshold)
    )


def iter_instances(
    logits: Any, boxes: Any, masks: Any, presence: Any, *, height: int, width: int, threshold: float
) -> Iterator[Instance]:
    """The instances :func:`postprocess` keeps, with the same masks, one upsampled at a time
    (:meth:`KeptPair.instances` of :func:`keep_pair`)."""
    kept = keep_pair(logits, boxes, masks, presence, height=height, width=width, threshold=threshold)
    yield from kept.instances()


def manifest_tokenizer(manifest: Manifest) -> Tokenizer:
    """Upstream's tokenizer with the context length an artifact's ``manifest`` states.

    Raises :class:`~..errors.ArtifactError` when the manifest expects another BPE vocab than
    the one this package ships.
    """
    if manifest.bpe_vocab_sha256 != BPE_VOCAB_SHA256:
        raise ArtifactError(
            f"manifest tokenizer: expects BPE vocab sha256 {manifest.bpe_vocab_sha256}, "
            f"this install has {BPE_VOCAB_SHA256}"
        )
    return Tokenizer(manifest.context_length)


@dataclasses.dataclass(frozen=True)
class Prompts:
    """Phrases validated and tokenized once (:meth:`Predictor.prompts`): ``phrases`` and
    their ``token_ids`` int64 ``[P, context_length]`` (numpy)."""

    phrases: tuple[str, ...]
    token_ids: np.ndarray

    def __post_init__(self) -> None:
        if not self.phrases:
            raise InputSpecError("phrases: expected at least one phrase, got none")
        if len(self.token_ids) != len(self.phrases):
            raise InputSpecError(
                f"token_ids: expected one row per phrase ({len(self.phrases)}), got {len(self.token_ids)}"
            )

    def __len__(self) -> int:
        return len(self.phrases)

    def chunk(self, start: int, size: int) -> np.ndarray:
        """Token ids of phrases ``start`` to ``start + size``."""
        return self.token_ids[start : start + size]


def make_prompts(tokenizer: Tokenizer, phrases: Sequence[str] | str | Prompts) -> Prompts:
    """``phrases`` validated and tokenized (a :class:`Prompts` is returned as is). Warns
    (``UserWarning``) once per phrase cut to the context length. Raises
    :class:`~..errors.InputSpecError` for no phrase, a blank one, or one with no token."""
    if isinstance(phrases, Prompts):
        return phrases
    phrases = validate_phrases(phrases)
    ids = tokenizer(phrases)
    for phrase in phrases:
        n = len(tokenizer.encode(phrase)) + 2
        if n > tokenizer.context_length:
            warnings.warn(
                f"phrase {phrase!r} has {n} tokens with start/end; truncated to the "
                f"artifact's context length {tokenizer.context_length}",
                stacklevel=3,
            )
    return Prompts(phrases=tuple(phrases), token_ids=ids)


class Predictor:
    """Text-prompted segmentation with an exported SAM3 pipeline of any kind.

    ``source`` is an artifact path written by ``sam3-exportable export`` (``.pt2``,
    ``.aoti.pt2`` or ``.onnx``; manifest and sha256 are checked), a loaded
    :class:`~..artifact.base.Artifact`, or an in-memory ``ExportedProgram``. ``max_pixels``
    bounds the images read from files (:mod:`.images`); ``threads`` is passed to the loader
    for a path (:func:`~..artifact.loader.load_artifact`).

    With a staged artifact (exported with ``--stages``) every call encodes its images once,
    however many chunks of phrases follow, and keeps the features in :attr:`cache` (LRU,
    at most ``cache_bytes``; 0 keeps none), so a later call on the same images runs only
    the prompt stage. Results equal an uncached call's, bitwise for torch kinds (the stages
    compose to the one graph). With ``encode_alone`` each image of a call is encoded by
    itself and cached by its own pixels, and only the prompt stage runs the call's images
    together: an image's features then never depend on the images it came with (what a
    server wants, whose calls mix requests); a call of one image is the same either way.
    """

    def __init__(
        self,
        source: Any,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        threads: int | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        encode_alone: bool = False,
    ) -> None:
        self.encode_alone = encode_alone
        #: The image features of recent calls (a staged artifact's; unused otherwise).
        self.cache = FeatureCache(cache_bytes)
        #: The loaded artifact; calling it runs the graph.
        self.artifact: Artifact = as_artifact(source, threads=threads)
        self.manifest = self.artifact.manifest
        self.image_size = self.artifact.image_size
        self.context_length = self.artifact.context_length
        self.max_pixels = max_pixels
        self._tokenizer: Tokenizer | None = None

    @property
    def program(self) -> Any:
        """The exported program (None for kinds that hold none: AOTInductor, ONNX)."""
        return getattr(self.artifact, "program", None)

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = manifest_tokenizer(self.manifest)
        return self._tokenizer

    def prompts(self, phrases: Sequence[str] | str | Prompts) -> Prompts:
        """``phrases`` validated and tokenized once (:func:`make_prompts`)."""
        return make_prompts(self.tokenizer, phrases)

    def tokenize(self, phrases: Sequence[str] | str) -> np.ndarray:
        """Token ids ``[P, context_length]`` int64; warns when a phrase is truncated."""
        return self.prompts(phrases).token_ids

    def load(self, images: Sequence[ImageInput]) -> list[Image.Image]:
        """Every image as 8-bit RGB (:func:`.images.to_rgb`)."""
        return [to_rgb(img, max_pixels=self.max_pixels) for img in images]

    def preprocess(self, images: Sequence[ImageInput]) -> Any:
        """``images`` float32 ``[B, 3, S, S]`` as upstream's processor makes them, in the
        artifact's array library (:func:`.processing.preprocess`)."""
        return preprocess(self.load(images), self.image_size, self.artifact.array_library)

    def run(
        self,
        images: Sequence[ImageInput],
        phrases: Sequence[str | None] | str | Prompts,
        boxes: Any = None,
    ) -> Outputs:
        """One call of the graph for all images x phrases (and their exemplar boxes, as
        :meth:`predict` takes them); raw outputs, image-major pairs."""
        rgb, prompts, pair_boxes, pixels = self._prepare(images, phrases, boxes)
        return run_graph(self.artifact, pixels, prompts.token_ids, **self._box_feeds(rgb, pair_boxes))

    def _prepare(
        self, images: Sequence[ImageInput], phrases: Sequence[str | None] | str | Prompts, boxes: Any
    ) -> tuple[list[Image.Image], Prompts, list[list[list[ExemplarBox]]] | None, Any]:
        """(RGB images, prompts, validated boxes, pixels): everything before a graph call.
        Raises :class:`~..errors.InputSpecError` for no image, a bad phrase or box."""
        rgb = self.load(images)
        if not rgb:
            raise InputSpecError("images: expected at least one image, got none")
        prompts, pair_boxes = self.prompts_and_boxes(rgb, phrases, boxes)
        return rgb, prompts, pair_boxes, preprocess(rgb, self.image_size, self.artifact.array_library)

    def prompts_and_boxes(
        self, rgb: Sequence[Image.Image], phrases: Sequence[str | None] | str | Prompts, boxes: Any
    ) -> tuple[Prompts, list[list[list[ExemplarBox]]] | None]:
        """Phrases tokenized (None: boxes alone, upstream's "visual") and boxes validated for
        the RGB images ``rgb``: what a call checks before it runs the graph.

        Raises :class:`~..errors.InputSpecError` for a phrase of None without a box in every
        image, and boxes for a text-only artifact (naming ``--boxes``)."""
        if isinstance(phrases, Prompts):
            names: Sequence[str | None] = phrases.phrases
        else:
            names = [phrases] if isinstance(phrases, str) else phrases
        if boxes is None:
            if any(p is None for p in names):
                raise InputSpecError("phrases: expected a phrase, got None (boxes alone) without boxes")
            return self.prompts(phrases), None  # type: ignore[arg-type]
        if not self.artifact.takes_boxes:
            raise text_only_refusal("boxes", self.artifact.path or "given")
        pair_boxes = parse_pair_boxes(boxes, [img.size for img in rgb], len(names))
        for j, phrase in enumerate(names):
            empty = [i for i, row in enumerate(pair_boxes) if not row[j]]
            if phrase is None and empty:
                raise InputSpecError(
                    f"phrases[{j}]: expected a phrase, or boxes in every image for None (boxes alone), "
                    f"got None and no box for image(s) {empty}"
                )
        if isinstance(phrases, Prompts):
            return phrases, pair_boxes
        return self.prompts([VISUAL_PHRASE if p is None else p for p in names]), pair_boxes

    def _box_feeds(
        self, rgb: Sequence[Image.Image], pair_boxes: list[list[list[ExemplarBox]]] | None
    ) -> dict[str, Any]:
        """The graph's box inputs by name (none without boxes: the artifact pads)."""
        if pair_boxes is None:
            return {}
        coords, labels, valid = box_inputs(pair_boxes, [img.size for img in rgb])
        return {"boxes": coords, "box_labels": labels, "box_valid": valid}

    def kept_pairs(
        self,
        images: Sequence[ImageInput],
        phrases: Sequence[str | None] | str | Prompts,
        *,
        threshold: float = 0.5,
        max_pairs: int | None = None,
        boxes: Any = None,
    ) -> list[list[KeptPair]]:
        """``kept[i][j]``: what image ``i`` and phrase ``j`` keep (:func:`keep_pair`), the masks
        not yet upsampled (:meth:`KeptPair.instances` does that one at a time).

        With ``max_pairs`` the phrases go through the graph in chunks of ``max_pairs // B``
        (``B = len(images)``), each chunk's outputs reduced to the kept queries before the next
        call, so a call holds at most ``max_pairs`` pairs however many phrases there are. The
        scores then differ from one call of all pairs in the last bits (other matmul sizes).

        ``boxes``: exemplar boxes per image and phrase, as :meth:`predict` takes them.

        Raises :class:`~..errors.InputSpecError` for no image, a bad phrase, box or threshold,
        or ``max_pairs`` below ``B``.
        """
        _check_threshold(threshold)
        rgb, prompts, pair_boxes, pixels = self._prepare(images, phrases, boxes)
        chunk = len(prompts)
        if max_pairs is not None:
            if max_pairs < len(rgb):
                raise InputSpecError(
                    f"max_pairs: expected at least one pair per image ({len(rgb)} images), got {max_pairs}"
                )
            chunk = min(chunk, max_pairs // len(rgb))
        kept: list[list[KeptPair]] = [[] for _ in rgb]
        features = self.features(pixels) if self.artifact.has_stages else None
        for start in range(0, len(prompts), chunk):
            ids = prompts.chunk(start, chunk)
            chunk_boxes = None if pair_boxes is None else [row[start : start + chunk] for row in pair_boxes]
            feeds = self._box_feeds(rgb, chunk_boxes)
            if features is None:
                outputs = run_graph(self.artifact, pixels, ids, **feeds)
            else:
                outputs = run_ground(self.artifact, features, ids, **feeds)
            n = ids.shape[0]
            for i, img in enumerate(rgb):
                for k in range(i * n, (i + 1) * n):
                    kept[i].append(_keep_row(outputs, k, img, threshold))
            del outputs
        return kept

    def features(self, pixels: Any) -> tuple[Any, ...]:
        """A staged artifact's ``encode_images(pixels)`` (the graph's ``images`` input, as
        :meth:`preprocess` makes it), from :attr:`cache` when these very pixels were encoded
        before, else computed and kept there; with :attr:`encode_alone`, image by image."""
        if self.encode_alone and len(pixels) > 1:
            parts = [self.features(pixels[i : i + 1]) for i in range(len(pixels))]
            return concat_batch(parts, self.artifact.array_library)
        key = pixels_key(pixels)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        features = run_encode(self.artifact, pixels)
        self.cache.put(key, features)
        return features

    def predict(
        self,
        images: Sequence[ImageInput],
        phrases: Sequence[str | None] | str | Prompts,
        threshold: float = 0.5,
        *,
        boxes: Any = None,
    ) -> list[list[PairResult]]:
        """Return ``results[i][j]`` for image ``i`` and phrase ``j`` (upstream post-processing).

        ``boxes`` (box-capable artifacts, exported with ``--boxes``): ``boxes[i][j]`` is the
        list of exemplar boxes of image ``i`` and phrase ``j`` in that image's pixels, each
        ``(x0, y0, x1, y1)`` (positive) or ``(x0, y0, x1, y1, label)`` with label True/1
        positive, False/0 negative (:mod:`.boxes`: validated, clipped to the image). A phrase
        of None means boxes alone (upstream's "visual" phrase). Raises
        :class:`~..errors.InputSpecError` naming a bad image, phrase, box or threshold.
        """
        kept = self.kept_pairs(images, phrases, threshold=threshold, boxes=boxes)  # one graph call
        return [[PairResult.of(pair) for pair in row] for row in kept]

    def __repr__(self) -> str:
        return f"Predictor({self.artifact!r})"


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise InputSpecError(f"threshold: expected a value in [0, 1], got {threshold}")


def _keep_row(outputs: Outputs, k: int, img: Image.Image, threshold: float) -> KeptPair:
    logits, boxes, masks, presence = outputs
    return keep_pair(
        logits[k : k + 1],
        boxes[k : k + 1],
        masks[k : k + 1],
        presence[k : k + 1],
        height=img.height,
        width=img.width,
        threshold=threshold,
    )
