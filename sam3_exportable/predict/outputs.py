"""Writing prediction results: ``results.json`` (COCO RLE masks), mask PNGs, overlays."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .predictor import PairResult

__all__ = ["PALETTE", "encode_rle", "write_results"]

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


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE (pycocotools) of a boolean ``(H, W)`` mask, JSON-ready."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40] or "phrase"


def _label_png(result: PairResult, height: int, width: int) -> Image.Image:
    """Instance-label image: 0 is background, k is the k-th kept instance (by score order
    of the model's queries); 8-bit below 256 instances, else 16-bit."""
    count = result.scores.shape[0]
    labels = np.zeros((height, width), dtype=np.uint16 if count > 255 else np.uint8)
    for k in range(count):
        labels[result.masks[k, 0].numpy()] = k + 1
    return Image.fromarray(labels)


def _overlay(image: Image.Image, row: Sequence[PairResult], phrases: Sequence[str]) -> Image.Image:
    base = image.convert("RGB")
    colour_layer = np.asarray(base, dtype=np.float32).copy()
    for j, result in enumerate(row):
        colour = np.array(PALETTE[j % len(PALETTE)], dtype=np.float32)
        for k in range(result.scores.shape[0]):
            m = result.masks[k, 0].numpy()
            colour_layer[m] = 0.55 * colour_layer[m] + 0.45 * colour
    out = Image.fromarray(np.clip(colour_layer, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    line = max(2, min(out.size) // 300)
    for j, result in enumerate(row):
        colour = PALETTE[j % len(PALETTE)]
        for k in range(result.scores.shape[0]):
            x0, y0, x1, y1 = (float(v) for v in result.boxes[k])
            draw.rectangle([x0, y0, x1, y1], outline=colour, width=line)
            label = f"{phrases[j]} {float(result.scores[k]):.2f}"
            tx, ty = x0 + line, max(0.0, y0 - 12)
            bbox = draw.textbbox((tx, ty), label, font=font)
            draw.rectangle(bbox, fill=colour)
            draw.text((tx, ty), label, fill=(255, 255, 255), font=font)
    return out


def write_results(
    out_dir: Path,
    image_paths: Sequence[Path],
    images: Sequence[Image.Image],
    phrases: Sequence[str],
    results: Sequence[Sequence[PairResult]],
    *,
    threshold: float,
    model: dict[str, Any],
) -> dict[str, Any]:
    """Write everything into ``out_dir`` (which must exist and be empty); return the JSON."""
    doc: dict[str, Any] = {
        "model": model,
        "threshold": threshold,
        "phrases": list(phrases),
        "images": [],
    }
    for i, (path, image, row) in enumerate(zip(image_paths, images, results, strict=True)):
        stem = f"{i:02d}_{_slug(Path(path).stem)}"
        overlay_name = f"{stem}_overlay.png"
        _overlay(image, row, phrases).save(out_dir / overlay_name)
        entry: dict[str, Any] = {
            "path": str(path),
            "width": image.width,
            "height": image.height,
            "overlay": overlay_name,
            "phrases": [],
        }
        for j, (phrase, result) in enumerate(zip(phrases, row, strict=True)):
            mask_name = f"{stem}__{j:02d}_{_slug(phrase)}.png"
            _label_png(result, image.height, image.width).save(out_dir / mask_name)
            entry["phrases"].append(
                {
                    "phrase": phrase,
                    "mask_png": mask_name,
                    "instances": [
                        {
                            "score": inst.score,
                            "box_xyxy": list(inst.box),
                            "area": int(inst.mask.sum()),
                            "rle": encode_rle(inst.mask),
                        }
                        for inst in result.instances()
                    ],
                }
            )
        doc["images"].append(entry)
    (out_dir / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def replace_dir_atomically(staging: Path, out: Path, *, force: bool) -> None:
    """Move a fully written ``staging`` directory to ``out``; an existing ``out`` is replaced
    only with ``force`` (and only after the new one is complete)."""
    import os
    import shutil
    import tempfile

    if out.exists():
        if not force:
            raise FileExistsError(f"--out {out}: exists; pass --force to overwrite")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        try:
            os.replace(out, old / out.name)
            os.replace(staging, out)
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)
