"""Translation: chunking under the 5000-character limit, one hard deadline for a whole transcript
(the child process is killed: no thread or process is left), and the offline path with the real
library (the network call is replaced only for the success path)."""

from __future__ import annotations

import socket
import threading
import time

import psutil
import pytest

from app_helpers import route_through_refusing_proxy
from whisper_ft import child, translate
from whisper_ft.translate import TranslationError, chunk_text


def test_chunk_text_keeps_every_word_under_the_limit():
    text = " ".join(f"Mening nummer {i} är här." for i in range(800)) + " " + "x" * 9000
    chunks = chunk_text(text, 4500)
    assert len(chunks) > 2 and all(0 < len(c) <= 4500 for c in chunks)
    assert "".join(chunks).replace(" ", "") == text.replace(" ", "")
    assert chunks[0].endswith(".")  # cut at a sentence end
    assert chunk_text("Kort text.") == ["Kort text."]
    assert chunk_text("   ") == []


def test_chunks_fit_in_a_url_in_any_script():
    """deep-translator puts the text in a GET request's URL, where a Chinese or Russian character
    takes 6 to 9: such text is cut shorter, Swedish is not."""
    from urllib.parse import quote_plus

    chinese = "我们今天去商店买了很多东西。" * 300  # no spaces to cut at
    russian = " ".join(["Привет, мир, это проверка."] * 400)
    for text, glue in ((chinese, ""), (russian, " ")):
        chunks = chunk_text(text)
        assert len(chunks) > 1 and all(len(quote_plus(c)) <= translate.MAX_URL_CHARS for c in chunks)
        assert glue.join(chunks) == text
    assert len(quote_plus(chunk_text(chinese)[0])) > translate.MAX_URL_CHARS - 9  # cut anywhere: as long as fits
    swedish = " ".join(f"Det här är mening nummer {i}, på svenska: åäö." for i in range(90))[:4490]
    assert chunk_text(swedish) == [swedish]


def test_translation_success_with_the_call_replaced(monkeypatch):
    calls = []

    def fake(chunks, source, target, timeout):
        calls.append(([len(c) for c in chunks], source, target, timeout))
        return [f"<{target}>" for _ in chunks]

    monkeypatch.setattr(translate, "translate_chunks", fake)
    assert translate.translate("Hej världen.", "en") == "<en>"
    long = "Det här är en mening. " * 600  # about 13,000 characters
    assert translate.translate(long, "de", timeout=30) == "<de> <de> <de>"
    lengths, source, target, timeout = calls[1]
    assert all(n <= 5000 for n in lengths) and (source, target, timeout) == ("sv", "de", 30)
    assert translate.translate("Hej.", "sv") == "Hej."  # same language: nothing to do
    with pytest.raises(TranslationError, match="unknown target language"):
        translate.translate("Hej.", "klingon")
    # Whisper's codes Google spells otherwise, or does not list (it then guesses the language)
    for whisper, google in (("he", "iw"), ("zh", "zh-CN"), ("nn", "auto"), ("yue", "auto"), ("no", "no")):
        translate.translate("Text.", "en", source=whisper)
        assert calls[-1][1] == google
    assert translate.translate("Shalom.", "iw", source="he") == "Shalom."


def test_every_whisper_language_has_a_source_google_takes():
    """deep-translator refuses an unknown source code before it sends anything."""
    from deep_translator import GoogleTranslator
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    for code in LANGUAGES:
        GoogleTranslator(source=translate.source_code(code), target="en")


@pytest.fixture
def refused_proxy(monkeypatch):
    route_through_refusing_proxy(monkeypatch)


def test_the_child_translates_each_chunk_and_reports_failures(monkeypatch):
    monkeypatch.setattr(translate, "google_translate", lambda text, source, target: text.upper())
    assert translate.serve_chunks({"chunks": ["hej", "då"], "source": "sv", "target": "en"}) == {"texts": ["HEJ", "DÅ"]}

    def refused(text, source, target):
        raise TranslationError("the translation service refused the text (too many requests)")

    monkeypatch.setattr(translate, "google_translate", refused)
    assert translate.serve_chunks({"chunks": ["hej"], "source": "sv", "target": "en"}) == {
        "error": "the translation service refused the text (too many requests)"}


def test_offline_gives_a_clear_error_at_once(refused_proxy):
    start = time.perf_counter()
    with pytest.raises(TranslationError, match="could not be reached"):
        translate.translate("Hej världen.", "en", timeout=30)
    assert time.perf_counter() - start < 15  # not the timeout: a refused connection is known at once


@pytest.fixture
def silent_proxy(monkeypatch):
    """A proxy that accepts connections and never answers, as a stuck server would."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    for var in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    yield
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_a_server_that_never_answers_hits_one_deadline_for_the_whole_transcript(silent_proxy):
    threads = threading.active_count()
    long = "Det här är en mening. " * 600  # three chunks: one deadline for all, not one each
    start = time.perf_counter()
    with pytest.raises(TranslationError, match="did not answer in time"):
        translate.translate(long, "en", timeout=1.5)
    assert time.perf_counter() - start < 3
    assert threading.active_count() == threads  # nothing is left blocked on a socket
    assert psutil.Process().children() == []


def test_a_crashing_child_is_a_bug_not_a_translation_failure():
    with pytest.raises(child.ChildFailed, match="No module named"):
        child.run("whisper_ft.no_such_module", {}, 30)
