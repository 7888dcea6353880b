"""A real browser on the page: headless Debian Chromium driven by Playwright uploads a Swedish
recording and reads the transcript, translation and real-time factor; a broken file shows an
error and the page keeps working; `--share --auth-file` asks for a login first. CI installs
chromium with apt-get."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gradio as gr
import pytest

from app_helpers import fast_model, free_port, speech_wav
from conftest import ROOT
from whisper_ft import translate
from whisper_ft.app import Handlers, build_app
from whisper_ft.config import load_config
from whisper_ft.transcribe import load_transcriber

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 90_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"{CHROMIUM} is absent (apt-get install chromium)"),
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is needed for synthetic speech"),
]


@pytest.fixture(scope="module")
def page_url(tiny_model_dir, tmp_path_factory):
    model = fast_model(tiny_model_dir, tmp_path_factory.mktemp("fast-whisper"))
    handlers = Handlers(load_transcriber(str(model), use_ctranslate2=False, beam_size=1), load_config(None),
                        tmp_path_factory.mktemp("out"))
    demo = build_app(handlers, str(model), "a tiny random model for tests")
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield demo.local_url
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def upload(page, path: Path) -> None:
    page.locator("#upload input[type=file]").set_input_files(str(path))
    # The uploaded file's row, labelled with its name; the name shown as text only while the
    # upload runs is no sign that it has finished.
    page.locator("#upload").get_by_label(path.name).first.wait_for(timeout=TIMEOUT_MS)
    page.locator("#transcribe-file").click()


def test_upload_shows_transcript_and_translation(page_url, browser, tmp_path, monkeypatch):
    monkeypatch.setattr(translate, "translate_chunks",
                        lambda chunks, source, target, timeout: [f"TRANSLATED({target}): {c}" for c in chunks])
    wav = speech_wav("Hej, jag heter Anna och jag bor i Stockholm.", tmp_path / "speech.wav")
    (tmp_path / "broken.mp3").write_bytes(os.urandom(2048))
    page = browser.new_page()
    page.goto(page_url, timeout=TIMEOUT_MS)
    page.get_by_text("tiny random model").first.wait_for(timeout=TIMEOUT_MS)  # the model notice
    page.get_by_role("tab", name="File").click()
    upload(page, wav)
    page.wait_for_function("document.querySelector('#translation textarea').value.length > 0", timeout=TIMEOUT_MS)
    transcript = page.locator("#transcript textarea").input_value()
    translation = page.locator("#translation textarea").input_value()
    assert transcript.strip()
    assert translation == f"TRANSLATED(en): {transcript}"
    assert "real-time factor" in page.locator("#status").inner_text()
    assert page.locator("#downloads").get_by_text(".srt").count() >= 1

    # A file that is not audio gets a clear message on the page.
    page.reload()
    page.get_by_role("tab", name="File").click()
    upload(page, tmp_path / "broken.mp3")
    page.get_by_text("could not be read", exact=False).first.wait_for(timeout=TIMEOUT_MS)
    page.close()


@pytest.fixture
def shared_with_login(tiny_model_dir, tmp_path, monkeypatch):
    """`inference_app.py --share --auth-file FILE`, served on 127.0.0.1 only: launch is wrapped to
    keep gradio.live out of the test, everything else is what the command line passes."""
    import inference_app

    launched = []
    launch = gr.Blocks.launch

    def local_launch(self, **kwargs):
        launched.append((self, kwargs))
        return launch(self, **{**kwargs, "share": False, "server_port": free_port(), "prevent_thread_lock": True,
                               "quiet": True})

    monkeypatch.setattr(gr.Blocks, "launch", local_launch)
    logins = tmp_path / "logins.txt"
    logins.write_text("anna:hemligt-123\n", encoding="utf-8")
    model = fast_model(tiny_model_dir, tmp_path / "fast-whisper")
    assert inference_app.main(["--model", str(model), "--config", str(ROOT / "config.yaml"), "--share",
                               "--auth-file", str(logins)]) == 0
    demo, kwargs = launched[-1]
    assert kwargs["share"] is True and kwargs["auth"] == [("anna", "hemligt-123")]
    yield demo.local_url
    demo.close()


def test_shared_page_asks_for_a_login(shared_with_login, browser):
    page = browser.new_page()
    page.goto(shared_with_login, timeout=TIMEOUT_MS)
    page.get_by_text("sign in").first.wait_for(timeout=TIMEOUT_MS)  # the login form, not the page
    assert page.locator("#upload").count() == 0
    page.get_by_label("username").fill("anna")
    page.get_by_label("password").fill("fel")
    page.get_by_role("button", name="Login").click()
    page.get_by_text("Incorrect", exact=False).first.wait_for(timeout=TIMEOUT_MS)
    page.get_by_label("username").fill("anna")  # the form is emptied after a failed login
    page.get_by_label("password").fill("hemligt-123")
    page.get_by_role("button", name="Login").click()
    page.get_by_role("tab", name="File").wait_for(timeout=TIMEOUT_MS)
    page.close()
