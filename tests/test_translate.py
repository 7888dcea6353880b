"""Translation: chunking under the 5000-character limit, the hard deadline, and the offline path
with the real library (the network call is replaced only for the success path)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from app_helpers import route_through_refusing_proxy
from whisper_ft import translate
from whisper_ft.translate import TranslationError, chunk_text


def test_chunk_text_keeps_every_word_under_the_limit():
    text = " ".join(f"Mening nummer {i} är här." for i in range(800)) + " " + "x" * 9000
    chunks = chunk_text(text, 4500)
    assert len(chunks) > 2 and all(0 < len(c) <= 4500 for c in chunks)
    assert "".join(chunks).replace(" ", "") == text.replace(" ", "")
    assert chunks[0].endswith(".")  # cut at a sentence end
    assert chunk_text("Kort text.") == ["Kort text."]
    assert chunk_text("   ") == []


def test_translation_success_with_the_call_replaced(monkeypatch):
    calls = []

    def fake(text, source, target):
        calls.append((len(text), source, target))
        return f"<{target}>"

    monkeypatch.setattr(translate, "google_translate", fake)
    assert translate.translate("Hej världen.", "en") == "<en>"
    long = "Det här är en mening. " * 600  # about 13,000 characters
    assert translate.translate(long, "de") == "<de> <de> <de>"
    assert all(n <= 5000 and s == "sv" and t == "de" for n, s, t in calls[1:])
    assert translate.translate("Hej.", "sv") == "Hej."  # same language: nothing to do
    with pytest.raises(TranslationError, match="unknown target language"):
        translate.translate("Hej.", "klingon")


@pytest.fixture
def refused_proxy(monkeypatch):
    route_through_refusing_proxy(monkeypatch)


def test_offline_gives_a_clear_error_at_once(refused_proxy):
    start = time.perf_counter()
    with pytest.raises(TranslationError, match="could not be reached"):
        translate.translate("Hej världen.", "en", timeout=10)
    assert time.perf_counter() - start < 5


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


def test_a_server_that_never_answers_hits_the_deadline(silent_proxy):
    start = time.perf_counter()
    with pytest.raises(TranslationError, match="did not answer in time"):
        translate.translate("Hej världen.", "en", timeout=1.0)
    assert time.perf_counter() - start < 3


def test_call_with_deadline_passes_results_and_errors_through():
    assert translate.call_with_deadline(lambda a, b: a + b, 1.0, 2, 3) == 5
    with pytest.raises(KeyError):
        translate.call_with_deadline(lambda: {}["x"], 1.0)
