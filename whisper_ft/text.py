"""Transcript text: tidying labels (orthographic text kept) and normalizing for WER."""

from __future__ import annotations

import re
import unicodedata

from transformers.models.whisper.english_normalizer import BasicTextNormalizer

_QUOTES = str.maketrans({"“": '"', "”": '"', "„": '"', "«": '"', "»": '"', "‘": "'", "’": "'", "‚": "'",
                         "´": "'", "`": "'"})
_SPACES = re.compile(r"\s+")
_NORMALIZER = BasicTextNormalizer(remove_diacritics=False)
_BRACKETS = str.maketrans({c: " " for c in "()[]<>{}"})
_JOINERS = "\u200c\u200d"  # zero-width (non-)joiner: they spell words in Persian, Indic scripts, emoji


def _drop_format(text: str, keep: str = "") -> str:
    """Text without Unicode format characters (category Cf: soft hyphen, zero-width space, byte-order
    mark, direction marks), which are not heard, apart from those in `keep`."""
    return "".join(c for c in text if c in keep or unicodedata.category(c) != "Cf")


def tidy_sentence(text: str) -> str:
    """Orthographic label text: NFC, straight quotes, single spaces, no invisible format
    characters but the zero-width joiners; case and punctuation kept.

    A sentence wrapped whole in one pair of quote marks loses them (Common Voice quotes
    some sentences as a whole; the speaker reads no quotes).
    """
    text = _drop_format(unicodedata.normalize("NFC", text), keep=_JOINERS).translate(_QUOTES)
    text = _SPACES.sub(" ", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'" and text.count(text[0]) == 2:
        text = text[1:-1].strip()
    return text


def normalize(text: str) -> str:
    """Text for normalized WER: lowercase, punctuation, symbols and format characters removed,
    å/ä/ö kept.

    Whisper's multilingual normalizer (`BasicTextNormalizer`), except that words in brackets
    stay: it drops them as annotations ("[laughter]"), but in Common Voice sentences they are
    read aloud."""
    return _NORMALIZER(_drop_format(text).translate(_BRACKETS)).strip()
