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


class _CharTable(dict):
    """A `str.translate` table that maps each character by `rule(character)` (its replacement,
    or None to drop it), worked out the first time the character is seen: Unicode's character
    database is asked once per character, not once per character of every text."""

    def __init__(self, rule):
        super().__init__()
        self.rule = rule

    def __missing__(self, code: int):
        self[code] = out = self.rule(chr(code))
        return out


_FORMAT = {keep: _CharTable(lambda c, keep=keep: c if c in keep or unicodedata.category(c) != "Cf" else None)
           for keep in ("", _JOINERS)}
# BasicTextNormalizer's remove_symbols: marks, symbols and punctuation (categories M, S, P) become spaces
_SYMBOLS = _CharTable(lambda c: " " if unicodedata.category(c)[0] in "MSP" else c)


def _drop_format(text: str, keep: str = "") -> str:
    """Text without Unicode format characters (category Cf: soft hyphen, zero-width space, byte-order
    mark, direction marks), which are not heard, apart from those in `keep` ("" or `_JOINERS`)."""
    return text.translate(_FORMAT[keep])


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
    read aloud. Computed as `_NORMALIZER(_drop_format(text).translate(_BRACKETS)).strip()`
    (tested), with its steps by character tables: its bracket patterns cannot match once the
    brackets are spaces, and its per-character category test is `_SYMBOLS`."""
    s = _drop_format(text).translate(_BRACKETS).lower()
    s = unicodedata.normalize("NFKC", s).translate(_SYMBOLS).lower()
    return _SPACES.sub(" ", s).strip()
