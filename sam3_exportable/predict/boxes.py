"""Exemplar boxes: from a user's pixel boxes to the graph's box inputs (no torch).

A user gives each image-phrase pair a list of boxes in that image's pixels, each
``(x0, y0, x1, y1)`` (positive) or ``(x0, y0, x1, y1, label)`` with ``label`` True/1
(positive) or False/0 (negative). :func:`parse_box` validates one (finite, ``x1 > x0``,
``y1 > y0``, clipped to the image; a box with nothing inside the image is refused) and
:func:`box_inputs` builds the graph's ``boxes`` / ``box_labels`` / ``box_valid`` arrays
(:mod:`..contract`): normalised cx, cy, w, h as upstream's ``Sam3Processor.add_geometric_prompt``
takes them, right-padded to the longest list of the call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputSpecError

__all__ = [
    "VISUAL_PHRASE",
    "ExemplarBox",
    "box_inputs",
    "parse_box",
    "parse_pair_boxes",
    "parse_phrase_boxes",
]

#: The phrase upstream's processor grounds on when a prompt is boxes alone.
VISUAL_PHRASE = "visual"


@dataclasses.dataclass(frozen=True)
class ExemplarBox:
    """One exemplar box in image pixels (clipped to the image), and whether it is positive."""

    x0: float
    y0: float
    x1: float
    y1: float
    positive: bool = True

    def normalized_cxcywh(self, width: int, height: int) -> tuple[float, float, float, float]:
        """``(cx, cy, w, h)`` divided by the image's width and height (upstream's box prompt)."""
        return (
            (self.x0 + self.x1) / 2 / width,
            (self.y0 + self.y1) / 2 / height,
            (self.x1 - self.x0) / width,
            (self.y1 - self.y0) / height,
        )

    def to_json(self) -> dict[str, Any]:
        return {"box": [self.x0, self.y0, self.x1, self.y1], "positive": self.positive}


def _is_list(value: Any, *also: type) -> bool:
    """A sequence (or one of ``also``) that is not a string."""
    return isinstance(value, (Sequence, *also)) and not isinstance(value, (str, bytes))


def _label(value: Any, where: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return bool(value)
    raise InputSpecError(
        f"{where}: expected the label True/1 (positive) or False/0 (negative), got {value!r}"
    )


def parse_box(value: Any, width: int | None, height: int | None, where: str) -> ExemplarBox:
    """One user box in an image of ``width`` x ``height`` pixels, validated and clipped
    (``width`` and ``height`` None: validated only, before the image is read).

    ``value``: ``(x0, y0, x1, y1)``, ``(x0, y0, x1, y1, label)`` or an :class:`ExemplarBox`.
    Raises :class:`~..errors.InputSpecError` naming ``where`` for another shape, a value that
    is not a finite number, ``x1 <= x0`` or ``y1 <= y0``, or a box with no area inside the image.
    """
    if isinstance(value, ExemplarBox):
        value = (value.x0, value.y0, value.x1, value.y1, value.positive)
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, (Sequence, np.ndarray))
        or len(value) not in (4, 5)
    ):
        raise InputSpecError(f"{where}: expected (x0, y0, x1, y1) or (x0, y0, x1, y1, label), got {value!r}")
    coords: list[float] = []
    for name, v in zip(("x0", "y0", "x1", "y1"), value[:4], strict=True):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise InputSpecError(f"{where}: expected {name} a number, got {v!r}")
        if not math.isfinite(float(v)):
            raise InputSpecError(f"{where}: expected {name} finite, got {v!r}")
        coords.append(float(v))
    x0, y0, x1, y1 = coords
    if x1 <= x0 or y1 <= y0:
        raise InputSpecError(f"{where}: expected x1 > x0 and y1 > y0, got ({x0:g}, {y0:g}, {x1:g}, {y1:g})")
    positive = _label(value[4], where) if len(value) == 5 else True
    if width is None or height is None:
        return ExemplarBox(x0, y0, x1, y1, positive)
    cx0, cy0 = min(max(x0, 0.0), float(width)), min(max(y0, 0.0), float(height))
    cx1, cy1 = min(max(x1, 0.0), float(width)), min(max(y1, 0.0), float(height))
    if cx1 <= cx0 or cy1 <= cy0:
        raise InputSpecError(
            f"{where}: expected a box overlapping the {width}x{height} image, "
            f"got ({x0:g}, {y0:g}, {x1:g}, {y1:g})"
        )
    return ExemplarBox(cx0, cy0, cx1, cy1, positive)


def parse_phrase_boxes(
    row: Any, prompts: int, width: int | None, height: int | None, where: str
) -> list[list[ExemplarBox]]:
    """One image's boxes, one list per phrase (``None`` for none), validated with
    :func:`parse_box` (``width`` and ``height`` None: before the image is read). ``where``
    names ``row`` in messages. Raises :class:`~..errors.InputSpecError`."""
    if not _is_list(row) or len(row) != prompts:
        got = len(row) if _is_list(row) else repr(row)
        raise InputSpecError(f"{where}: expected one list of boxes per phrase ({prompts}), got {got}")
    parsed = []
    for j, pair in enumerate(row):
        pair = () if pair is None else pair
        if not _is_list(pair):
            raise InputSpecError(f"{where}[{j}]: expected a list of boxes, got {pair!r}")
        parsed.append([parse_box(b, width, height, f"{where}[{j}][{k}]") for k, b in enumerate(pair)])
    return parsed


def parse_pair_boxes(
    boxes: Any, sizes: Sequence[tuple[int, int]], prompts: int
) -> list[list[list[ExemplarBox]]]:
    """``boxes[i][j]`` (a list of boxes of image ``i`` and phrase ``j``) validated
    (:func:`parse_phrase_boxes`); ``sizes[i]`` is image ``i``'s ``(width, height)``. ``boxes``
    must have one row per image and one list per phrase. Raises
    :class:`~..errors.InputSpecError`."""
    if not _is_list(boxes) or len(boxes) != len(sizes):
        got = len(boxes) if _is_list(boxes) else repr(boxes)
        raise InputSpecError(f"boxes: expected one row per image ({len(sizes)}), got {got}")
    return [
        parse_phrase_boxes(row, prompts, width, height, f"boxes[{i}]")
        for i, (row, (width, height)) in enumerate(zip(boxes, sizes, strict=True))
    ]


def box_inputs(
    boxes: Sequence[Sequence[Sequence[ExemplarBox]]], sizes: Sequence[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The graph's ``(boxes [B, P, K, 4] float32, box_labels [B, P, K] int64, box_valid
    [B, P, K] bool)`` for ``boxes[i][j]`` of images of ``sizes[i] = (width, height)``; ``K`` is
    the longest list (at least 1), shorter lists are right-padded."""
    batch, prompts = len(boxes), len(boxes[0]) if boxes else 0
    slots = max([1, *(len(pair) for row in boxes for pair in row)])
    coords = np.zeros((batch, prompts, slots, 4), np.float32)
    labels = np.ones((batch, prompts, slots), np.int64)
    valid = np.zeros((batch, prompts, slots), np.bool_)
    for i, (row, (width, height)) in enumerate(zip(boxes, sizes, strict=True)):
        for j, pair in enumerate(row):
            for k, box in enumerate(pair):
                coords[i, j, k] = box.normalized_cxcywh(width, height)
                labels[i, j, k] = int(box.positive)
                valid[i, j, k] = True
    return coords, labels, valid
