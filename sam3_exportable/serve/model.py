"""The model deployment of the application (:class:`Sam3Model`): each replica holds one
:class:`.segmenter.Segmenter`, parses and checks the requests the ingress forwards, counts
those waiting, and packs what Ray Serve's batcher hands it into graph calls.

Its methods answer ``(status, JSON body, headers)``, never raise for a request: the ingress
(:mod:`.app`) only sends that on. A replica that dies mid-request surfaces at the ingress as
an exception of Ray's, which answers it in JSON.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import threading
import time
from typing import Any

from ray import serve

from ..allocator import apply_malloc_policy, peak_rss_bytes
from .options import ServeOptions
from .protocol import RequestError, parse_form, parse_json
from .segmenter import Answer, Segmenter

__all__ = ["Reply", "Sam3Model"]

_log = logging.getLogger(__name__)

#: What a model method answers: HTTP status, JSON body, headers.
Reply = tuple[int, dict[str, Any], dict[str, str]]


def _refusal(error: RequestError) -> Reply:
    return error.status, error.body(), error.headers


async def _form(content_type: str, body: bytes, max_fields: int) -> tuple[bytes | None, dict[str, list[str]]]:
    """A multipart body's ``image`` file part and text fields (Starlette's parser, at most
    ``max_fields`` of them; 400 when it does not parse, 422 for a file part other than
    ``image``)."""
    from starlette.requests import Request

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "headers": [(b"content-type", content_type.encode("latin-1"))]}
    image: bytes | None = None
    fields: dict[str, list[str]] = {}
    try:
        async with Request(scope, replay).form(max_files=1, max_fields=max_fields) as form:
            for name, value in form.multi_items():
                if isinstance(value, str):
                    fields.setdefault(name, []).append(value)
                elif name == "image":
                    image = await value.read()
                else:
                    raise RequestError(422, name, "expected a text field, got a file")
    except RequestError:
        raise
    except Exception as exc:  # Starlette's MultiPartException and the parser's errors
        raise RequestError(
            400, "body", f"expected multipart form data, got a malformed body ({exc})"
        ) from None
    return image, fields


@dataclasses.dataclass
class _Pending:
    checked: Any
    arrived: float
    taken: bool = False  # a batch has taken it: no longer waiting


@serve.deployment
class Sam3Model:
    """One replica: loads the artifact in a background thread (:meth:`status` says when),
    runs one batch at a time in a worker thread so that it keeps answering meanwhile."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = ServeOptions(**options)
        self.segment_batch.set_max_batch_size(self.options.max_batch_size)
        self.segment_batch.set_batch_wait_timeout_s(self.options.batch_wait_ms / 1000.0)
        self._segmenter: Segmenter | None = None
        self._load_error: str | None = None
        self._waiting = 0
        self._last_batch_s = 1.0
        # process-wide and only for memory allocated after it: before the artifact loads
        self._malloc = apply_malloc_policy(self.options.malloc)
        threading.Thread(target=self._load, name="sam3-load", daemon=True).start()

    def _load(self) -> None:
        try:
            self._segmenter = Segmenter(self.options)
        except Exception as exc:  # status names it; check_health has Ray Serve restart the replica
            _log.exception("loading %s failed", self.options.model)
            self._load_error = " ".join(f"{type(exc).__name__}: {exc}".split())

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose artifact failed to load is restarted."""
        if self._load_error is not None:
            raise RuntimeError(f"loading {self.options.model} failed: {self._load_error}")

    def status(self) -> dict[str, str | None]:
        """``{"status": "ready" | "loading" | "failed", "error": why it failed or None}``."""
        if self._segmenter is not None:
            return {"status": "ready", "error": None}
        return {"status": "failed" if self._load_error else "loading", "error": self._load_error}

    def _ready(self) -> Segmenter:
        if self._segmenter is not None:
            return self._segmenter
        what = f"failed to load: {self._load_error}" if self._load_error else "still loading"
        raise RequestError(503, "server", f"the model is {what}", {"Retry-After": "5"})

    def info(self) -> Reply:
        """``GET /v1/model``: the manifest's summary, this replica's settings, process (pid,
        peak RSS, the malloc policy it applied) and feature cache."""
        try:
            segmenter = self._ready()
        except RequestError as exc:
            return _refusal(exc)
        settings = {k: v for k, v in self.options.to_json().items() if k != "api_key_sha256"}
        cache = segmenter.predictor.cache
        body = {
            "manifest": segmenter.predictor.manifest.summary(),
            "staged": segmenter.predictor.artifact.has_stages,
            "takes_boxes": segmenter.predictor.artifact.takes_boxes,
            "settings": settings,
            "replica": {"pid": os.getpid(), "peak_rss_bytes": peak_rss_bytes(), "malloc": self._malloc},
            "cache": {
                "entries": len(cache),
                "bytes": cache.bytes,
                "max_bytes": cache.max_bytes,
                "hits": cache.hits,
                "misses": cache.misses,
            },
        }
        return 200, body, {}

    async def segment(self, content_type: str, body: bytes) -> Reply:
        """``POST /v1/segment`` of a body the ingress has read (within its size limit)."""
        arrived = time.monotonic()
        try:
            return await self._segment(content_type, body, arrived)
        except RequestError as exc:
            return _refusal(exc)

    async def _segment(self, content_type: str, body: bytes, arrived: float) -> Reply:
        segmenter = self._ready()
        if self._waiting >= self.options.max_queued:
            raise RequestError(
                503,
                "server",
                f"{self._waiting} requests are waiting (--max-queued {self.options.max_queued})",
                {"Retry-After": str(max(1, math.ceil(self._last_batch_s)))},
            )
        pending = _Pending(None, arrived)
        self._waiting += 1  # counted from here: no await between the check and this line
        try:
            limits = {k: getattr(self.options, k) for k in ("max_pixels", "max_prompts", "max_boxes")}
            kind = content_type.split(";")[0].strip().lower()
            if kind == "multipart/form-data":
                # every prompt a field, and threshold, masks, boxes: more is refused unparsed
                image, fields = await _form(content_type, body, self.options.max_prompts + 3)
                parsed = await asyncio.to_thread(parse_form, image, fields, **limits)
            elif kind in ("application/json", ""):
                parsed = await asyncio.to_thread(parse_json, body, **limits)
            else:
                raise RequestError(
                    415, "content-type", f"expected application/json or multipart/form-data, got {kind}"
                )
            pending.checked = segmenter.check(parsed)
            answer, started = await self.segment_batch(pending)
        finally:
            if not pending.taken:  # refused, or cancelled while waiting
                self._waiting -= 1
        if isinstance(answer, RequestError):
            raise answer
        timing = {
            "queue_ms": round((started - arrived) * 1000.0, 3),
            "graph_ms": round(answer.graph_ms, 3),
            "batch_size": answer.batch_size,
        }
        return (
            200,
            {"width": answer.width, "height": answer.height, "phrases": answer.phrases, "timing": timing},
            {},
        )

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def segment_batch(self, items: list[_Pending]) -> list[tuple[Answer | RequestError, float]]:
        """Ray Serve's batch of waiting requests, run as one :meth:`.segmenter.Segmenter.run`."""
        for item in items:
            item.taken = True
        self._waiting -= len(items)
        started = time.monotonic()
        segmenter = self._ready()
        answers = await asyncio.to_thread(segmenter.run, [item.checked for item in items])
        self._last_batch_s = time.monotonic() - started
        return [(answer, started) for answer in answers]
