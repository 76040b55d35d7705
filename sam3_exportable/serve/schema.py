"""The answers of the HTTP API as pydantic models, for the OpenAPI document at ``/docs``
(they document; the handlers build the JSON themselves, :mod:`.protocol` checks requests)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = ["ERROR_RESPONSES", "SEGMENT_REQUEST_BODY", "ErrorAnswer", "ModelAnswer", "SegmentAnswer"]


class Rle(BaseModel):
    size: list[int] = Field(description="[height, width]")
    counts: str = Field(description="COCO compressed RLE (pycocotools)")


class InstanceAnswer(BaseModel):
    score: float
    box_xyxy: list[float] = Field(description="x0, y0, x1, y1 in the image's pixels")
    area: int = Field(description="mask pixels")
    rle: Rle | None = Field(None, description='absent with "masks": "none"')


class PromptBox(BaseModel):
    box: list[float]
    positive: bool


class PhraseAnswer(BaseModel):
    phrase: str = Field(description='the phrase ("visual" for boxes alone)')
    instances: list[InstanceAnswer]
    prompt_boxes: list[PromptBox] | None = Field(None, description="the exemplar boxes, when given")


class Timing(BaseModel):
    queue_ms: float = Field(description="from arrival to the start of its batch")
    graph_ms: float = Field(description="the graph calls and post-processing of its batch")
    batch_size: int = Field(description="requests that shared its graph calls")


class SegmentAnswer(BaseModel):
    width: int
    height: int
    phrases: list[PhraseAnswer] = Field(description="what `predict` writes in results.jsonl")
    timing: Timing


class ModelAnswer(BaseModel):
    manifest: dict[str, Any]
    staged: bool
    takes_boxes: bool
    settings: dict[str, Any]
    replica: dict[str, int] = Field(description="this replica's pid and peak RSS bytes")
    cache: dict[str, int] = Field(description="this replica's image-feature cache (staged artifacts)")


class ErrorDetail(BaseModel):
    field: str = Field(description='the request field at fault, or "body", "server", "authorization"')
    message: str


class ErrorAnswer(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorAnswer, "description": text}
    for code, text in (
        (400, "malformed body, base64 or image"),
        (401, "missing or wrong API key"),
        (413, "body over --max-body-bytes"),
        (415, "neither JSON nor multipart form data"),
        (422, "a field missing, mistyped or out of range"),
        (503, "still loading, or past --max-queued (see Retry-After)"),
    )
}

_BOX = {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 5}

SEGMENT_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["image", "prompts"],
                "properties": {
                    "image": {"type": "string", "description": "base64 of the image file"},
                    "prompts": {
                        "type": "array",
                        "items": {"type": ["string", "null"]},
                        "description": "phrases; null: boxes alone",
                    },
                    "threshold": {"type": "number", "default": 0.5, "minimum": 0, "maximum": 1},
                    "boxes": {
                        "type": "array",
                        "items": {"type": "array", "items": _BOX},
                        "description": "per prompt, its exemplar boxes [x0, y0, x1, y1(, label)]",
                    },
                    "masks": {"type": "string", "enum": ["rle", "none"], "default": "rle"},
                },
            }
        },
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image", "prompt"],
                "properties": {
                    "image": {"type": "string", "format": "binary"},
                    "prompt": {"type": "array", "items": {"type": "string"}},
                    "threshold": {"type": "number"},
                    "masks": {"type": "string", "enum": ["rle", "none"]},
                    "boxes": {"type": "string", "description": "the JSON list, as in the JSON body"},
                },
            }
        },
    },
}
