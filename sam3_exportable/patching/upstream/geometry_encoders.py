"""Patches for ``sam3/model/geometry_encoders.py``: batched ``roi_align`` in
``SequenceGeometryEncoder`` (default), an empty first sequence in ``concat_padded_sequences``
(ONNX export)."""

from __future__ import annotations

from typing import Any

import torch
import torchvision

from ..engine import Patch
from ..when import always, for_onnx_export


def _encode_boxes(
    self: Any,
    boxes: torch.Tensor,
    boxes_mask: torch.Tensor,
    boxes_labels: torch.Tensor,
    img_feats: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    # Upstream's ops, except: the scale is built on the boxes' device (no pin_memory /
    # non_blocking copy) and roi_align gets one [bs*n_boxes, 5] rois tensor, exactly the
    # tensor torchvision builds from upstream's per-image list (image-major, batch index
    # first), so the kernel sees identical input without a list whose length is bs.
    from sam3.model.box_ops import box_cxcywh_to_xyxy

    boxes_embed = None
    n_boxes, bs = boxes.shape[:2]

    if self.boxes_direct_project is not None:
        boxes_embed = self.boxes_direct_project(boxes)

    if self.boxes_pool_project is not None:
        H, W = img_feats.shape[-2:]
        boxes_xyxy = box_cxcywh_to_xyxy(boxes)
        scale = torch.tensor([W, H, W, H], dtype=boxes_xyxy.dtype, device=boxes_xyxy.device)
        boxes_xyxy = boxes_xyxy * scale.view(1, 1, 4)
        per_image = boxes_xyxy.float().transpose(0, 1)  # bs, n_boxes, 4
        batch_index = (
            torch.arange(bs, device=per_image.device, dtype=per_image.dtype)
            .view(bs, 1, 1)
            .expand(bs, n_boxes, 1)
        )
        rois = torch.cat([batch_index, per_image], dim=2).reshape(-1, 5)
        sampled = torchvision.ops.roi_align(img_feats, rois, self.roi_size)
        torch._check(sampled.shape[0] == bs * n_boxes)
        proj = self.boxes_pool_project(sampled)
        proj = proj.view(bs, n_boxes, self.d_model).transpose(0, 1)
        boxes_embed = proj if boxes_embed is None else boxes_embed + proj

    if self.boxes_pos_enc_project is not None:
        cx, cy, w, h = boxes.unbind(-1)
        enc = self.pos_enc.encode_boxes(cx.flatten(), cy.flatten(), w.flatten(), h.flatten())
        enc = enc.view(boxes.shape[0], boxes.shape[1], enc.shape[-1])
        proj = self.boxes_pos_enc_project(enc)
        boxes_embed = proj if boxes_embed is None else boxes_embed + proj

    type_embed = self.label_embed(boxes_labels.long())
    return type_embed + boxes_embed, boxes_mask


BATCHED_ROI_ALIGN = Patch(
    name="geometry_encoders.batched_roi_align",
    target="sam3.model.geometry_encoders.SequenceGeometryEncoder._encode_boxes",
    why=(
        "(1) 'scale.pin_memory().to(non_blocking=True)' fails without CUDA ('Found no "
        "NVIDIA driver') and is an unsafe host copy under export; (2) silent "
        "specialization: roi_align(feats, boxes.unbind(0)) builds a Python list whose "
        "length is batch*num_prompts, baking it into 13 hidden runtime asserts"
    ),
    when="every torch.export with dynamic batch or prompts; eager on machines without CUDA",
    fingerprint="13633505c229beaa",
    wrapper=lambda wrapped, instance, args, kwargs: _encode_boxes(instance, *args, **kwargs),
    needed=always,
    replaces=True,
    rationale="the list is built inside the function body before roi_align is called",
    fixed_upstream=lambda src: "pin_memory" not in src and ".unbind(0)" not in src,
)


def _concat_after_empty(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Upstream unchanged, except when ``seq1`` has a static length of 0 and no index is asked.

    Then upstream scatters ``seq2`` into a fresh zero ``(L2, bs, C)`` buffer at rows
    ``arange(L2) + 0``, i.e. returns a contiguous copy of ``seq2``, with the mask
    ``arange(L2) >= (~mask2).sum(-1)``; exactly those are built here without touching
    ``seq1``/``mask1``, so the empty point and box encodings upstream feeds in become dead
    code and leave the traced graph.
    """
    from sam3.model.geometry_encoders import is_right_padded

    def bind(seq1: Any, mask1: Any, seq2: Any, mask2: Any, return_index: bool = False) -> tuple:
        return seq1, mask1, seq2, mask2, return_index

    seq1, mask1, seq2, mask2, return_index = bind(*args, **kwargs)
    empty = isinstance(seq1.shape[0], int) and seq1.shape[0] == 0
    if return_index or not empty:
        return wrapped(*args, **kwargs)
    seq2_length, batch_size, hidden_size = seq2.shape
    # upstream's shape assertions, as checks that keep symbolic sizes symbolic
    torch._check(seq1.size(1) == batch_size and seq1.size(2) == hidden_size)
    torch._check(mask1.size(0) == batch_size and mask1.size(1) == 0)
    torch._check(mask2.size(0) == batch_size and mask2.size(1) == seq2_length)
    torch._assert_async(is_right_padded(mask2))
    lengths = (~mask2).sum(dim=-1)
    mask = torch.arange(seq2_length, device=seq2.device)[None].repeat(batch_size, 1) >= lengths[:, None]
    return seq2.clone(memory_format=torch.contiguous_format), mask


EMPTY_FIRST_SEQUENCE = Patch(
    name="geometry_encoders.empty_first_sequence",
    target="sam3.model.geometry_encoders.concat_padded_sequences",
    why=(
        "text-only grounding passes an empty point (0, B*P, 2) and box (0, B*P, 4) prompt; their "
        "encodings (grid_sample / roi_align / sin-cos of 0 elements) enter concat_padded_sequences "
        "as seq1 and leave zero-size Reshape/Expand nodes in the ONNX graph, which the onnxscript "
        "optimizer turns into Reshape(allowzero=1, [0, -1, 32]); onnxruntime then refuses the "
        "model: 'Invalid Target shape product of 0. Product cannot be 0 in combination with -1'"
    ),
    when=(
        "export to ONNX (torch.onnx.export dynamo=True with the optimizer); bitwise-neutral in "
        "eager, but it removes nodes from a .pt2 graph, so only the ONNX export applies it"
    ),
    fingerprint="4c5c6626d54b2f3c",
    wrapper=_concat_after_empty,
    needed=for_onnx_export,
    replaces=True,
    rationale="the empty seq1 is consumed by the body's zeros/scatter, which the copy must not touch",
    fixed_upstream=lambda src: "seq1_length == 0" in src,
)
