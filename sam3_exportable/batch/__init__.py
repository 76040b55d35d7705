"""Folders of images through an artifact in batches: streamed outputs, progress, resume, in
this process or on a Ray cluster. Nothing here imports ``sam3`` or the export side.

* :mod:`.api`: :func:`segment_images`, what ``sam3-exportable predict`` runs;
* :mod:`.inputs`: files, directories, glob patterns and list files to one sorted image list;
* :mod:`.job`: the job (:class:`Job`, ``run.json``) a resumed run must match;
* :mod:`.segment`: :class:`SegmentBatch`, one batch of images to encoded outputs (also the
  callable class for your own ``ray.data`` pipeline);
* :mod:`.engines`: where batches run (this process, or Ray workers);
* :mod:`.store`: the output directory (per-image files, ``results.jsonl``, ``errors.jsonl``);
* :mod:`.coco`: ``coco.json``; :mod:`.progress`: the progress bar or lines.
"""

from __future__ import annotations

from .api import DEFAULT_BATCH_SIZE, DEFAULT_MAX_PAIRS, BatchSummary, Failure, segment_images
from .inputs import expand_images, read_image_list
from .job import Job
from .segment import OUTPUT_COLUMNS, ImageOutcome, SegmentBatch

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_PAIRS",
    "OUTPUT_COLUMNS",
    "BatchSummary",
    "Failure",
    "ImageOutcome",
    "Job",
    "SegmentBatch",
    "expand_images",
    "read_image_list",
    "segment_images",
]
