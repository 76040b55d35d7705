"""``coco.json``: a job's results in COCO's format (what ``pycocotools.coco.COCO`` loads).

* ``images``: ``{"id", "file_name", "width", "height"}`` per segmented image, ``id`` its index
  in the job plus one, ``file_name`` its path; with exemplar boxes also ``"prompt_boxes"``,
  per phrase the boxes it was prompted with (``{"box": [x0, y0, x1, y1], "positive"}``);
* ``categories``: ``{"id", "name"}`` per phrase, ``id`` its position plus one;
* ``annotations``: per kept instance ``{"id", "image_id", "category_id", "segmentation"
  (COCO RLE), "area" (mask pixels), "bbox" ([x, y, width, height] of the box), "score",
  "iscrowd": 0}``, in job order, ``id`` counting from one.

It is streamed from the job's records (never all held at once) into a temporary file and
moved into place (:func:`~..artifact.files.atomic_write`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ..artifact.files import atomic_write

__all__ = ["write_coco"]


def write_coco(
    target: Path, phrases: Sequence[str], records: Callable[[], Iterable[dict[str, Any]]]
) -> dict[str, int]:
    """Write ``target`` from ``records()`` (called twice; each call yields the
    ``results.jsonl`` records of :mod:`.store` in job order). Returns ``{"images",
    "annotations"}`` counts."""
    categories = [{"id": j + 1, "name": phrase, "supercategory": ""} for j, phrase in enumerate(phrases)]
    counts = {"images": 0, "annotations": 0}
    with atomic_write(target, force=True) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write('{"info": {"description": "sam3-exportable predict"}, "licenses": [], ')
        fh.write(f'"categories": {json.dumps(categories)}, "images": [')
        for record in records():
            image = {
                "id": record["index"] + 1,
                "file_name": record["path"],
                "width": record["width"],
                "height": record["height"],
            }
            if any("prompt_boxes" in phrase for phrase in record["phrases"]):
                image["prompt_boxes"] = [phrase.get("prompt_boxes", []) for phrase in record["phrases"]]
            fh.write((", " if counts["images"] else "") + json.dumps(image))
            counts["images"] += 1
        fh.write('], "annotations": [')
        for record in records():
            for j, phrase in enumerate(record["phrases"]):
                for instance in phrase["instances"]:
                    x0, y0, x1, y1 = instance["box_xyxy"]
                    annotation = {
                        "id": counts["annotations"] + 1,
                        "image_id": record["index"] + 1,
                        "category_id": j + 1,
                        "segmentation": instance["rle"],
                        "area": instance["area"],
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": instance["score"],
                        "iscrowd": 0,
                    }
                    fh.write((", " if counts["annotations"] else "") + json.dumps(annotation))
                    counts["annotations"] += 1
        fh.write("]}\n")
    return counts
