"""Run an exported pipeline on image files and phrases, as upstream's ``Sam3Processor`` does.

Pre-processing (RGB image, resize to the artifact's image size, normalise with mean and
std 0.5), tokenization (upstream's ``SimpleTokenizer`` with the BPE vocab from
open_clip_torch, context length from the artifact) and post-processing (presence score
times sigmoid of the logits, threshold, boxes to pixel xyxy, masks upsampled to the image
size then thresholded at 0.5) are upstream's, applied to every image-phrase pair of one
batched call of the graph.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .aoti import AOTI_FORMAT, LoadedAotiPackage, load_aoti
from .artifact import FORMAT, LoadedPipeline, load_pipeline
from .errors import ArtifactError, InputSpecError

__all__ = [
    "Instance",
    "Predictor",
    "load_artifact",
    "load_image",
    "validate_phrases",
]

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image file as 8-bit RGB, applying its EXIF orientation.

    Grayscale and palette images are expanded to RGB, RGBA drops its alpha, 16-bit images
    are scaled to 8 bits (value / 257). Raises ``FileNotFoundError`` for a missing file
    and :class:`InputSpecError` for a file that is not a readable image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path}: no such file")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputSpecError(f"image {path}: expected a readable image file, got {exc}") from exc
    if img.mode in _SIXTEEN_BIT_MODES:
        array = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(array / 257.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def validate_phrases(phrases: Sequence[str]) -> list[str]:
    """Raise :class:`InputSpecError` for no phrases or an empty/blank phrase."""
    if isinstance(phrases, str):
        phrases = [phrases]
    phrases = list(phrases)
    if not phrases:
        raise InputSpecError("phrases: expected at least one text prompt, got none")
    for i, phrase in enumerate(phrases):
        if not isinstance(phrase, str) or not phrase.strip():
            raise InputSpecError(f"phrases[{i}]: expected a non-empty phrase, got {phrase!r}")
    return phrases


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


def _program_io(program: torch.export.ExportedProgram) -> tuple[int, int]:
    """(image size, context length) read from the program's input placeholders."""
    nodes = {n.name: n for n in program.graph.nodes}
    images, tokens = (nodes[name].meta["val"] for name in program.graph_signature.user_inputs)
    return int(images.shape[-1]), int(tokens.shape[-1])


def load_artifact(path: str | os.PathLike[str]) -> LoadedPipeline | LoadedAotiPackage:
    """Load a ``.pt2`` program or an AOTInductor package, chosen by its manifest's format.

    Raises :class:`ArtifactError` when the manifest is missing or of another format.
    """
    from .artifact import read_manifest

    target = Path(path)
    kind = read_manifest(target, expected_format=(FORMAT, AOTI_FORMAT))["format"]
    return load_aoti(target) if kind == AOTI_FORMAT else load_pipeline(target)


class Predictor:
    """Text-prompted segmentation with an exported SAM3 pipeline.

    ``source`` is a path written by ``sam3-exportable export`` (a ``.pt2`` program or, with
    ``--aoti``, an AOTInductor package; manifest and sha256 are checked), a
    :class:`LoadedPipeline`, a :class:`LoadedAotiPackage`, or an in-memory
    ``ExportedProgram`` (image size and context length are then read from its input shapes).
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | LoadedPipeline | LoadedAotiPackage | torch.export.ExportedProgram,
    ) -> None:
        if isinstance(source, (str, os.PathLike)):
            source = load_artifact(source)
        program: torch.export.ExportedProgram | None
        if isinstance(source, LoadedAotiPackage):
            program, manifest = None, source.manifest
            try:
                image_size, context_length = int(manifest["image_size"]), int(manifest["context_length"])
            except (KeyError, TypeError, ValueError):
                raise ArtifactError(
                    f"{source.path}: expected image_size and context_length in its manifest, got "
                    f"{manifest.get('image_size')!r} and {manifest.get('context_length')!r}"
                ) from None
            module: Any = source.module()
        else:
            if isinstance(source, LoadedPipeline):
                program, manifest = source.program, source.manifest
            elif isinstance(source, torch.export.ExportedProgram):
                program, manifest = source, {}
            else:
                raise TypeError(
                    f"Predictor source: expected a .pt2 path, LoadedPipeline, LoadedAotiPackage or "
                    f"ExportedProgram, got {type(source).__name__}"
                )
            image_size, context_length = _program_io(program)
            for key, value in (("image_size", image_size), ("context_length", context_length)):
                if key in manifest and manifest[key] != value:
                    raise ArtifactError(
                        f"manifest {key}: {manifest[key]} disagrees with the program's inputs ({value})"
                    )
            module = program.module()
        #: The exported program (None for an AOTInductor package).
        self.program = program
        #: Callable ``(images, token_ids) -> (logits, boxes, masks, presence)``.
        self.module = module
        self.manifest = manifest
        self.image_size = image_size
        self.context_length = context_length
        self._tokenizer: Any = None
        from torchvision.transforms import v2

        # Upstream Sam3Processor's transform, verbatim.
        self.transform = v2.Compose(
            [
                v2.ToDtype(torch.uint8, scale=True),
                v2.Resize(size=(image_size, image_size)),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
            ]
        )

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from sam3.model.tokenizer_ve import SimpleTokenizer

            from .builders import BPE_VOCAB_SHA256, bpe_vocab_path

            expected = self.manifest.get("tokenizer", {}).get("bpe_vocab_sha256", BPE_VOCAB_SHA256)
            if expected != BPE_VOCAB_SHA256:
                raise ArtifactError(
                    f"manifest tokenizer: expects BPE vocab sha256 {expected}, this install has "
                    f"{BPE_VOCAB_SHA256}"
                )
            self._tokenizer = SimpleTokenizer(bpe_path=bpe_vocab_path())
        return self._tokenizer

    def tokenize(self, phrases: Sequence[str]) -> torch.Tensor:
        """Token ids ``[P, context_length]``; warns when a phrase is truncated."""
        phrases = validate_phrases(phrases)
        tok = self.tokenizer
        for phrase in phrases:
            n = len(tok.encode(phrase)) + 2
            if n > self.context_length:
                warnings.warn(
                    f"phrase {phrase!r} has {n} tokens with start/end; truncated to the "
                    f"artifact's context length {self.context_length}",
                    stacklevel=2,
                )
        return tok(phrases, context_length=self.context_length)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        from torchvision.transforms import v2

        return torch.stack([self.transform(v2.functional.to_image(img)) for img in images])

    def run(self, images: Sequence[Image.Image], phrases: Sequence[str]) -> tuple[torch.Tensor, ...]:
        """One call of the graph for all images x phrases; raw outputs, image-major pairs."""
        if not images:
            raise InputSpecError("images: expected at least one image, got none")
        with torch.inference_mode():
            return tuple(self.module(self.preprocess(images), self.tokenize(phrases)))

    def predict(
        self,
        images: Sequence[Image.Image | str | os.PathLike[str]],
        phrases: Sequence[str],
        threshold: float = 0.5,
    ) -> list[list[PairResult]]:
        """Return ``results[i][j]`` for image ``i`` and phrase ``j`` (upstream post-processing)."""
        if not 0.0 <= threshold <= 1.0:
            raise InputSpecError(f"threshold: expected a value in [0, 1], got {threshold}")
        phrases = validate_phrases(phrases)
        pil = [img if isinstance(img, Image.Image) else load_image(img) for img in images]
        logits, boxes, masks, presence = self.run(pil, phrases)
        results = []
        for i, img in enumerate(pil):
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
    """Upstream ``Sam3Processor._forward_grounding`` post-processing for one pair
    (inputs with a leading pair dim of 1)."""
    from sam3.model import box_ops
    from sam3.model.data_misc import interpolate

    probs = logits.sigmoid()
    presence_score = presence.sigmoid().unsqueeze(1)
    probs = (probs * presence_score).squeeze(-1)
    keep = probs > threshold
    probs, masks, boxes = probs[keep], masks[keep], boxes[keep]
    boxes = box_ops.box_cxcywh_to_xyxy(boxes)
    scale = torch.tensor([width, height, width, height])
    boxes = boxes * scale[None, :]
    masks = interpolate(masks.unsqueeze(1), (height, width), mode="bilinear", align_corners=False).sigmoid()
    return PairResult(scores=probs, boxes=boxes, masks=masks > 0.5, masks_logits=masks)


def replace_dir_atomically(staging: Path, out: Path, *, force: bool) -> None:
    """Move a fully written ``staging`` directory to ``out``; an existing ``out`` is replaced
    only with ``force`` (and only after the new one is complete)."""
    if out.exists():
        if not force:
            raise FileExistsError(f"--out {out}: exists; pass --force to overwrite")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)
