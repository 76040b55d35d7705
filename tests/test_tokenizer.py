"""The tokenizer: upstream's ids for any text, without torch, sam3 or open_clip."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sam3_exportable.tokenizer as tokenizer_module
from sam3_exportable.errors import InputSpecError
from sam3_exportable.tokenizer import BPE_VOCAB_SHA256, Tokenizer, bpe_vocab_path

CONTEXT_LENGTH = 32

ORDINARY = [
    "a dog",
    "the red car on the left",
    "person",
    "two cats sleeping on a sofa",
    "A Yellow School Bus",
    "traffic light",
    "dog " * 40,  # longer than the context: cut, last kept id replaced by the end token
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]
PUNCTUATION = [
    "dog, cat; bird.",
    "what?! no...",
    "(left) [right] {top}",
    "a-b_c/d\\e|f",
    "$5 @home #1 100% a+b=c",
    "--- *** ~~~",
    '"quoted" «guillemets» „low“',
]
APOSTROPHES = [
    "the man's hat",
    "don't",
    "they're here",
    "we've I'm you'll he'd",
    "THE MAN'S HAT",
    "it's   the man's",
    "rock 'n' roll",
    "o'clock 'tis",
    "man’s",  # typographic apostrophe
]
DIGITS = ["3 dogs", "1234567890", "route 66", "x1y2z3", "3.14159", "٣ dogs", "²³", "Ⅻ"]
ACCENTS = [
    "Café NAÏVE",
    "crème brûlée",
    "Ångström",
    "résumé",
    "e\u0301te\u0301",  # combining accents
    "İstanbul straße",
    "ǅemal",
    "Ωmega ΣΊΣΥΦΟΣ",
]
CJK = ["狗", "一只红色的汽车", "犬と猫", "고양이", "中文 and english", "ｆｕｌｌｗｉｄｔｈ"]
EMOJI = ["🐶", "a 🐱 and a 🐶", "👨‍👩‍👧", "🇫🇷 flag", "❤️", "👍🏽"]
HTML = [
    "salt &amp; pepper",
    "&lt;dog&gt;",
    "&amp;amp;",
    "&amp;lt;cat&amp;gt;",
    "&#39;s",
    "&nbsp;x",
    "&eacute;t&eacute;",
]
WHITESPACE = [
    "a\tdog",
    "a\ndog\r\n",
    "a\u00a0dog",
    "a\u2028dog\u2029",
    "  \t a \n\n red \u00a0\u2028 car \t",
    "x\x1cy",
    "a\x1f\x1ered car",
    "a\u3000dog\u200bcat",
    "a\x85dog\x0bcat\x0c",
]
SPECIAL = ["<start_of_text>", "a <end_of_text> b", "<START_OF_TEXT>", "<ſtart_of_text>", "<|endoftext|>"]
MOJIBAKE = ["cafÃ©", "â€œquotedâ€\x9d", "\x1b[31mred\x1b[0m car"]
FIXED = [*ORDINARY, *PUNCTUATION, *APOSTROPHES, *DIGITS, *ACCENTS, *CJK, *EMOJI, *HTML, *WHITESPACE]
FIXED += [*SPECIAL, *MOJIBAKE]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer(CONTEXT_LENGTH)


@pytest.fixture(scope="module")
def upstream():
    from sam3.model.tokenizer_ve import SimpleTokenizer

    return SimpleTokenizer(bpe_path=bpe_vocab_path())  # as sam3.model_builder builds it


def _upstream_ids(upstream, text: str) -> np.ndarray:
    # as sam3.model.text_encoder_ve calls it
    return upstream([text], context_length=CONTEXT_LENGTH).numpy()


def _assert_same(ours: Tokenizer, upstream, text: str) -> None:
    assert ours.encode(text) == upstream.encode(text), repr(text)
    want = _upstream_ids(upstream, text)
    if not text.strip():  # blank to Python (even "\x85", which ftfy turns into "…"): refused first
        with pytest.raises(InputSpecError, match=r"expected a non-empty phrase"):
            ours([text])
        return
    if int((want[0] != 0).sum()) <= 2:  # upstream runs it as an empty prompt; we refuse it
        with pytest.raises(InputSpecError, match=r"expected a phrase with at least one word"):
            ours([text])
        return
    got = ours([text])
    assert got.dtype == np.int64 and got.shape == (1, CONTEXT_LENGTH), repr(text)
    assert np.array_equal(got, want), repr(text)


@pytest.mark.parametrize("text", FIXED)
def test_token_ids_are_upstreams(ours: Tokenizer, upstream, text: str) -> None:
    _assert_same(ours, upstream, text)


def test_a_batch_is_the_rows_of_its_phrases(ours: Tokenizer, upstream) -> None:
    phrases = [p for p in FIXED if ours.encode(p)]
    got = ours(phrases)
    assert isinstance(got, np.ndarray) and got.dtype == np.int64
    assert got.shape == (len(phrases), CONTEXT_LENGTH)
    assert np.array_equal(got, upstream(phrases, context_length=CONTEXT_LENGTH).numpy())


def test_special_ids_and_vocab_size_are_upstreams(ours: Tokenizer, upstream) -> None:
    assert (ours.start_id, ours.end_id, ours.vocab_size) == (49406, 49407, 49408)
    assert (ours.start_id, ours.end_id) == (upstream.sot_token_id, upstream.eot_token_id)
    assert ours.vocab_size == upstream.vocab_size
    assert ours.context_length == CONTEXT_LENGTH


def test_a_long_phrase_is_cut_and_ends_with_the_end_token(ours: Tokenizer) -> None:
    ids = ours.encode("dog " * 40)
    assert len(ids) == 40  # encode neither adds start/end nor cuts
    row = ours(["dog " * 40])[0]
    assert row[0] == ours.start_id and row[-1] == ours.end_id
    assert list(row[1:-1]) == ids[: CONTEXT_LENGTH - 2]


def test_a_string_is_one_phrase(ours: Tokenizer) -> None:
    assert np.array_equal(ours("a dog"), ours(["a dog"]))


@pytest.mark.parametrize(
    ("phrases", "message"),
    [
        ([], r"phrases: expected at least one text prompt, got none"),
        (["a dog", "  "], r"phrases\[1\]: expected a non-empty phrase"),
        (["a dog", 3], r"phrases\[1\]: expected a non-empty phrase"),
        (["a dog", "\x01\x02\x03"], r"phrases\[1\]: expected a phrase with at least one word"),
        (["\x00"], r"phrases\[0\]: expected a phrase with at least one word"),
    ],
)
def test_phrases_without_words_are_refused(ours: Tokenizer, phrases, message: str) -> None:
    with pytest.raises(InputSpecError, match=message):
        ours(phrases)


def test_context_length_below_three_is_refused() -> None:
    with pytest.raises(ValueError, match=r"context_length: expected at least 3, got 2"):
        Tokenizer(2)


@settings(max_examples=300, deadline=None)
@given(text=st.text(min_size=1, max_size=60))
def test_token_ids_are_upstreams_for_any_text(ours: Tokenizer, upstream, text: str) -> None:
    _assert_same(ours, upstream, text)


_PIECES = [
    "dog", "Cat", "'s", "'T", "'re", "'ve", "'m", "'ll", "'d", "'", "’", "&amp;", "&lt;", "&#39;",
    "&", ";", " ", "  ", "\t", "\n", "\r", "\u00a0", "\u2028", "\u3000", "\x1c", "\x85", "3", "42",
    "é", "e\u0301", "ß", "İ", "狗", "고", "🐶", "👍🏽", "\u200d", "<start_of_text>", "<end_of_text>",
    "Ã©", "-", ".", "!?", "_", "ǅ", "ſ", "K",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.sampled_from(_PIECES), min_size=1, max_size=20))
def test_token_ids_are_upstreams_for_mixed_pieces(ours: Tokenizer, upstream, pieces: list[str]) -> None:
    _assert_same(ours, upstream, "".join(pieces))


def test_the_packaged_vocab_is_upstreams() -> None:
    path = Path(bpe_vocab_path())
    assert path.name == "bpe_simple_vocab_16e6.txt.gz" and path.parent.name == "assets"
    assert path.parent.parent == Path(tokenizer_module.__file__).resolve().parent
    assert hashlib.sha256(path.read_bytes()).hexdigest() == BPE_VOCAB_SHA256
    assert (path.parent / "NOTICE.md").is_file()


def test_a_vocab_with_other_bytes_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    other.write_bytes(b"not the vocab")
    monkeypatch.setattr(tokenizer_module, "_VOCAB_FILE", other)
    bpe_vocab_path.cache_clear()
    try:
        with pytest.raises(ValueError, match=rf"BPE vocab .*: expected sha256 {BPE_VOCAB_SHA256}.*, got \w+"):
            bpe_vocab_path()
    finally:
        bpe_vocab_path.cache_clear()


def test_the_tokenizer_imports_no_torch_and_no_open_clip() -> None:
    script = (
        "import sys; import sam3_exportable.tokenizer as t; t.Tokenizer(32)(['a dog']); "
        "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
