"""The HTTP contract of ``POST /v1/segment``: a request body to a :class:`SegmentRequest`,
an error to its status and JSON body (:class:`RequestError`).

A request is JSON ``{"image": <base64 of the image file>, "prompts": [str | null, ...],
"threshold": 0.5, "boxes": [[box, ...] per prompt], "masks": "rle" | "none"}``, or
``multipart/form-data`` with an ``image`` file part and ``prompt`` fields (``threshold`` and
``masks`` fields as in JSON; ``boxes`` a field holding the JSON list). A box is
``[x0, y0, x1, y1]`` or ``[x0, y0, x1, y1, label]`` in the image's pixels (label 1 / true
positive, 0 / false negative); a prompt of null means boxes alone. The server never fetches
a URL: the image comes in the body.

Status codes: 400 a body that is not JSON or form data, base64 that does not decode, an image
that does not decode; 422 a missing or mistyped field, a value out of range (threshold,
pixels, prompts, boxes, a phrase with no token). Every error body is
``{"error": {"field": <the request's field, or "body">, "message": <one line>}}``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from ..errors import ImageTooLargeError, InputSpecError
from ..predict.images import to_rgb

__all__ = ["MASK_MODES", "RequestError", "SegmentRequest", "parse_form", "parse_json"]

#: Values of the request's ``masks`` field: each instance's COCO RLE, or none.
MASK_MODES = ("rle", "none")

_FIELDS = {"image", "prompts", "threshold", "boxes", "masks"}


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, the request ``field`` at fault and a
    one-line ``message``; ``headers`` go with the answer (``Retry-After`` for 503)."""

    def __init__(self, status: int, field: str, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(f"{field}: {message}")
        self.status = status
        self.field = field
        self.message = " ".join(message.split())
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body of the answer."""
        return {"error": {"field": self.field, "message": self.message}}

    @classmethod
    def of(cls, exc: InputSpecError, status: int = 422) -> RequestError:
        """An :class:`~..errors.InputSpecError` (``"<field>: <message>"``) as a request error."""
        text = str(exc)
        field, _, message = text.partition(": ")
        return cls(status, field.strip() or "body", message or text)


@dataclasses.dataclass
class SegmentRequest:
    """One validated request: the decoded 8-bit RGB ``image``, its ``prompts`` (None: boxes
    alone), ``threshold``, ``boxes`` (one list per prompt, as given; None without), whether
    instances carry their RLE (``rle``)."""

    image: Image.Image
    prompts: tuple[str | None, ...]
    threshold: float
    boxes: list[Any] | None
    rle: bool

    def group_key(self) -> tuple[Any, ...]:
        """Requests with equal keys share a graph call: the same prompts and threshold, all
        with boxes or all without."""
        return (self.prompts, self.threshold, self.boxes is not None)


def parse_json(body: bytes, *, max_pixels: int, max_prompts: int, max_boxes: int) -> SegmentRequest:
    """A JSON request body (see the module docstring). Raises :class:`RequestError`."""
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, "body", f"expected a JSON object, got malformed JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise RequestError(422, "body", f"expected a JSON object, got {type(fields).__name__}")
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise RequestError(422, unknown[0], f"expected one of {sorted(_FIELDS)}, got an unknown field")
    if not isinstance(fields.get("image"), str):
        raise RequestError(422, "image", f"expected a base64 string, got {_kind(fields.get('image'))}")
    try:
        data = base64.b64decode(fields["image"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(
            400, "image", f"expected base64 of an image file, got undecodable base64 ({exc})"
        ) from None
    return _request(data, fields, max_pixels=max_pixels, max_prompts=max_prompts, max_boxes=max_boxes)


def parse_form(
    image: bytes | None,
    fields: Mapping[str, Sequence[str]],
    *,
    max_pixels: int,
    max_prompts: int,
    max_boxes: int,
) -> SegmentRequest:
    """A multipart request: the ``image`` part's bytes and every text field's values by name
    (``prompt`` repeated; ``threshold``, ``masks``, ``boxes`` once). Raises
    :class:`RequestError`."""
    unknown = sorted(set(fields) - {"prompt", "threshold", "masks", "boxes"})
    if unknown:
        raise RequestError(
            422, unknown[0], "expected image, prompt, threshold, masks or boxes, got an unknown field"
        )
    if image is None:
        raise RequestError(422, "image", "expected an image file part, got none")
    values: dict[str, Any] = {"prompts": list(fields.get("prompt", []))}
    for name in ("threshold", "masks", "boxes"):
        given = fields.get(name, [])
        if len(given) > 1:
            raise RequestError(422, name, f"expected one value, got {len(given)}")
        if given:
            values[name] = given[0]
    if "threshold" in values:
        try:
            values["threshold"] = float(values["threshold"])
        except ValueError:
            raise RequestError(422, "threshold", f"expected a number, got {values['threshold']!r}") from None
    if "boxes" in values:
        try:
            values["boxes"] = json.loads(values["boxes"])
        except json.JSONDecodeError as exc:
            raise RequestError(400, "boxes", f"expected a JSON list, got malformed JSON ({exc})") from None
    return _request(image, values, max_pixels=max_pixels, max_prompts=max_prompts, max_boxes=max_boxes)


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _request(
    data: bytes, fields: Mapping[str, Any], *, max_pixels: int, max_prompts: int, max_boxes: int
) -> SegmentRequest:
    prompts = fields.get("prompts")
    if not isinstance(prompts, list) or not prompts:
        got = "an empty list" if isinstance(prompts, list) else _kind(prompts)
        raise RequestError(422, "prompts", f"expected a non-empty list of phrases, got {got}")
    if len(prompts) > max_prompts:
        raise RequestError(422, "prompts", f"expected at most {max_prompts} prompts, got {len(prompts)}")
    for j, phrase in enumerate(prompts):
        if phrase is not None and (not isinstance(phrase, str) or not phrase.strip()):
            raise RequestError(422, f"prompts[{j}]", f"expected a non-empty phrase or null, got {phrase!r}")
    threshold = fields.get("threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise RequestError(422, "threshold", f"expected a number in [0, 1], got {threshold!r}")
    masks = fields.get("masks", "rle")
    if masks not in MASK_MODES:
        raise RequestError(422, "masks", f"expected one of {list(MASK_MODES)}, got {masks!r}")
    boxes = fields.get("boxes")
    if boxes is not None:
        if not isinstance(boxes, list) or len(boxes) != len(prompts):
            got = f"{len(boxes)} lists" if isinstance(boxes, list) else _kind(boxes)
            raise RequestError(
                422, "boxes", f"expected one list of boxes per prompt ({len(prompts)}), got {got}"
            )
        count = sum(len(row) for row in boxes if isinstance(row, list))
        if count > max_boxes:
            raise RequestError(422, "boxes", f"expected at most {max_boxes} boxes, got {count}")
    if None in prompts and boxes is None:
        raise RequestError(422, "prompts", "expected a phrase, got null (boxes alone) without boxes")
    try:
        image = to_rgb(data, max_pixels=max_pixels)
    except InputSpecError as exc:  # a value out of range (422) or bytes that are no image (400)
        status = 422 if isinstance(exc, ImageTooLargeError) else 400
        raise RequestError(status, "image", str(exc).partition(": ")[2] or str(exc)) from None
    return SegmentRequest(
        image=image,
        prompts=tuple(prompts),
        threshold=float(threshold),
        boxes=boxes,
        rle=masks == "rle",
    )
