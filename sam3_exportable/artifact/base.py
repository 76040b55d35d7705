"""The one interface every loaded artifact kind implements: :class:`Artifact`."""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from ..contract import (
    check_box_inputs,
    check_features,
    check_image_input,
    check_inputs,
    check_token_input,
    padding_boxes,
)
from ..errors import InputSpecError
from .manifest import ENCODE_IMAGES, GROUND, Manifest, StagesInfo

__all__ = ["Artifact", "Outputs", "default_threads", "text_only_refusal"]

#: ``(pred_logits, pred_boxes, pred_masks, presence_logit_dec)``, see :mod:`..contract`.
Outputs = tuple[Any, Any, Any, Any]


def text_only_refusal(what: str, where: Any) -> InputSpecError:
    """The one refusal of boxes for a text-only artifact: ``what`` names the input given."""
    return InputSpecError(
        f"{what}: expected no boxes for the text-only artifact {where}; "
        "export it with --boxes (export_full_pipeline(model, boxes=True)) to prompt with boxes"
    )


def default_threads() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1: the intra-op threads
    of an artifact loaded without ``threads``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class Artifact(abc.ABC):
    """A loaded artifact: ``artifact(images, token_ids)`` returns the four outputs;
    a box-capable one (:attr:`takes_boxes`) also takes ``boxes=``, ``box_labels=`` and
    ``box_valid=`` (all three, see :mod:`..contract`), and without them runs every pair on its
    phrase alone (it supplies one padding slot per pair).

    ``images`` float32 ``[B, 3, image_size, image_size]`` and ``token_ids`` int64
    ``[P, context_length]`` (numpy arrays or torch tensors) are checked against the
    manifest's input contract first (:func:`~..contract.check_inputs`: rank, sizes, dtype,
    ``B >= 1``, ``P >= 1``, finite pixels, ids in the vocabulary), with the same named
    :class:`~..errors.InputSpecError` as the eager wrapper. The outputs are float32 arrays of
    the kind's :attr:`array_library` (torch tensors for ``pt2``/``aoti``; numpy arrays for
    ``onnx``, or torch tensors when it was given torch tensors) for the ``B * P``
    image-major pairs.

    Attributes:
        kind: ``"pt2"``, ``"aoti"`` or ``"onnx"`` (from the manifest).
        array_library: ``"torch"`` or ``"numpy"``: what the kind computes with; pre- and
            post-processing follow it (:mod:`..predict.processing`).
        manifest: the validated :class:`~.manifest.Manifest`.
        path: the file it was loaded from (None for an in-memory program).
        image_size, context_length, vocab_size: the input contract.
        takes_boxes: whether the graph takes exemplar boxes (exported with ``--boxes``).
    """

    kind: ClassVar[str]
    array_library: ClassVar[str]

    def __init__(self, manifest: Manifest, path: Path | None) -> None:
        self.manifest = manifest
        self.path = path
        self.image_size = manifest.image_size
        self.context_length = manifest.context_length
        self.vocab_size: int | None = manifest.vocab_size
        self.takes_boxes = manifest.takes_boxes

    def check_inputs(self, images: Any, token_ids: Any, *boxes: Any) -> None:
        """Raise :class:`~..errors.InputSpecError` unless the inputs fit the contract."""
        check_inputs(
            images,
            token_ids,
            image_size=self.image_size,
            context_length=self.context_length,
            vocab_size=self.vocab_size,
        )
        if boxes:
            check_box_inputs(*boxes, batch=int(images.shape[0]), prompts=int(token_ids.shape[0]))

    def __call__(
        self,
        images: Any,
        token_ids: Any,
        boxes: Any = None,
        box_labels: Any = None,
        box_valid: Any = None,
    ) -> Outputs:
        given = {"boxes": boxes, "box_labels": box_labels, "box_valid": box_valid}
        self.check_inputs(images, token_ids)
        inputs = [images, token_ids, *self._box_feed(int(images.shape[0]), token_ids, given, images)]
        logits, pred_boxes, masks, presence = self._run(*inputs)
        return logits, pred_boxes, masks, presence

    def _box_feed(self, batch: int, token_ids: Any, given: dict[str, Any], like: Any) -> list[Any]:
        """The box inputs the graph takes after ``token_ids``: none for a text-only graph, the
        given three, or padding (one empty slot per pair) when none were given. Raises
        :class:`~..errors.InputSpecError` for boxes to a text-only graph or one or two of three."""
        named = [name for name, value in given.items() if value is not None]
        if named and not self.takes_boxes:
            raise text_only_refusal(", ".join(named), self.path or "this program")
        if named and len(named) < 3:
            missing = [name for name in given if name not in named]
            raise InputSpecError(
                f"{', '.join(missing)}: expected with {', '.join(named)} (all three or none)"
            )
        if not self.takes_boxes:
            return []
        if named:
            check_box_inputs(*given.values(), batch=batch, prompts=int(token_ids.shape[0]))
            return list(given.values())
        return list(padding_boxes(batch, int(token_ids.shape[0]), like))

    # ------------------------------------------------------------------ the two stages

    @property
    def has_stages(self) -> bool:
        """Whether the artifact holds the two stages (exported with ``--stages``):
        :meth:`encode_images` and :meth:`ground`."""
        return self.manifest.stages is not None

    def _require_stages(self, what: str) -> StagesInfo:
        if self.manifest.stages is None:
            raise InputSpecError(
                f"{what}: expected an artifact with stages (export --stages), got the one-graph "
                f"{self.kind} artifact {self.path or 'given'}"
            )
        return self.manifest.stages

    def encode_images(self, images: Any) -> tuple[Any, ...]:
        """The image stage: ``images`` (as :meth:`__call__` takes them, checked the same way)
        to the features :meth:`ground` takes, in the order and shapes of the manifest's
        ``stages.features``, arrays of :attr:`array_library`. Raises
        :class:`~..errors.InputSpecError` for bad images or an artifact without stages."""
        self._require_stages("encode_images")
        check_image_input(images, image_size=self.image_size)
        return tuple(self._run_stage(ENCODE_IMAGES, images))

    def ground(
        self,
        features: Sequence[Any],
        token_ids: Any,
        boxes: Any = None,
        box_labels: Any = None,
        box_valid: Any = None,
    ) -> Outputs:
        """The prompt stage: :meth:`encode_images`' ``features`` of ``B`` images and
        ``token_ids`` (and box inputs, as :meth:`__call__` takes them) to the four outputs.
        ``ground(encode_images(x), t)`` equals ``self(x, t)`` (bitwise for ``.pt2``). Raises
        :class:`~..errors.InputSpecError` naming a feature, input or box that does not fit."""
        info = self._require_stages("ground")
        batch = check_features(features, [(f.name, f.shape, f.dtype) for f in info.features])
        check_token_input(token_ids, context_length=self.context_length, vocab_size=self.vocab_size)
        given = {"boxes": boxes, "box_labels": box_labels, "box_valid": box_valid}
        feed = self._box_feed(batch, token_ids, given, features[0])
        logits, pred_boxes, masks, presence = self._run_stage(GROUND, tuple(features), token_ids, *feed)
        return logits, pred_boxes, masks, presence

    def _run_stage(self, name: str, *inputs: Any) -> Any:
        """The kind's runtime of stage ``name`` on checked inputs (``ground``'s features as one
        tuple first). Kinds that cannot hold stages keep this refusal."""
        raise InputSpecError(f"{name}: expected a kind that holds stages (pt2), got a {self.kind} artifact")

    @abc.abstractmethod
    def set_threads(self, threads: int) -> None:
        """Run with ``threads`` intra-op threads from now on (for torch kinds that is
        ``torch.set_num_threads``, process-wide)."""

    @abc.abstractmethod
    def _run(self, *inputs: Any) -> Any:
        """The kind's runtime on checked inputs (the manifest's, in order): four arrays."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind!r}, path={str(self.path) if self.path else None!r}, "
            f"image_size={self.image_size}, context_length={self.context_length})"
        )
