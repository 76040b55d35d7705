"""Patches for ``sam3/model/geometry_encoders.py`` (``SequenceGeometryEncoder``)."""

from __future__ import annotations

from typing import Any

import torch
import torchvision

from ..engine import Patch
from ..when import always


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
