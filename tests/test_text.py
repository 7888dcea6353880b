"""Transcript text (`whisper_ft.text`): normalization for WER is Whisper's multilingual
normalizer with bracketed words kept, character for character, over all of Unicode."""

from __future__ import annotations

import random
import sys
import unicodedata

import pytest

from conftest import ROOT
from whisper_ft.text import _BRACKETS, _JOINERS, _NORMALIZER, _drop_format, normalize, tidy_sentence


def reference(text: str) -> str:
    """normalize as its docstring defines it, one character at a time."""
    dropped = "".join(c for c in text if unicodedata.category(c) != "Cf")
    return _NORMALIZER(dropped.translate(_BRACKETS)).strip()


CODE_POINTS = [c for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]  # no lone surrogates


def test_normalize_is_whispers_normalizer_on_every_character():
    for start in range(0, len(CODE_POINTS), 4096):
        chars = [chr(c) for c in CODE_POINTS[start:start + 4096]]
        assert [normalize(f"a{c}b {c}") for c in chars] == [reference(f"a{c}b {c}") for c in chars]


@pytest.mark.parametrize("seed", range(3))
def test_normalize_is_whispers_normalizer_on_mixed_text(seed):
    rng = random.Random(seed)
    common = "abcåäöéü ÅÄÖ.,!?;:-–—'\"()[]<>{}«»“”„\u00ad\u200b\u200c\u200d\ufeff\u0301\u0308ǅﬁ①Ⅻ％（）［］　\t\n"
    texts = ["".join(rng.choice(common) if rng.random() < 0.7 else chr(rng.choice(CODE_POINTS))
                     for _ in range(rng.randint(0, 40))) for _ in range(5000)]
    assert [normalize(t) for t in texts] == [reference(t) for t in texts]


def test_normalize_keeps_swedish_letters_and_bracketed_words():
    assert normalize("Hej [på] dig, (Åsa)!") == "hej på dig åsa"
    sentences = (ROOT / "tests" / "fixtures" / "sv-sentences.txt").read_text(encoding="utf-8").splitlines()
    assert [normalize(s) for s in sentences] == [reference(s) for s in sentences]


def test_format_characters_are_dropped_but_the_joiners_kept_where_asked():
    text = "sam\u00adhäl\u200blet\u200c\u200d\ufeff"
    assert _drop_format(text) == "samhället"
    assert _drop_format(text, _JOINERS) == "samhället\u200c\u200d"
    assert tidy_sentence("“Sam\u00adhället\u200d”") == "Samhället\u200d"
