"""One image's results as bytes: COCO RLE per instance, an instance-label PNG per phrase, the
overlay PNG (:func:`encode_image`).

Memory stays bounded for large images: each instance's mask is upsampled once, used for its
RLE, its label pixels and its overlay pixels, and dropped before the next one
(:meth:`.predictor.KeptPair.instances`); the overlay blends only the masked pixels of one
8-bit copy of the image, never a float copy of the whole image.
"""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .images import rgb_array
from .predictor import KeptPair

__all__ = ["PALETTE", "EncodedImage", "encode_image", "encode_rle", "png_bytes", "slug"]

#: One colour per phrase (RGB), cycled.
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
]

#: Weight of the phrase colour where a mask covers a pixel of the overlay.
OVERLAY_ALPHA = 0.45


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE (pycocotools) of a boolean ``(H, W)`` mask, JSON-ready:
    ``{"size": [H, W], "counts": str}``."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def slug(text: str) -> str:
    """``text`` as a short file-name part: ASCII letters and digits joined by ``-``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40] or "x"


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclasses.dataclass
class EncodedImage:
    """Everything written for one image.

    ``phrases[j]`` is ``{"phrase": str, "instances": [{"score": float, "box_xyxy": [4 floats],
    "area": int, "rle": {"size", "counts"}}]}`` in the order the model's queries kept them
    (with ``"prompt_boxes": [{"box": [x0, y0, x1, y1], "positive": bool}]`` when the phrase
    was prompted with exemplar boxes);
    ``mask_pngs[j]`` the instance-label PNG of phrase ``j`` (``0`` background, ``k`` the
    ``k``-th instance; 8-bit, 16-bit above 255 instances), empty when masks were not asked
    for; ``overlay_png`` the overlay, None when not asked for.
    """

    width: int
    height: int
    phrases: list[dict[str, Any]]
    mask_pngs: list[bytes]
    overlay_png: bytes | None


def _blend(canvas: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Blend ``colour`` into the pixels of ``canvas`` (uint8 ``[H, W, 3]``) under ``mask``."""
    where = np.nonzero(mask)
    pixels = canvas[where].astype(np.float32)
    pixels *= 1.0 - OVERLAY_ALPHA
    pixels += OVERLAY_ALPHA * np.asarray(colour, dtype=np.float32)
    canvas[where] = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _draw_boxes(
    overlay: Image.Image, boxes: Sequence[tuple[int, tuple[float, ...], float]], phrases: Sequence[str]
) -> None:
    """Boxes and ``phrase score`` labels, each in its phrase's colour, ``(phrase index, box,
    score)`` per instance."""
    draw = ImageDraw.Draw(overlay)
    font = ImageFont.load_default()
    line = max(2, min(overlay.size) // 300)
    for j, (x0, y0, x1, y1), score in boxes:
        colour = PALETTE[j % len(PALETTE)]
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=line)
        label = f"{phrases[j]} {score:.2f}"
        tx, ty = x0 + line, max(0.0, y0 - 12)
        draw.rectangle(draw.textbbox((tx, ty), label, font=font), fill=colour)
        draw.text((tx, ty), label, fill=(255, 255, 255), font=font)


def encode_image(
    image: Image.Image,
    phrases: Sequence[str],
    pairs: Sequence[KeptPair],
    *,
    masks: bool = True,
    overlay: bool = True,
    prompt_boxes: Sequence[Sequence[Any]] | None = None,
) -> EncodedImage:
    """Encode ``pairs[j]`` (what phrase ``j`` kept on the RGB ``image``) as :class:`EncodedImage`.

    ``prompt_boxes[j]``: the exemplar boxes phrase ``j`` was prompted with
    (:class:`~.boxes.ExemplarBox`), recorded as ``"prompt_boxes"`` of its entry.

    Raises ``ValueError`` when ``pairs`` and ``phrases`` differ in length or a pair was
    post-processed for another image size.
    """
    if len(pairs) != len(phrases):
        raise ValueError(f"pairs: expected one per phrase ({len(phrases)}), got {len(pairs)}")
    width, height = image.size
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    # the overlay's pixels, copied at the first kept instance: without one it is the image
    canvas: np.ndarray | None = None
    records: list[dict[str, Any]] = []
    mask_pngs: list[bytes] = []
    boxes: list[tuple[int, tuple[float, ...], float]] = []
    for j, (phrase, pair) in enumerate(zip(phrases, pairs, strict=True)):
        if (pair.height, pair.width) != (height, width):
            raise ValueError(
                f"pairs[{j}]: expected masks for a {width}x{height} image, got {pair.width}x{pair.height}"
            )
        labels = (
            np.zeros((height, width), dtype=np.uint16 if len(pair) > 255 else np.uint8) if masks else None
        )
        instances = []
        for k, inst in enumerate(pair.instances()):
            instances.append(
                {
                    "score": inst.score,
                    "box_xyxy": list(inst.box),
                    "area": int(inst.mask.sum()),
                    "rle": encode_rle(inst.mask),
                }
            )
            if labels is not None:
                labels[inst.mask] = k + 1
            if overlay:
                if canvas is None:
                    canvas = rgb_array(rgb)
                _blend(canvas, inst.mask, PALETTE[j % len(PALETTE)])
                boxes.append((j, inst.box, inst.score))
        record: dict[str, Any] = {"phrase": phrase, "instances": instances}
        if prompt_boxes is not None:
            record["prompt_boxes"] = [box.to_json() for box in prompt_boxes[j]]
        records.append(record)
        if labels is not None:
            mask_pngs.append(png_bytes(Image.fromarray(labels)))
            del labels
    overlay_png = None
    if canvas is not None:
        drawn = Image.fromarray(canvas)
        del canvas
        _draw_boxes(drawn, boxes, phrases)
        overlay_png = png_bytes(drawn)
    elif overlay:
        overlay_png = png_bytes(rgb)
    return EncodedImage(
        width=width, height=height, phrases=records, mask_pngs=mask_pngs, overlay_png=overlay_png
    )
