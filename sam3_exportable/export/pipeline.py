"""``FullSam3PipelineWrapper``: the whole text-grounding pipeline as one ``nn.Module``."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..artifact.program import synthetic_inputs
from ..contract import OUTPUT_NAMES, check_box_inputs, check_image_input, check_inputs
from ..errors import InputSpecError

__all__ = ["OUTPUT_NAMES", "FullSam3PipelineWrapper", "is_tracing", "synthetic_inputs"]

# Upstream's VL backbone encodes text under exactly this SDPA backend selection.
_TEXT_SDPA_BACKENDS = [SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]


def is_tracing() -> bool:
    """True while torch.export / torch.compile traces (strict or non-strict)."""
    return bool(torch.compiler.is_compiling())


class FullSam3PipelineWrapper(nn.Module):
    """Image encoder + text encoder + fusion encoder + decoder + segmentation head.

    ``forward(images, token_ids[, boxes, box_labels, box_valid])``:

    * ``images``: float32 ``[B, 3, S, S]``, already resized to ``S = image_size`` and
      normalised as upstream does (mean 0.5, std 0.5), ``B >= 1``.
    * ``token_ids``: int64 ``[P, L]``, ``L = context_length``, upstream tokenizer output
      (0 is padding), ``P >= 1``.
    * ``boxes`` float32 ``[B, P, K, 4]``, ``box_labels`` int64 ``[B, P, K]``, ``box_valid``
      bool ``[B, P, K]`` (optional, all three or none): each pair's exemplar boxes as
      :mod:`~sam3_exportable.contract` describes them, grounded as upstream's
      ``Sam3Processor.add_geometric_prompt`` does. Without them the geometric prompt is
      upstream's empty one (text-only grounding, the program exported by default).

    Returns ``(pred_logits [B*P, Q, 1], pred_boxes [B*P, Q, 4] (cxcywh, normalised),
    pred_masks [B*P, Q, S/3.5, S/3.5] (logits), presence_logit_dec [B*P, 1])``, all float32,
    for every image-prompt pair in image-major order (pair ``b * P + p``), using
    text-only grounding exactly as upstream's ``Sam3Processor`` does for one pair.

    With ``autocast_dtype`` (e.g. ``torch.bfloat16``) the computation runs under autocast
    entered inside ``forward``, so an exported graph still takes and returns float32.

    In eager mode, inputs of the wrong rank, size or dtype, an empty batch, non-finite
    pixels and out-of-vocabulary token ids raise :class:`~sam3_exportable.errors.InputSpecError`.
    """

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if autocast_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(
                f"autocast_dtype: expected None, torch.bfloat16 or torch.float16, got {autocast_dtype}"
            )
        self.model = model
        self.autocast_dtype = None if autocast_dtype == torch.float32 else autocast_dtype
        language = model.backbone.language_backbone
        self.context_length: int = int(language.context_length)
        self.vocab_size: int = int(language.encoder.vocab_size)
        trunk = model.backbone.vision_backbone.trunk
        patch = int(trunk.patch_embed.proj.kernel_size[0])
        feat = model.transformer.decoder.compilable_stored_size
        if feat is None:
            raise ValueError(
                "FullSam3PipelineWrapper: the decoder has no box-RPB resolution/stride, so "
                "the image size cannot be derived; build the model with resolution and stride"
            )
        self.image_size: int = int(feat[0]) * patch

    def check_inputs(self, images: torch.Tensor, token_ids: torch.Tensor, *boxes: torch.Tensor) -> None:
        """Raise :class:`~..errors.InputSpecError` naming the input, what was expected and
        what came (:func:`~..contract.check_inputs` and, given the three box inputs,
        :func:`~..contract.check_box_inputs`: the checks every artifact applies too)."""
        check_inputs(
            images,
            token_ids,
            image_size=self.image_size,
            context_length=self.context_length,
            vocab_size=self.vocab_size,
        )
        if boxes:
            check_box_inputs(*boxes, batch=int(images.shape[0]), prompts=int(token_ids.shape[0]))

    def encode_text(self, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Upstream ``VETextEncoder`` on token ids (its string branch after tokenizing)."""
        language = self.model.backbone.language_backbone
        with sdpa_kernel(_TEXT_SDPA_BACKENDS):
            padding = (token_ids != 0).ne(1)
            inputs_embeds = language.encoder.token_embedding(token_ids)
            _, text_memory = language.encoder(token_ids)
            text_memory = language.resizer(text_memory.transpose(0, 1))
        return {
            "language_features": text_memory,
            "language_mask": padding,
            "language_embeds": inputs_embeds.transpose(0, 1),
        }

    def _geometric_prompt(self, batch: int, prompts: int, boxes: tuple[torch.Tensor, ...]) -> Any:
        """Upstream's ``Prompt`` of the ``batch * prompts`` image-major pairs: its empty dummy prompt
        without boxes; else the pairs' boxes, sequence-first, with valid boxes moved to the
        front in order (upstream's right padding) and padding zeroed (a padding slot's values
        never reach a result; finite values keep masked attention exact)."""
        if not boxes:
            return self.model._get_dummy_prompt(num_prompts=batch * prompts)
        from sam3.model.geometry_encoders import Prompt

        coords, labels, valid = boxes
        slots = coords.shape[2]
        # the box inputs' B, P, K are the images', the phrases' and each other's: said first,
        # so the trace keeps one symbol per dim (else it guards on relations between copies)
        for tensor in (coords, labels, valid):
            torch._check(tensor.shape[0] == batch)
            torch._check(tensor.shape[1] == prompts)
            torch._check(tensor.shape[2] == slots)
        # a stable partition (valid first): a permutation, so values are moved, never changed
        count = valid.long()
        front = count.sum(-1, keepdim=True)
        slot = torch.where(valid, count.cumsum(-1) - 1, front + (1 - count).cumsum(-1) - 1)
        coords = torch.where(valid.unsqueeze(-1), coords, torch.zeros_like(coords))
        labels = torch.where(valid, labels, torch.ones_like(labels))
        coords = torch.zeros_like(coords).scatter(2, slot.unsqueeze(-1).expand_as(coords), coords)
        labels = torch.zeros_like(labels).scatter(2, slot, labels)
        padding = torch.arange(slots, device=coords.device).view(1, 1, slots) >= front
        # flatten(0, 1), not reshape(pairs, ...): the pair count stays the box inputs' own
        # B * P (a reshape to the images' B times the phrases' P specializes P != 1)
        return Prompt(
            box_embeddings=coords.flatten(0, 1).transpose(0, 1).contiguous(),
            box_mask=padding.flatten(0, 1),
            box_labels=labels.flatten(0, 1).transpose(0, 1).contiguous(),
        )

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Names of the image features :meth:`encode_images` returns, in order: every
        ``backbone_fpn_<level>`` then the ``vision_pos_enc_<level>`` of the levels the
        grounding reads (upstream's ``num_feature_levels`` last ones)."""
        levels = len(self.model.backbone.vision_backbone.convs) - int(self.model.backbone.scalp)
        used = range(levels - int(self.model.num_feature_levels), levels)
        return tuple(f"backbone_fpn_{i}" for i in range(levels)) + tuple(f"vision_pos_enc_{i}" for i in used)

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Upstream's ``forward_image``, reduced to what grounding reads (:attr:`feature_names`)."""
        out = self.model.backbone.forward_image(images)
        used = int(self.model.num_feature_levels)
        return (*out["backbone_fpn"], *out["vision_pos_enc"][-used:])

    def _ground_features(
        self, features: tuple[torch.Tensor, ...], token_ids: torch.Tensor, *boxes: torch.Tensor
    ) -> dict[str, Any]:
        """Upstream's ``forward_grounding`` of every image-prompt pair on :meth:`_encode`'s features."""
        from sam3.model.data_misc import FindStage

        used = int(self.model.num_feature_levels)
        fpn, pos = list(features[:-used]), list(features[-used:])
        batch, prompts = fpn[0].shape[0], token_ids.shape[0]
        device = fpn[0].device
        # what forward_image returns, less the levels' position encodings grounding never reads
        backbone_out: dict[str, Any] = {
            "vision_features": fpn[-1],
            "vision_pos_enc": pos,
            "backbone_fpn": fpn,
            "sam2_backbone_out": None,
        }
        backbone_out.update(self.encode_text(token_ids))
        # image-major pairs: pair b * P + p holds image b and prompt p
        img_ids = torch.arange(batch, device=device).view(batch, 1).expand(batch, prompts).reshape(-1)
        text_ids = torch.arange(prompts, device=device).view(1, prompts).expand(batch, prompts).reshape(-1)
        find_input = FindStage(
            img_ids=img_ids,
            text_ids=text_ids,
            input_boxes=None,
            input_boxes_mask=None,
            input_boxes_label=None,
            input_points=None,
            input_points_mask=None,
        )
        geometric_prompt = self._geometric_prompt(batch, prompts, boxes)
        return self.model.forward_grounding(
            backbone_out=backbone_out,
            find_input=find_input,
            find_target=None,
            geometric_prompt=geometric_prompt,
        )

    def _numerics(self, device: torch.device) -> contextlib.ExitStack:
        """The autocast and grad mode every stage and the one graph run under (see forward)."""
        stack = contextlib.ExitStack()
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(device_type=device.type, dtype=self.autocast_dtype))
        else:
            # Inference only: in fp32, grad mode changes some CPU kernels in the last bits, so
            # the graph fixes grad mode off for every caller. Under autocast, results do not
            # depend on grad mode, but an exported no_grad region around autocast does not
            # reproduce eager bitwise (both measured on torch 2.14.1), so none is added there.
            stack.enter_context(torch.no_grad())
        return stack

    @staticmethod
    def _box_inputs(boxes: Any, box_labels: Any, box_valid: Any) -> tuple[torch.Tensor, ...]:
        given = [t is not None for t in (boxes, box_labels, box_valid)]
        if any(given) and not all(given):
            raise InputSpecError(
                "boxes, box_labels, box_valid: expected all three or none, got "
                + ", ".join(n for n, g in zip(("boxes", "box_labels", "box_valid"), given, strict=True) if g)
            )
        return (boxes, box_labels, box_valid) if all(given) else ()

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The image stage: ``images`` as :meth:`forward` takes them to the features
        :meth:`ground` takes (:attr:`feature_names`: ``backbone_fpn_<i>`` ``[B, C, h_i, w_i]``
        and the grounding levels' ``vision_pos_enc_<i>``, in the dtype the computation makes
        them). ``ground(encode_images(x), t)`` is ``forward(x, t)`` bitwise."""
        if not is_tracing():
            check_image_input(images, image_size=self.image_size)
        with self._numerics(images.device):
            return self._encode(images)

    def ground(
        self,
        features: tuple[torch.Tensor, ...],
        token_ids: torch.Tensor,
        boxes: torch.Tensor | None = None,
        box_labels: torch.Tensor | None = None,
        box_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompt stage: :meth:`encode_images`' features of ``B`` images, ``token_ids`` and
        the optional box inputs (as :meth:`forward` takes them) to :meth:`forward`'s outputs."""
        box_inputs = self._box_inputs(boxes, box_labels, box_valid)
        with self._numerics(token_ids.device):
            out = self._ground_features(tuple(features), token_ids, *box_inputs)
        return tuple(out[name].float() for name in OUTPUT_NAMES)  # type: ignore[return-value]

    def forward(
        self,
        images: torch.Tensor,
        token_ids: torch.Tensor,
        boxes: torch.Tensor | None = None,
        box_labels: torch.Tensor | None = None,
        box_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        box_inputs = self._box_inputs(boxes, box_labels, box_valid)
        if not is_tracing():
            self.check_inputs(images, token_ids, *box_inputs)
        with self._numerics(images.device):
            out = self._ground_features(self._encode(images), token_ids, *box_inputs)
        return tuple(out[name].float() for name in OUTPUT_NAMES)  # type: ignore[return-value]
