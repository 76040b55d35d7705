"""What a ``sam3-exportable serve`` deployment is told (:class:`ServeOptions`): the artifact,
where it listens, how requests are batched and what a request may hold.

A plain frozen dataclass of JSON values, so Ray Serve can hand it to every replica (and a
Serve config file can state it); the API key travels only as its SHA-256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

from ..allocator import MALLOC_POLICIES
from ..errors import InputSpecError
from ..predict.cache import DEFAULT_CACHE_BYTES
from ..predict.images import DEFAULT_MAX_PIXELS
from ..predict.predictor import DEFAULT_MAX_PAIRS

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ServeOptions", "read_api_key"]

#: Largest request body accepted (413 above): a 4096x4096 PNG, base64-encoded, fits.
DEFAULT_MAX_BODY_BYTES = 64 * 2**20


#: Requests beyond a replica's batch and queue that Ray Serve still hands it, to be refused.
ONGOING_HEADROOM = 64


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """One deployment's settings.

    ``model``: the artifact path (any kind; opened by each replica). ``threads``: intra-op
    threads per replica (results are bitwise ``predict``'s at the same ``--threads``).
    ``max_batch_size`` requests at most are taken into one batch, waiting at most
    ``batch_wait_ms`` for company; a graph call holds at most ``max_pairs`` image-phrase
    pairs (``predict``'s ``--max-pairs``). ``max_queued``: requests waiting for a batch in
    one replica beyond which a new one gets 503. ``max_body_bytes``, ``max_pixels``,
    ``max_prompts``, ``max_boxes``: what one request may carry. ``cache_bytes``: the image
    feature cache of a staged artifact (0: none). ``malloc``: the malloc policy each replica
    applies to its own process before it loads the artifact
    (:func:`~..allocator.apply_malloc_policy`). ``api_key_sha256``: hex SHA-256 of the key
    every ``/v1`` request must bear (None: no key).
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    threads: int = 1
    max_batch_size: int = 8
    batch_wait_ms: float = 10.0
    max_pairs: int = DEFAULT_MAX_PAIRS
    max_queued: int = 64
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_prompts: int = 16
    max_boxes: int = 64
    cache_bytes: int = DEFAULT_CACHE_BYTES
    malloc: str = "retain"
    api_key_sha256: str | None = None

    def __post_init__(self) -> None:
        positive = ("port", "replicas", "threads", "max_batch_size", "max_pairs", "max_body_bytes")
        positive += ("max_pixels", "max_prompts", "max_boxes")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputSpecError(f"{_flag(name)}: expected a positive integer, got {value!r}")
        for name in ("max_queued", "cache_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputSpecError(f"{_flag(name)}: expected an integer >= 0, got {value!r}")
        if not 0 <= self.batch_wait_ms <= 60_000:
            raise InputSpecError(f"--batch-wait-ms: expected 0 to 60000, got {self.batch_wait_ms!r}")
        if self.malloc not in MALLOC_POLICIES:
            choices = ", ".join(MALLOC_POLICIES)
            raise InputSpecError(f"--malloc: expected one of {choices}, got {self.malloc!r}")
        if self.port > 65535:
            raise InputSpecError(f"--port: expected at most 65535, got {self.port}")

    @property
    def max_ongoing(self) -> int:
        """Requests Ray Serve hands one replica at once (its ``max_ongoing_requests``): a
        running batch, ``max_queued`` waiting, and room for those the replica refuses with
        503 at once (past it, Ray's router holds requests back instead)."""
        return self.max_batch_size + self.max_queued + ONGOING_HEADROOM

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def read_api_key(path: str | os.PathLike[str]) -> str:
    """The hex SHA-256 of the key in ``path`` (its first line, whitespace stripped).

    Raises ``FileNotFoundError`` for a missing file and :class:`~..errors.InputSpecError`
    for an empty key.
    """
    text = Path(path).read_text(encoding="utf-8")
    key = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not key:
        raise InputSpecError(f"--api-key-file {path}: expected a key on its first line, got an empty file")
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
