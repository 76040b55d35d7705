"""The one interface every loaded artifact kind implements: :class:`Artifact`."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..contract import check_inputs
from ..errors import ArtifactError

__all__ = ["Artifact", "Outputs"]

#: ``(pred_logits, pred_boxes, pred_masks, presence_logit_dec)``, see :mod:`..contract`.
Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class Artifact(abc.ABC):
    """A loaded artifact: ``artifact(images, token_ids)`` returns the four outputs.

    ``images`` float32 ``[B, 3, image_size, image_size]`` and ``token_ids`` int64
    ``[P, context_length]`` are checked against the manifest's input contract first
    (:func:`~..contract.check_inputs`: rank, sizes, dtype, ``B >= 1``, ``P >= 1``, finite
    pixels, ids in the vocabulary), with the same named
    :class:`~..errors.InputSpecError` as the eager wrapper. The outputs are CPU float32
    tensors for the ``B * P`` image-major pairs.

    Attributes:
        kind: ``"pt2"``, ``"aoti"`` or ``"onnx"`` (from the manifest).
        manifest: the validated manifest (:mod:`.manifest`).
        path: the file it was loaded from (None for an in-memory program).
        image_size, context_length: the input contract.
    """

    kind: ClassVar[str]

    def __init__(self, manifest: dict[str, Any], path: Path | None) -> None:
        self.manifest = manifest
        self.path = path
        try:
            self.image_size = int(manifest["image_size"])
            self.context_length = int(manifest["context_length"])
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(
                f"{path or 'artifact'}: expected image_size and context_length in its manifest, got "
                f"{manifest.get('image_size')!r} and {manifest.get('context_length')!r}"
            ) from None
        vocab = manifest.get("vocab_size")
        self.vocab_size: int | None = int(vocab) if vocab is not None else None

    def check_inputs(self, images: Any, token_ids: Any) -> None:
        """Raise :class:`~..errors.InputSpecError` unless the inputs fit the contract."""
        check_inputs(
            images,
            token_ids,
            image_size=self.image_size,
            context_length=self.context_length,
            vocab_size=self.vocab_size,
        )

    def __call__(self, images: torch.Tensor, token_ids: torch.Tensor) -> Outputs:
        self.check_inputs(images, token_ids)
        logits, boxes, masks, presence = self._run(images, token_ids)
        return logits, boxes, masks, presence

    @abc.abstractmethod
    def _run(self, images: torch.Tensor, token_ids: torch.Tensor) -> Any:
        """The kind's runtime on checked inputs: four tensors."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind!r}, path={str(self.path) if self.path else None!r}, "
            f"image_size={self.image_size}, context_length={self.context_length})"
        )
