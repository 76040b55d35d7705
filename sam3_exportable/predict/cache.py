"""The image-feature cache of a staged artifact: :class:`FeatureCache`.

A later prompt on an image already seen runs only the ``ground`` stage: the features
``encode_images`` returned for it are kept, least recently used first out, within a byte
budget. Keys are :func:`pixels_key` of the preprocessed pixels, so only the very same
``images`` input (same pixels, same batch) hits. Nothing here imports torch.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputSpecError
from ..verify import to_numpy

__all__ = ["DEFAULT_CACHE_BYTES", "FeatureCache", "pixels_key"]

#: The feature budget of a :class:`~.predictor.Predictor` unless told otherwise: four
#: full-size images (about 116 MB of features each).
DEFAULT_CACHE_BYTES = 512 * 2**20


def pixels_key(pixels: Any) -> str:
    """sha256 of ``pixels`` (the graph's ``images`` input: shape, dtype and bytes)."""
    array = np.ascontiguousarray(to_numpy(pixels))
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _nbytes(features: Sequence[Any]) -> int:
    return sum(int(f.nbytes) for f in features)


class FeatureCache:
    """Least-recently-used features by key, at most ``max_bytes`` in all (thread-safe).

    ``max_bytes=0`` keeps nothing; features larger than the budget are not kept (the call
    that made them still uses them). Raises :class:`~..errors.InputSpecError` for a negative
    budget. ``hits`` and ``misses`` count :meth:`get` calls.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise InputSpecError(f"cache_bytes: expected a byte count >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[str, tuple[tuple[Any, ...], int]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> tuple[Any, ...] | None:
        """The features stored under ``key`` (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: str, features: Sequence[Any]) -> bool:
        """Keep ``features`` under ``key``, dropping the least recently used entries to fit;
        returns whether they were kept (not when larger than the whole budget)."""
        size = _nbytes(features)
        with self._lock:
            if key in self._entries:
                self.bytes -= self._entries.pop(key)[1]
            if size > self.max_bytes:
                return False
            while self.bytes + size > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.bytes -= dropped
            self._entries[key] = (tuple(features), size)
            self.bytes += size
            return True

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def __repr__(self) -> str:
        return (
            f"FeatureCache({len(self)} entries, {self.bytes:,} of {self.max_bytes:,} bytes, "
            f"{self.hits} hits, {self.misses} misses)"
        )
