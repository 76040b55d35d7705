"""Run any artifact on images and phrases, as upstream's ``Sam3Processor`` does.

Pre-processing (images to 8-bit RGB by one path, :mod:`.images`; resize to the artifact's
image size; normalise with mean and std 0.5), tokenization (:class:`..tokenizer.Tokenizer`,
upstream's ids, context length from the artifact) and post-processing (presence score times
sigmoid of the logits, threshold, boxes to pixel xyxy, masks upsampled to the image size then
thresholded at 0.5) are upstream's, applied to every image-phrase pair of one batched call of
the graph. Nothing here imports ``sam3``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..artifact.base import Artifact, Outputs
from ..artifact.loader import as_artifact
from ..contract import NORMALIZE_MEAN, NORMALIZE_STD, pair_scores
from ..errors import ArtifactError, InputSpecError
from ..tokenizer import BPE_VOCAB_SHA256, Tokenizer, validate_phrases
from .images import DEFAULT_MAX_PIXELS, ImageInput, rgb_array, to_rgb

__all__ = [
    "Instance",
    "KeptPair",
    "PairResult",
    "Predictor",
    "iter_instances",
    "keep_pair",
    "manifest_tokenizer",
    "postprocess",
    "tokenize_phrases",
]


@dataclasses.dataclass
class Instance:
    """One kept instance: score, box in pixels (x0, y0, x1, y1), boolean mask (H, W)."""

    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray


@dataclasses.dataclass
class PairResult:
    """Upstream-style tensors for one image and phrase (what ``Sam3Processor`` returns)."""

    scores: torch.Tensor  # [K]
    boxes: torch.Tensor  # [K, 4] pixel xyxy
    masks: torch.Tensor  # [K, 1, H, W] bool
    masks_logits: torch.Tensor  # [K, 1, H, W] probabilities after sigmoid

    def instances(self) -> list[Instance]:
        return [
            Instance(
                score=float(self.scores[k]),
                box=tuple(float(v) for v in self.boxes[k]),  # type: ignore[arg-type]
                mask=self.masks[k, 0].numpy(),
            )
            for k in range(self.scores.shape[0])
        ]


def _keep(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    masks: torch.Tensor,
    presence: torch.Tensor,
    threshold: float,
    height: int,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores, pixel xyxy boxes and low-resolution mask logits of the kept queries."""
    from torchvision.ops import box_convert

    probs = pair_scores(logits, presence)
    keep = probs > threshold
    probs, masks, boxes = probs[keep], masks[keep], boxes[keep]
    boxes = box_convert(boxes, "cxcywh", "xyxy")
    scale = torch.tensor([width, height, width, height])
    return probs, boxes * scale[None, :], masks


def postprocess(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    masks: torch.Tensor,
    presence: torch.Tensor,
    *,
    height: int,
    width: int,
    threshold: float,
) -> PairResult:
    """Upstream ``Sam3Processor._forward_grounding`` post-processing for one pair (inputs
    with a leading pair dim of 1): every kept mask upsampled at once, as upstream does."""
    probs, boxes, low = _keep(logits, boxes, masks, presence, threshold, height, width)
    up = F.interpolate(low.unsqueeze(1), (height, width), mode="bilinear", align_corners=False).sigmoid()
    return PairResult(scores=probs, boxes=boxes, masks=up > 0.5, masks_logits=up)


@dataclasses.dataclass
class KeptPair:
    """The queries one image-phrase pair keeps, before upsampling (what :func:`keep_pair`
    returns): ``scores`` float32 ``[K]``, ``boxes`` float32 ``[K, 4]`` pixel xyxy,
    ``low_masks`` float32 ``[K, h, w]`` mask logits at the graph's resolution, and the image
    size ``height`` x ``width`` the masks upsample to. The tensors are copies, so the graph's
    outputs can be freed while a ``KeptPair`` is kept."""

    scores: torch.Tensor
    boxes: torch.Tensor
    low_masks: torch.Tensor
    height: int
    width: int

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def instances(self) -> Iterator[Instance]:
        """The kept instances with the masks :func:`postprocess` gives, one upsampled at a
        time: memory stays at one full-size mask however many instances a large image has."""
        size = (self.height, self.width)
        for k in range(len(self)):
            up = F.interpolate(
                self.low_masks[k : k + 1].unsqueeze(1), size, mode="bilinear", align_corners=False
            )
            mask = up.sigmoid_()[0, 0] > 0.5
            del up
            box = tuple(float(v) for v in self.boxes[k])
            yield Instance(score=float(self.scores[k]), box=box, mask=mask.numpy())  # type: ignore[arg-type]


def keep_pair(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    masks: torch.Tensor,
    presence: torch.Tensor,
    *,
    height: int,
    width: int,
    threshold: float,
) -> KeptPair:
    """The queries of one pair (inputs with a leading pair dim of 1) whose score exceeds
    ``threshold``, by upstream's rule (:func:`postprocess` without the upsampling)."""
    probs, pixel_boxes, low = _keep(logits, boxes, masks, presence, threshold, height, width)
    return KeptPair(scores=probs, boxes=pixel_boxes, low_masks=low, height=height, width=width)


def iter_instances(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    masks: torch.Tensor,
    presence: torch.Tensor,
    *,
    height: int,
    width: int,
    threshold: float,
) -> Iterator[Instance]:
    """The instances :func:`postprocess` keeps, with the same masks, one upsampled at a time
    (:meth:`KeptPair.instances` of :func:`keep_pair`)."""
    kept = keep_pair(logits, boxes, masks, presence, height=height, width=width, threshold=threshold)
    yield from kept.instances()


def manifest_tokenizer(manifest: dict[str, Any]) -> Tokenizer:
    """Upstream's tokenizer with the context length an artifact's ``manifest`` states.

    Raises :class:`~..errors.ArtifactError` when the manifest expects another BPE vocab than
    this install's.
    """
    expected = manifest.get("tokenizer", {}).get("bpe_vocab_sha256", BPE_VOCAB_SHA256)
    if expected != BPE_VOCAB_SHA256:
        raise ArtifactError(
            f"manifest tokenizer: expects BPE vocab sha256 {expected}, this install has {BPE_VOCAB_SHA256}"
        )
    return Tokenizer(int(manifest["context_length"]))


def tokenize_phrases(tokenizer: Tokenizer, phrases: Sequence[str] | str) -> torch.Tensor:
    """Token ids ``[P, context_length]`` int64 of ``phrases``; warns (``UserWarning``) when a
    phrase is truncated to the context length. Raises :class:`~..errors.InputSpecError` for
    no phrase, a blank one, or one with no token."""
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
    return ids


class Predictor:
    """Text-prompted segmentation with an exported SAM3 pipeline of any kind.

    ``source`` is an artifact path written by ``sam3-exportable export`` (``.pt2``,
    ``.aoti.pt2`` or ``.onnx``; manifest and sha256 are checked), a loaded
    :class:`~..artifact.base.Artifact`, or an in-memory ``ExportedProgram``. ``max_pixels``
    bounds the images read from files (:mod:`.images`).
    """

    def __init__(self, source: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        #: The loaded artifact; calling it runs the graph.
        self.artifact: Artifact = as_artifact(source)
        self.manifest = self.artifact.manifest
        self.image_size = self.artifact.image_size
        self.context_length = self.artifact.context_length
        self.max_pixels = max_pixels
        self._tokenizer: Tokenizer | None = None
        from torchvision.transforms import v2

        # Upstream Sam3Processor's transform, verbatim.
        self.transform = v2.Compose(
            [
                v2.ToDtype(torch.uint8, scale=True),
                v2.Resize(size=(self.image_size, self.image_size)),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(NORMALIZE_MEAN), std=list(NORMALIZE_STD)),
            ]
        )

    @property
    def program(self) -> torch.export.ExportedProgram | None:
        """The exported program (None for kinds that hold none: AOTInductor, ONNX)."""
        return getattr(self.artifact, "program", None)

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = manifest_tokenizer(self.manifest)
        return self._tokenizer

    def tokenize(self, phrases: Sequence[str] | str) -> torch.Tensor:
        """Token ids ``[P, context_length]``; warns when a phrase is truncated."""
        return tokenize_phrases(self.tokenizer, phrases)

    def load(self, images: Sequence[ImageInput]) -> list[Image.Image]:
        """Every image as 8-bit RGB (:func:`.images.to_rgb`)."""
        return [to_rgb(img, max_pixels=self.max_pixels) for img in images]

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """``images`` float32 ``[B, 3, S, S]`` as upstream's processor makes them."""
        # the transform sees a channels-last view of one copy of the pixels: the values of
        # torchvision's to_image, without its two extra copies of a large image
        return torch.stack(
            [self.transform(torch.from_numpy(rgb_array(img)).permute(2, 0, 1)) for img in self.load(images)]
        )

    def run(self, images: Sequence[ImageInput], phrases: Sequence[str] | str) -> Outputs:
        """One call of the graph for all images x phrases; raw outputs, image-major pairs."""
        if not len(images):
            raise InputSpecError("images: expected at least one image, got none")
        token_ids = self.tokenize(phrases)
        with torch.inference_mode():
            return self.artifact(self.preprocess(images), token_ids)

    def kept_pairs(
        self,
        images: Sequence[ImageInput],
        phrases: Sequence[str] | str,
        *,
        threshold: float = 0.5,
        max_pairs: int | None = None,
    ) -> list[list[KeptPair]]:
        """``kept[i][j]``: what image ``i`` and phrase ``j`` keep (:func:`keep_pair`), the masks
        not yet upsampled (:meth:`KeptPair.instances` does that one at a time).

        With ``max_pairs`` the phrases go through the graph in chunks of ``max_pairs // B``
        (``B = len(images)``), each chunk's outputs reduced to the kept queries before the next
        call, so a call holds at most ``max_pairs`` pairs however many phrases there are. The
        scores then differ from one call of all pairs in the last bits (other matmul sizes).

        Raises :class:`~..errors.InputSpecError` for no image, a bad phrase or threshold, or
        ``max_pairs`` below ``B``.
        """
        if not 0.0 <= threshold <= 1.0:
            raise InputSpecError(f"threshold: expected a value in [0, 1], got {threshold}")
        phrases = validate_phrases(phrases)
        rgb = self.load(images)
        if not rgb:
            raise InputSpecError("images: expected at least one image, got none")
        chunk = len(phrases)
        if max_pairs is not None:
            if max_pairs < len(rgb):
                raise InputSpecError(
                    f"max_pairs: expected at least one pair per image ({len(rgb)} images), got {max_pairs}"
                )
            chunk = min(chunk, max_pairs // len(rgb))
        token_ids = self.tokenize(phrases)
        pixels = self.preprocess(rgb)
        kept: list[list[KeptPair]] = [[] for _ in rgb]
        for start in range(0, len(phrases), chunk):
            ids = token_ids[start : start + chunk]
            with torch.inference_mode():
                logits, boxes, masks, presence = self.artifact(pixels, ids)
            n = ids.shape[0]
            for i, img in enumerate(rgb):
                for k in range(i * n, (i + 1) * n):
                    kept[i].append(
                        keep_pair(
                            logits[k : k + 1],
                            boxes[k : k + 1],
                            masks[k : k + 1],
                            presence[k : k + 1],
                            height=img.height,
                            width=img.width,
                            threshold=threshold,
                        )
                    )
            del logits, boxes, masks, presence
        return kept

    def predict(
        self,
        images: Sequence[ImageInput],
        phrases: Sequence[str] | str,
        threshold: float = 0.5,
    ) -> list[list[PairResult]]:
        """Return ``results[i][j]`` for image ``i`` and phrase ``j`` (upstream post-processing)."""
        if not 0.0 <= threshold <= 1.0:
            raise InputSpecError(f"threshold: expected a value in [0, 1], got {threshold}")
        phrases = validate_phrases(phrases)
        rgb = self.load(images)
        logits, boxes, masks, presence = self.run(rgb, phrases)
        results = []
        for i, img in enumerate(rgb):
            row = []
            for j in range(len(phrases)):
                k = i * len(phrases) + j
                row.append(
                    postprocess(
                        logits[k : k + 1],
                        boxes[k : k + 1],
                        masks[k : k + 1],
                        presence[k : k + 1],
                        height=img.height,
                        width=img.width,
                        threshold=threshold,
                    )
                )
            results.append(row)
        return results

    def __repr__(self) -> str:
        return f"Predictor({self.artifact!r})"
