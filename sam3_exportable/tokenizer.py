"""Upstream's text tokenizer without importing ``sam3``: phrases to ``token_ids [P, L]``.

Upstream's ``sam3.model.tokenizer_ve.SimpleTokenizer`` is OpenAI CLIP's BPE tokenizer as
``open_clip_torch`` ships it, with one difference in text cleaning: upstream collapses
whitespace with ``regex.sub(r"\\s+", " ", text)`` where open_clip splits on Python's
``str.split()`` (which also treats the ASCII separators U+001C-U+001F as whitespace).
:class:`Tokenizer` uses open_clip's implementation with upstream's cleaning rule, so the ids
are upstream's for every string (a test compares them on generated Unicode text). The BPE
vocabulary is open_clip's copy, byte-identical to upstream's (sha256
:data:`BPE_VOCAB_SHA256`), which the ``sam3`` wheel does not ship.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .errors import InputSpecError

__all__ = ["BPE_VOCAB_SHA256", "Tokenizer", "bpe_vocab_path", "validate_phrases"]

#: sha256 of upstream's ``assets/bpe_simple_vocab_16e6.txt.gz`` (open_clip ships the same bytes).
BPE_VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

#: How manifests name this tokenizer: upstream's class, whose ids :class:`Tokenizer` reproduces.
TOKENIZER_KIND = "sam3.model.tokenizer_ve.SimpleTokenizer"


@lru_cache(maxsize=1)
def bpe_vocab_path() -> str:
    """Path of the BPE vocab shipped by ``open_clip_torch`` (byte-identical to upstream's).

    Raises ``FileNotFoundError`` if open_clip_torch is not installed and ``ValueError`` if
    the file's sha256 is not upstream's.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "BPE vocab: the package open_clip_torch is not installed; "
            "pip install open_clip_torch (it ships bpe_simple_vocab_16e6.txt.gz)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"BPE vocab: expected {path}, which does not exist")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != BPE_VOCAB_SHA256:
        raise ValueError(
            f"BPE vocab {path}: expected sha256 {BPE_VOCAB_SHA256} (upstream's vocab), got {digest}"
        )
    return str(path)


def validate_phrases(phrases: Sequence[str] | str) -> list[str]:
    """Return ``phrases`` as a list; raise :class:`InputSpecError` for no phrase, a value that
    is not a string, or a blank one."""
    if isinstance(phrases, str):
        phrases = [phrases]
    phrases = list(phrases)
    if not phrases:
        raise InputSpecError("phrases: expected at least one text prompt, got none")
    for i, phrase in enumerate(phrases):
        if not isinstance(phrase, str) or not phrase.strip():
            raise InputSpecError(f"phrases[{i}]: expected a non-empty phrase, got {phrase!r}")
    return phrases


class Tokenizer:
    """Upstream's tokenizer: ``tokenizer(phrases) -> token_ids [P, context_length]`` int64.

    Each row is the start token, the phrase's BPE ids and the end token, zero-padded; a
    phrase longer than ``context_length`` is cut and its last kept id replaced by the end
    token (upstream's rule; :meth:`encode` tells the length before cutting). Raises
    :class:`InputSpecError` for an empty list, a blank phrase, or a phrase with no token
    left after upstream's cleaning (control characters only, for example), which upstream
    would run as an empty prompt.
    """

    def __init__(self, context_length: int) -> None:
        import open_clip.tokenizer as oc
        import regex

        if context_length < 3:
            raise ValueError(f"context_length: expected at least 3, got {context_length}")
        self.context_length = int(context_length)
        self._impl: Any = oc.SimpleTokenizer(bpe_path=bpe_vocab_path(), context_length=context_length)
        whitespace = regex.compile(r"\s+")
        # upstream's _clean_lower: regex \s (not str.split()) decides what collapses
        self._impl.clean_fn = lambda text: whitespace.sub(" ", oc.basic_clean(text)).strip().lower()
        self.start_id: int = int(self._impl.sot_token_id)
        self.end_id: int = int(self._impl.eot_token_id)
        self.vocab_size: int = int(self._impl.vocab_size)

    def encode(self, phrase: str) -> list[int]:
        """BPE ids of ``phrase`` without start/end tokens and without truncation."""
        return [int(i) for i in self._impl.encode(phrase)]

    def __call__(self, phrases: Sequence[str] | str) -> torch.Tensor:
        phrases = validate_phrases(phrases)
        rows = []
        for i, phrase in enumerate(phrases):
            ids = self.encode(phrase)
            if not ids:
                raise InputSpecError(
                    f"phrases[{i}]: expected a phrase with at least one word, got {phrase!r}, "
                    "which has no token left after upstream's text cleaning"
                )
            rows.append([self.start_id, *ids, self.end_id])
        out = torch.zeros(len(rows), self.context_length, dtype=torch.int64)
        for i, row in enumerate(rows):
            if len(row) > self.context_length:
                row = [*row[: self.context_length - 1], self.end_id]
            out[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        return out
