"""Upstream's text tokenizer without torch, ``sam3`` or open_clip: phrases to ``token_ids [P, L]``.

Upstream's ``sam3.model.tokenizer_ve.SimpleTokenizer`` is OpenAI CLIP's byte-level BPE
tokenizer. :class:`Tokenizer` is an implementation of the same algorithm on the standard
library, numpy, ``regex`` and ``ftfy``, so the ids are upstream's for every string (the
tests compare them on generated Unicode text):

1. cleaning: ``ftfy.fix_text``, ``html.unescape`` twice, ``strip()``, runs of ``regex``'s
   ``\\s`` collapsed to one space, ``strip()`` again, then ``lower()``;
2. splitting into words with upstream's pattern (its special tokens, the English
   contractions, letter runs, single digits, runs of other non-space characters;
   case-insensitive);
3. each word's UTF-8 bytes written as printable characters (CLIP's byte table), ``</w>``
   appended to its last symbol, and the vocabulary's merges applied, lowest rank first.

The BPE vocabulary ships with this package (``assets/bpe_simple_vocab_16e6.txt.gz``,
byte-identical to upstream's, sha256 :data:`BPE_VOCAB_SHA256`; ``assets/NOTICE.md`` says
where it comes from).
"""

from __future__ import annotations

import gzip
import hashlib
import html
from collections.abc import Sequence
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

import ftfy
import numpy as np
import regex

from .errors import InputSpecError

__all__ = ["BPE_VOCAB_SHA256", "TOKENIZER_KIND", "Tokenizer", "bpe_vocab_path", "validate_phrases"]

#: sha256 of upstream's ``assets/bpe_simple_vocab_16e6.txt.gz`` (the copy this package ships).
BPE_VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

#: How manifests name this tokenizer: upstream's class, whose ids :class:`Tokenizer` reproduces.
TOKENIZER_KIND = "sam3.model.tokenizer_ve.SimpleTokenizer"

_VOCAB_FILE = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"

_START, _END = "<start_of_text>", "<end_of_text>"
_END_OF_WORD = "</w>"
#: merges upstream reads: the vocab's 49152 entries less the 256 bytes and the 2 special tokens
_N_MERGES = 49152 - 256 - 2
#: words kept in a tokenizer's cache before it is emptied (upstream's cache never is)
_CACHE_LIMIT = 200_000

_WHITESPACE = regex.compile(r"\s+")
_WORDS = regex.compile(
    _START + "|" + _END + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def _byte_table() -> dict[int, str]:
    """CLIP's byte table, byte -> symbol: the printable Latin-1 bytes stand for themselves, the
    other bytes (in ascending order) for U+0100, U+0101, ... . The dict's order is CLIP's (the
    printable bytes first), which gives the single symbols their ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 0x100)]
    table = {b: chr(b) for b in printable}
    kept = set(printable)
    for n, b in enumerate(b for b in range(0x100) if b not in kept):
        table[b] = chr(0x100 + n)
    return table


#: also a ``str.translate`` table from a byte, read as a Latin-1 character, to its symbol
_BYTE_TO_SYMBOL = _byte_table()


@lru_cache(maxsize=1)
def bpe_vocab_path() -> str:
    """Path of the BPE vocab shipped with this package (byte-identical to upstream's).

    Raises ``FileNotFoundError`` if the file is missing and ``ValueError`` if its sha256 is
    not upstream's; the check runs once per process.
    """
    if not _VOCAB_FILE.is_file():
        raise FileNotFoundError(f"BPE vocab: expected {_VOCAB_FILE}, which does not exist")
    digest = hashlib.sha256(_VOCAB_FILE.read_bytes()).hexdigest()
    if digest != BPE_VOCAB_SHA256:
        raise ValueError(
            f"BPE vocab {_VOCAB_FILE}: expected sha256 {BPE_VOCAB_SHA256} (upstream's vocab), got {digest}"
        )
    return str(_VOCAB_FILE)


@lru_cache(maxsize=1)
def _bpe_tables() -> tuple[dict[str, int], dict[tuple[str, ...], int]]:
    """(symbol -> id, merge pair -> rank), built as upstream builds them (a later duplicate
    wins in both), once per process."""
    with gzip.open(bpe_vocab_path(), "rb") as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + _N_MERGES]]
    singles = list(_BYTE_TO_SYMBOL.values())
    symbols = [*singles, *(s + _END_OF_WORD for s in singles), *("".join(m) for m in merges), _START, _END]
    encoder = {symbol: i for i, symbol in enumerate(symbols)}
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    return encoder, ranks


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


def _clean(text: str) -> str:
    """Upstream's ``lower`` cleaning."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


class Tokenizer:
    """Upstream's tokenizer: ``tokenizer(phrases) -> token_ids [P, context_length]`` int64
    (a numpy array).

    Each row is the start token, the phrase's BPE ids and the end token, zero-padded; a
    phrase longer than ``context_length`` is cut and its last kept id replaced by the end
    token (upstream's rule; :meth:`encode` tells the length before cutting). Raises
    :class:`InputSpecError` for an empty list, a blank phrase, or a phrase with no token
    left after upstream's cleaning (control characters only, for example), which upstream
    would run as an empty prompt.
    """

    def __init__(self, context_length: int) -> None:
        if context_length < 3:
            raise ValueError(f"context_length: expected at least 3, got {context_length}")
        self.context_length = int(context_length)
        self._encoder, self._ranks = _bpe_tables()
        self.start_id: int = self._encoder[_START]
        self.end_id: int = self._encoder[_END]
        self.vocab_size: int = len(self._encoder)
        self._cache: dict[str, tuple[int, ...]] = {}

    def _special_ids(self, word: str) -> tuple[int, ...] | None:
        # upstream's cache starts with its special tokens, which it never splits
        if word == _START:
            return (self.start_id,)
        if word == _END:
            return (self.end_id,)
        return None

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Ids of one word, ``word`` being its bytes in CLIP's byte symbols."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        ids = self._special_ids(word)
        if ids is None:
            symbols = [*word[:-1], word[-1] + _END_OF_WORD]
            ranks = self._ranks
            while len(symbols) > 1:
                best, best_rank = None, None
                for pair in pairwise(symbols):
                    rank = ranks.get(pair)
                    if rank is not None and (best_rank is None or rank < best_rank):
                        best, best_rank = pair, rank
                if best is None:
                    break
                first, second = best
                merged, i, n = [], 0, len(symbols)
                while i < n:
                    if i + 1 < n and symbols[i] == first and symbols[i + 1] == second:
                        merged.append(first + second)
                        i += 2
                    else:
                        merged.append(symbols[i])
                        i += 1
                symbols = merged
            ids = tuple(self._encoder[s] for s in symbols)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def encode(self, phrase: str) -> list[int]:
        """BPE ids of ``phrase`` without start/end tokens and without truncation."""
        ids: list[int] = []
        for word in _WORDS.findall(_clean(phrase)):
            ids.extend(self._bpe(word.encode("utf-8").decode("latin-1").translate(_BYTE_TO_SYMBOL)))
        return ids

    def __call__(self, phrases: Sequence[str] | str) -> np.ndarray:
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
        out = np.zeros((len(rows), self.context_length), dtype=np.int64)
        for i, row in enumerate(rows):
            if len(row) > self.context_length:
                row = [*row[: self.context_length - 1], self.end_id]
            out[i, : len(row)] = row
        return out
