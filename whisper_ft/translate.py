"""Translation of transcripts with deep-translator (Google Translate), for the app.

`translate(text, target, source, timeout)` cuts text over the service's 5000-character limit,
or too long for a URL once encoded, into chunks at sentence or word boundaries and translates
them in a child process (`python -m whisper_ft.translate`, see `whisper_ft.child`) that is
killed when the whole transcript is not done after `timeout` seconds: deep-translator sets no
socket timeout, so a server that never answers would otherwise block a thread for the life of
the app. Failures (offline, timeout, refused) raise `TranslationError` with a message fit to
show the user; the app then still shows the transcript. One of the app's two modules that
reach the network for a visitor's request (the other is `youtube`).
"""

from __future__ import annotations

import re
from urllib.parse import quote_plus

from deep_translator.constants import GOOGLE_LANGUAGES_TO_CODES

from whisper_ft import child
from whisper_ft.errors import first_line

MAX_CHARS = 4500  # under deep-translator's 5000-character limit, with room for multi-byte surprises
# deep-translator sends the text in the URL of a GET request (`q=`), where a character takes 1
# to 12: 4,500 characters of Swedish about 6,000, of Chinese 40,500. Google answers 400 past
# about 16,000 (deep-translator issue 224: Chinese text failed from 1,900 characters, not 1,800).
MAX_URL_CHARS = 12_000
LANGUAGES = dict(sorted((name.title(), code) for name, code in GOOGLE_LANGUAGES_TO_CODES.items()))


class TranslationError(RuntimeError):
    """Translation failed; the message says why and is meant for the user."""


def chunk_text(text: str, max_chars: int = MAX_CHARS, max_url_chars: int = MAX_URL_CHARS) -> list[str]:
    """Split `text` into pieces of at most `max_chars` characters and `max_url_chars` once
    URL-encoded, at sentence ends, else spaces, else anywhere."""
    limits = (max_chars, max_url_chars)
    sentences = re.split(r"(?<=[.!?…])\s+", text.strip())
    return _pack([part for sentence in sentences for part in _split_long(sentence, limits)], limits)


def _size(text: str) -> tuple[int, int]:
    """(characters, characters URL-encoded); both add up over concatenation (a space is one `+`)."""
    return len(text), len(quote_plus(text))


def _split_long(sentence: str, limits: tuple[int, int]) -> list[str]:
    if all(n <= limit for n, limit in zip(_size(sentence), limits)):
        return [sentence] if sentence else []
    # a "word" over the limits (text without spaces: Chinese, Japanese) is cut anywhere
    return _pack([piece for word in sentence.split() for piece in _cut(word, limits)], limits)


def _cut(word: str, limits: tuple[int, int]) -> list[str]:
    """`word` in consecutive pieces within `limits`, each as long as fits."""
    pieces, start, used = [], 0, (0, 0)
    for i, size in enumerate(map(_size, word)):
        grown = (used[0] + size[0], used[1] + size[1])
        if i > start and any(n > limit for n, limit in zip(grown, limits)):
            pieces.append(word[start:i])
            start, grown = i, size
        used = grown
    return [*pieces, word[start:]] if word else pieces


def _pack(parts: list[str], limits: tuple[int, int]) -> list[str]:
    """Join parts with spaces, greedily, into pieces within `limits` (each part fits)."""
    pieces: list[str] = []
    current: list[str] = []
    used = (0, 0)
    for part in parts:
        size = _size(part)
        joined = (used[0] + 1 + size[0], used[1] + 1 + size[1]) if current else size
        if current and any(n > limit for n, limit in zip(joined, limits)):
            pieces.append(" ".join(current))
            current, joined = [], size
        current.append(part)
        used = joined
    if current:
        pieces.append(" ".join(current))
    return pieces


GOOGLE_SPELLING = {"he": "iw", "zh": "zh-CN"}  # Whisper's codes that Google spells otherwise


def source_code(whisper_language: str) -> str:
    """Google's code for a Whisper language, or `auto` (Google guesses) for one it does not list
    (Nynorsk, Cantonese, Faroese, Breton, ...)."""
    code = GOOGLE_SPELLING.get(whisper_language, whisper_language)
    return code if code in LANGUAGES.values() else "auto"


def translate(text: str, target: str = "en", source: str = "sv", timeout: float = 60.0) -> str:
    """Translate `text` from the Whisper language `source`, all of it within `timeout` seconds."""
    if target not in LANGUAGES.values():
        raise TranslationError(f"unknown target language {target!r}; choose one of the listed languages")
    source = source_code(source)
    if target == source or not text.strip():
        return text
    return " ".join(translate_chunks(chunk_text(text), source, target, timeout))


def translate_chunks(chunks: list[str], source: str, target: str, timeout: float) -> list[str]:
    """Translate each chunk in a child process that is killed after `timeout` seconds for all of them."""
    try:
        reply = child.run(__name__, {"chunks": chunks, "source": source, "target": target}, timeout)
    except TimeoutError as e:
        raise TranslationError(f"the translation service did not answer in time ({e})") from e
    if "error" in reply:
        raise TranslationError(reply["error"])
    return reply["texts"]


def serve_chunks(request: dict) -> dict:
    """The child's job: {"texts": one translation per chunk} or {"error": message for the user}."""
    try:
        return {"texts": [google_translate(c, request["source"], request["target"]) for c in request["chunks"]]}
    except TranslationError as e:
        return {"error": str(e)}


def google_translate(text: str, source: str, target: str) -> str:
    """One request to Google Translate through deep-translator; its failures raise TranslationError."""
    from deep_translator import GoogleTranslator

    try:
        return GoogleTranslator(source=source, target=target).translate(text) or ""
    except (OSError, ValueError) as e:  # requests' errors are OSErrors; deep-translator's are Exceptions
        raise TranslationError(f"the translation service could not be reached ({type(e).__name__})") from e
    except Exception as e:
        if type(e).__module__.startswith("deep_translator"):
            raise TranslationError(f"the translation service refused the text ({first_line(e)})") from e
        raise


if __name__ == "__main__":
    child.serve(serve_chunks)
