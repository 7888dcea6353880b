"""The inference app: handlers with a tiny model, each bad input, the limits (private URLs, the
request deadline, a busy model), model discovery, the command line with its login options, and
the gradio_client API against a server on 127.0.0.1. A slow test runs a real checkpoint
(WHISPER_TEST_MODEL) on a two-minute synthetic Swedish recording."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import soundfile as sf

from app_helpers import FFMPEG, Server, fast_model, free_port, route_through_refusing_proxy, speech_media, speech_wav
from conftest import ROOT, run_cli
from whisper_ft import app, cli, translate
from whisper_ft.app import BUSY, GOOGLE, NO_TRANSLATION, WHISPER, Handlers, find_model, newest_best
from whisper_ft.config import ConfigError, load_config
from whisper_ft.transcribe import Transcript, load_transcriber

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("ffmpeg") is None,
                                reason="espeak-ng and ffmpeg are needed for synthetic speech")

MAX_SECONDS = 60


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    return fast_model(tiny_model_dir, tmp_path_factory.mktemp("fast-whisper"))


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, [f"app.max_media_seconds={MAX_SECONDS}", "app.translate_timeout_seconds=5",
                              "app.allow_private_urls=true"])  # the test's media server is on 127.0.0.1


@pytest.fixture(scope="module")
def handlers(model_dir, cfg, tmp_path_factory):
    return Handlers(load_transcriber(str(model_dir), use_ctranslate2=False, beam_size=1), cfg,
                    tmp_path_factory.mktemp("out"))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Speech as WAV, MP3 (48 kHz), MP4 video and 48 kHz stereo int16 (a browser recording)."""
    root = tmp_path_factory.mktemp("media")
    wav = speech_media(root)
    subprocess.run([*FFMPEG, "-i", str(wav), "-ar", "48000", "-ac", "2", str(root / "stereo48k.wav")], check=True)
    speech_wav("Det här är en lång inspelning som fortsätter.", root / "long.wav", repeat=14)  # about 40 s
    speech_wav("Det här är en lång inspelning som fortsätter.", root / "toolong.wav", repeat=25)  # about 72 s
    (root / "empty.wav").write_bytes(b"")
    (root / "garbage.mp3").write_bytes(os.urandom(4096))
    sf.write(root / "silence.wav", np.zeros(3 * 16000, np.float32), 16000)
    return {p.name: p for p in root.iterdir()}


@pytest.fixture
def fake_google(monkeypatch):
    calls = []

    def fake(chunks, source, target, timeout):
        calls.extend((text, source, target) for text in chunks)
        return [f"[{target}] {text}" for text in chunks]

    monkeypatch.setattr(translate, "translate_chunks", fake)
    return calls


def test_microphone_48k_stereo_int16(handlers, media, fake_google):
    info = sf.info(media["stereo48k.wav"])
    assert info.samplerate == 48000 and info.channels == 2 and info.subtype == "PCM_16"
    text, translation, status, files, chat, history = handlers.from_microphone(str(media["stereo48k.wav"]), GOOGLE,
                                                                               "en", False, [])
    assert text and translation == f"[en] {text}" and fake_google == [(text, "sv", "en")]
    assert "real-time factor" in status and "transformers" in status
    assert [Path(f).suffix for f in files] == [".txt", ".srt"]
    assert Path(files[0]).read_text(encoding="utf-8") == text + "\n"
    assert chat == history and [m["role"] for m in history] == ["user", "assistant"]
    assert "Microphone" in history[0]["content"] and text in history[1]["content"]


@pytest.mark.parametrize("name", ["speech.mp3", "video.mp4", "speech.wav"])
def test_file_upload_audio_and_video(handlers, media, fake_google, name):
    text, translation, status, files, *_ = handlers.from_file(str(media[name]), GOOGLE, "de", False, [])
    assert text and translation == f"[de] {text}" and "real-time factor" in status


def test_long_audio_with_timestamps_and_history(handlers, media, fake_google):
    history = handlers.from_microphone(str(media["stereo48k.wav"]), NO_TRANSLATION, "en", False, [])[-1]
    text, translation, status, files, chat, history = handlers.from_file(str(media["long.wav"]), NO_TRANSLATION, "en",
                                                                         True, history)
    assert translation == "" and fake_google == []
    assert len(history) == 4 and "File long.wav" in history[2]["content"]
    srt = Path(files[1]).read_text(encoding="utf-8")
    assert srt.startswith("1\n00:00:") and "-->" in srt
    assert Path(files[0]).read_text(encoding="utf-8").startswith("[00:")


class Says:
    """A model that hears `text` in any audio, fine-tuned for `language`: no decoding."""

    backend = "transformers"

    def __init__(self, text: str, language: str = "sv"):
        self.text, self.language = text, language

    def transcribe(self, wave, task="transcribe", timestamps=False):
        return Transcript(self.text, (), len(wave) / 16000, 0.1)


def test_history_shows_the_translation_and_keeps_the_last_turns(cfg, media, tmp_path, fake_google):
    """Each answer in the history carries its translation, and the page keeps HISTORY_TURNS turns
    per visitor: an endless history would grow the page (and the state sent back) without bound."""
    earlier = [{"role": role, "content": f"turn {i}"} for i in range(app.HISTORY_TURNS)
               for role in ("user", "assistant")]
    handlers = Handlers(Says("hej då"), cfg, tmp_path)
    *_, chat, history = handlers.from_file(str(media["speech.wav"]), GOOGLE, "en", False, earlier)
    assert chat == history and len(history) == 2 * app.HISTORY_TURNS
    assert history[0]["content"] == "turn 1" and "File speech.wav" in history[-2]["content"]
    assert history[-1] == {"role": "assistant", "content": "hej då\n\n*Translation:* [en] hej då"}


def test_translation_offline_still_shows_the_transcript(handlers, media, monkeypatch):
    route_through_refusing_proxy(monkeypatch)
    text, translation, status, *_ = handlers.from_file(str(media["speech.mp3"]), GOOGLE, "en", False, [])
    assert text and translation == ""
    assert "Translation failed" in status and "could not be reached" in status and WHISPER in status


def test_google_translates_from_the_models_language_within_the_requests_time(media, tmp_path, monkeypatch):
    """A model fine-tuned for Norwegian is translated from Norwegian, whatever model.language says;
    and the translation gets what is left of app.request_timeout_seconds when that is less than
    app.translate_timeout_seconds: a request never runs past its deadline."""
    sent = []
    monkeypatch.setattr(translate, "translate", lambda text, target, source, timeout: sent.append(
        (text, target, source, timeout)) or f"[{target}] {text}")
    cfg = load_config(None, ["model.language=sv", "app.request_timeout_seconds=30",
                             "app.translate_timeout_seconds=60"])
    handlers = Handlers(Says("hei på deg", language="no"), cfg, tmp_path)
    translation = handlers.from_file(str(media["speech.wav"]), GOOGLE, "de", False, [])[1]
    assert translation == "[de] hei på deg"
    [(text, target, source, timeout)] = sent
    assert (text, target, source) == ("hei på deg", "de", "no") and 20 < timeout <= 30


def test_crashed_network_processes_keep_the_transcript_and_say_so(handlers, media, monkeypatch, caplog):
    """A crash of the translation or download process is a bug: logged as an error; the visitor
    keeps the transcript, or gets a message instead of Gradio's bare "Error"."""
    from whisper_ft import child

    def crash(module, request, timeout):
        raise child.ChildFailed(f"python -m {module} exited with 1: KeyError: 'x'")

    monkeypatch.setattr(child, "run", crash)
    with caplog.at_level(logging.ERROR):
        text, translation, status, *_ = handlers.from_file(str(media["speech.mp3"]), GOOGLE, "en", False, [])
    assert text and translation == "" and "translation process crashed" in status
    assert "KeyError: 'x'" in caplog.text
    assert "download failed unexpectedly" in error_message(lambda: handlers.from_url("https://example.com/v"))


def test_whisper_translate_task_is_the_offline_option(handlers, media, fake_google, monkeypatch):
    tasks = []
    transcribe = handlers.transcriber.transcribe
    monkeypatch.setattr(handlers.transcriber, "transcribe",
                        lambda wave, task="transcribe", timestamps=False: tasks.append(task) or transcribe(
                            wave, task, timestamps))
    text, translation, status, *_ = handlers.from_file(str(media["speech.mp3"]), WHISPER, "en", False, [])
    assert tasks == ["transcribe", "translate"] and fake_google == []
    assert text and "Whisper's translation" in status


def error_message(call) -> str:
    with pytest.raises(gr.Error) as e:
        call()
    return e.value.message


def test_bad_microphone_input(handlers, tmp_path, media):
    """The page sends the recording as a file, and the API takes any file as one: it is decoded
    like an upload, refused by its header when too long."""
    assert "Record something first" in error_message(lambda: handlers.from_microphone(None))
    sf.write(tmp_path / "silent.wav", np.zeros((48000, 2), np.int16), 48000)
    assert "silent" in error_message(lambda: handlers.from_microphone(str(tmp_path / "silent.wav")))
    sf.write(tmp_path / "long.wav", (np.random.RandomState(0).randn(8000 * (MAX_SECONDS + 5)) * 3000).astype(np.int16),
             8000)
    assert "limit is 60 s" in error_message(lambda: handlers.from_microphone(str(tmp_path / "long.wav")))
    assert "The recording could not be read" in error_message(
        lambda: handlers.from_microphone(str(media["garbage.mp3"])))


def test_the_page_sends_the_recording_as_a_file(handlers):
    """A numpy recording would be decoded whole by Gradio before any length check."""
    demo = app.build_app(handlers, "m")
    mics = [b for b in demo.blocks.values() if isinstance(b, gr.Audio)]
    assert mics and all(m.type == "filepath" for m in mics)


def test_file_inputs_take_uploads_only_and_the_three_endpoints_share_the_workers(handlers):
    """Gradio would fetch a URL sent in place of a file, with no size or time limit, before any
    handler runs; and a concurrency limit per endpoint would allow three times app.workers."""
    import asyncio

    demo = app.build_app(handlers, "m")
    inputs = [b for b in demo.blocks.values() if isinstance(b, (gr.Audio, gr.File)) and b.interactive is not False
              and getattr(b, "elem_id", None) != "downloads"]
    assert sorted(b.get_block_name() for b in inputs) == ["audio", "file"]
    for block in inputs:
        for url in ("https://example.com/recording.mp3", "http://10.0.0.1/x.wav"):
            with pytest.raises(gr.Error, match="Send the file itself"):
                asyncio.run(block.async_move_resource_to_block_cache(url))
    endpoints = [fn for fn in demo.fns.values() if fn.api_name and fn.api_name.startswith("transcribe_")]
    assert len(endpoints) == 3
    assert {(fn.concurrency_id, fn.concurrency_limit) for fn in endpoints} == {("transcribe", handlers.cfg.app.workers)}


@pytest.mark.parametrize("mime_types", ["known", "unknown"])  # unknown: a host without /etc/mime.types
def test_the_upload_field_takes_every_format_the_decoder_reads(handlers, tmp_path, monkeypatch, mime_types):
    from gradio.data_classes import FileData
    from gradio_client import utils as client_utils

    from whisper_ft.audio import MEDIA_DEMUXERS, MEDIA_EXTENSIONS, MEDIA_FORMATS

    if mime_types == "unknown":
        monkeypatch.setattr(client_utils, "get_mimetype", lambda name: None)
    upload = next(b for b in app.build_app(handlers, "m").blocks.values() if getattr(b, "elem_id", None) == "upload")
    assert set(MEDIA_FORMATS) == set(MEDIA_DEMUXERS) and all(MEDIA_FORMATS.values())
    assert {".ts", ".wv", ".caf", ".ape", ".f4v", ".flac", ".ogg", ".m4a", ".mkv", ".wma"} <= set(MEDIA_EXTENSIONS)
    for ext in (*MEDIA_EXTENSIONS, ".MP3"):
        (tmp_path / f"clip{ext}").write_bytes(b"\0")
        assert upload.preprocess(FileData(path=str(tmp_path / f"clip{ext}"))) == str(tmp_path / f"clip{ext}")
    (tmp_path / "notes.txt").write_text("hej")
    with pytest.raises(gr.Error, match="Invalid file type"):
        upload.preprocess(FileData(path=str(tmp_path / "notes.txt")))


def test_no_speech_offers_no_transcript_files(cfg, media, tmp_path):
    class Mute:  # a model that recognises nothing
        backend = "transformers"

        def transcribe(self, wave, task="transcribe", timestamps=False):
            return Transcript("", (), len(wave) / 16000, 0.1)

    text, translation, status, files, *_ = Handlers(Mute(), cfg, tmp_path).from_file(str(media["speech.wav"]),
                                                                                      GOOGLE, "en", True, [])
    assert (text, translation, files) == ("", "", []) and "No speech was recognised" in status
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_keeps_the_transcript_without_the_files(cfg, media, tmp_path, monkeypatch, fake_google):
    class Fixed:
        backend = "transformers"

        def transcribe(self, wave, task="transcribe", timestamps=False):
            return Transcript("hej då", (), len(wave) / 16000, 0.1)

    write = Path.write_text

    def disk_full(self, text, *args, **kwargs):  # the .txt is written, the .srt is not
        if self.suffix == ".srt":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.warns(UserWarning, match="^The transcript files could not be written: No space left on device$"):
        text, translation, status, files, *_ = Handlers(Fixed(), cfg, tmp_path).from_file(str(media["speech.wav"]),
                                                                                          GOOGLE, "en", False, [])
    assert (text, translation, files) == ("hej då", "[en] hej då", [])
    assert "could not be written (No space left on device)" in status
    assert list(tmp_path.iterdir()) == []


def test_bad_files(handlers, media, monkeypatch):
    assert "Upload an audio or video file first" in error_message(lambda: handlers.from_file(None))
    empty = error_message(lambda: handlers.from_file(str(media["empty.wav"])))
    assert empty.endswith("empty file: empty.wav") and str(media["empty.wav"].parent) not in empty
    assert "could not be read" in error_message(lambda: handlers.from_file(str(media["garbage.mp3"])))
    assert "silent" in error_message(lambda: handlers.from_file(str(media["silence.wav"])))
    assert "unknown translator" in error_message(
        lambda: handlers.from_file(str(media["speech.mp3"]), "Babelfish")).lower()

    def no_decode(path):
        raise AssertionError("decoded although the header says too long")

    monkeypatch.setattr(app, "load_audio", no_decode)
    assert "limit is 60 s" in error_message(lambda: handlers.from_file(str(media["toolong.wav"])))


def test_bad_urls(handlers, media):
    assert "paste the URL" in error_message(lambda: handlers.from_url(""))
    assert "file:// URLs and local paths are refused" in error_message(lambda: handlers.from_url("file:///etc/passwd"))
    assert "refused" in error_message(lambda: handlers.from_url(str(media["speech.mp3"])))
    for bad in ("http://[::1", "https://example.org:99999/v", "http://[::1]:port/"):
        assert error_message(lambda: handlers.from_url(bad)).startswith(f"not a web address: {bad!r} (")
    with Server(media["speech.mp3"].parent) as server:
        assert "404" in error_message(lambda: handlers.from_url(f"{server.url}/nothing.mp4"))
        assert "limit" in error_message(lambda: handlers.from_url(f"{server.url}/toolong.wav"))


def test_private_urls_are_refused_by_default(handlers, media):
    public = Handlers(handlers.transcriber, load_config(None), handlers.out_dir)
    with Server(media["speech.mp3"].parent) as server:
        port = server.url.rsplit(":", 1)[1]
        for url in (f"{server.url}/speech.mp3", f"http://localhost:{port}/speech.mp3"):
            assert "not on the public internet (loopback address)" in error_message(lambda: public.from_url(url))
    assert "link-local" in error_message(lambda: public.from_url("http://169.254.169.254/latest/meta-data/"))


def test_a_request_has_one_deadline(handlers, media):
    """A stream that never ends stops at app.request_timeout_seconds; the page answers."""
    quick = Handlers(handlers.transcriber, load_config(None, ["app.allow_private_urls=true",
                                                               "app.request_timeout_seconds=1.5"]), handlers.out_dir)
    with Server(media["speech.mp3"].parent) as server:
        start = time.monotonic()
        message = error_message(lambda: quick.from_url(f"{server.url}/stream/trickle.mp3"))
    assert "within 1.5 s (app.request_timeout_seconds)" in message and time.monotonic() - start < 4


def test_a_url_is_downloaded_within_the_apps_limits(tmp_path, monkeypatch):
    """Each of app.max_media_seconds, app.max_download_mb, app.download_timeout_seconds and
    app.allow_private_urls bounds what it names (a 500 MB cap taken for 500 s of media would refuse
    most videos, and the other way round let 3600 MB through), with the request's time left."""
    from whisper_ft import youtube

    seen = []

    def download(url, limits, timeout, cookies_file=""):
        seen.append((url, limits, timeout, cookies_file))
        raise youtube.MediaError("recorded")

    monkeypatch.setattr(youtube, "download_audio", download)
    cfg = load_config(None, ["app.max_media_seconds=61", "app.max_download_mb=7", "app.download_timeout_seconds=33",
                             "app.allow_private_urls=true", "app.request_timeout_seconds=90"])
    assert error_message(lambda: Handlers(Says("hej"), cfg, tmp_path).from_url("https://example.com/v")) == "recorded"
    [(url, limits, timeout, cookies_file)] = seen
    assert limits == youtube.Limits(max_seconds=61, max_mb=7, download_seconds=33, allow_private=True)
    assert url == "https://example.com/v" and 80 < timeout <= 90 and cookies_file == ""


def test_a_busy_model_answers_busy_at_the_deadline(handlers, media, monkeypatch):
    busy = Handlers(handlers.transcriber, load_config(None, ["app.request_timeout_seconds=1"]), handlers.out_dir)
    started, release = threading.Event(), threading.Event()
    transcribe = handlers.transcriber.transcribe

    def slow(*args, **kwargs):
        started.set()
        release.wait(30)
        return transcribe(*args, **kwargs)

    monkeypatch.setattr(handlers.transcriber, "transcribe", slow)
    first = threading.Thread(target=busy.from_file, args=(str(media["speech.wav"]), NO_TRANSLATION))
    first.start()
    assert started.wait(30)
    try:
        assert error_message(lambda: busy.from_file(str(media["speech.wav"]), NO_TRANSLATION)) == BUSY
    finally:
        release.set()
        first.join(30)


def test_url_input(handlers, media, fake_google):
    with Server(media["speech.mp3"].parent) as server:
        text, translation, status, files, chat, history = handlers.from_url(f"{server.url}/video.mp4", GOOGLE, "en")
    assert text and translation and "video" in history[0]["content"]


def test_find_model(tmp_path):
    out = tmp_path / "checkpoints"
    cfg = load_config(None, [f"training.output_dir={out}", "model.name_or_path=openai/whisper-small"])
    base = find_model(cfg)
    assert base.path == "openai/whisper-small" and "not fine-tuned" in base.notice
    for i, run in enumerate(["run-b", "run-a"]):  # run-a is written last, so it is the newest
        (out / run / "best").mkdir(parents=True)
        (out / run / "best" / "config.json").write_text("{}")
        os.utime(out / run / "best", (time.time() + i, time.time() + i))
    (out / "run-c" / "best.tmp").mkdir(parents=True)  # an unfinished save is ignored
    assert newest_best(out) == out / "run-a" / "best"
    assert find_model(cfg).path == str(out / "run-a" / "best") and find_model(cfg).notice == ""
    chosen = load_config(None, [f"training.output_dir={out}", "app.model=/some/model"])
    assert find_model(chosen).path == "/some/model"


def test_the_page_names_the_language_it_transcribes(tmp_path):
    from types import SimpleNamespace

    danish = load_config(None, [f"training.output_dir={tmp_path}", "model.language=da"])
    assert find_model(danish).notice.endswith("which is **not fine-tuned** for Danish.")
    transcriber = SimpleNamespace(backend="transformers", language="no")  # a model fine-tuned for Norwegian
    demo = app.build_app(Handlers(transcriber, danish, tmp_path), "m")
    labels = [b.label for b in demo.blocks.values() if isinstance(b, gr.Audio)]
    assert demo.title == "Norwegian speech to text" and "Record Norwegian speech" in labels
    assert not [b for b in demo.blocks.values() if "Swedish" in str(getattr(b, "value", ""))]


def test_the_translation_target_starts_at_app_translate_to(tmp_path):
    from types import SimpleNamespace

    cfg = load_config(None, ["app.translate_to=de"])
    demo = app.build_app(Handlers(SimpleNamespace(backend="transformers", language="sv"), cfg, tmp_path), "m")
    [target] = [b for b in demo.blocks.values() if isinstance(b, gr.Dropdown)]
    assert target.value == "de"


@pytest.mark.parametrize("override", ["app.max_download_mb=0", "app.request_timeout_seconds=-1", "app.workers=0",
                                      "app.queue_size=0", "app.allow_private_urls=maybe", "app.port=0",
                                      "app.port=65536", "app.port=-1", "app.device=gpu", "app.device=cuda:x",
                                      "app.device=mps"])
def test_app_limits_are_checked_with_the_key_named(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("code, hint", [("zh", "did you mean zh-CN or zh-TW?"), ("he", "iw"), ("xx", "sv")])
def test_an_unknown_translation_target_is_refused_at_load(code, hint):
    """The dropdown sends app.translate_to with every request: Gradio would refuse each one."""
    with pytest.raises(ConfigError, match=rf"^app\.translate_to: '{code}' is not a Google Translate language code") as e:
        load_config(None, [f"app.translate_to={code}"])
    assert hint in str(e.value) and "\n" not in str(e.value)
    assert load_config(None, ["app.translate_to=zh-CN"]).app.translate_to == "zh-CN"


def test_command_line_errors_are_one_line():
    proc = run_cli("inference_app.py", "--model", "/no/such/model", timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in proc.stderr
    proc = run_cli("inference_app.py", "--set", "app.port=notaport", timeout=120)
    assert proc.returncode == 2 and "app.port" in proc.stderr


@pytest.fixture
def launches(monkeypatch):
    """The keyword arguments of every Blocks.launch, which is replaced: nothing is served."""
    calls = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: calls.append(kwargs))
    monkeypatch.delenv(app.AUTH_ENV, raising=False)
    return calls


def test_main_binds_localhost_and_shares_only_on_request(model_dir, launches, caplog):
    import inference_app

    config = str(Path(__file__).parents[1] / "config.yaml")
    with caplog.at_level(logging.WARNING):
        assert inference_app.main(["--model", str(model_dir), "--config", config]) == 0
    assert launches[-1]["server_name"] == "127.0.0.1" and launches[-1]["share"] is False
    assert launches[-1]["server_port"] == 7860 and launches[-1]["auth"] is None
    assert launches[-1]["max_file_size"] == "1gb"  # the upload cap docs/app.md states; Gradio's default has none
    assert "WITHOUT A LOGIN" not in caplog.text
    assert inference_app.main(["--model", str(model_dir), "--config", config, "--host", "0.0.0.0", "--port", "8123",
                               "--share"]) == 0
    assert (launches[-1]["server_name"], launches[-1]["server_port"], launches[-1]["share"]) == ("0.0.0.0", 8123, True)


def test_the_device_flag_sets_app_device(model_dir, launches, capsys, monkeypatch):
    """The page runs on the CPU unless told otherwise; a GPU torch does not see is one line, before
    the model is looked for (a hub id would be downloaded first)."""
    import torch

    import inference_app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    assert inference_app.parse_args(["--device", "cuda:1"]).values == [("app.device", "cuda:1")]
    config = str(Path(__file__).parents[1] / "config.yaml")
    assert load_config(config).app.device == "cpu"
    assert cli.run(inference_app.main, ["--model", "someone/not-cached", "--config", config, "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: app.device is cuda, but torch") and not launches
    assert inference_app.main(["--model", str(model_dir), "--config", config, "--device", "cpu"]) == 0 and launches


@pytest.mark.parametrize("flags", [["--share"], ["--host", "0.0.0.0"], ["--host", "192.168.1.20"], ["--host", "::"]])
def test_sharing_without_a_login_warns_loudly(model_dir, launches, caplog, flags):
    import inference_app

    with caplog.at_level(logging.WARNING):
        assert inference_app.main(["--model", str(model_dir), "--config", str(ROOT / "config.yaml"), *flags]) == 0
    assert "WITHOUT A LOGIN" in caplog.text and "--auth-file" in caplog.text
    assert launches[-1]["auth"] is None
    if flags[0] == "--host":  # as typed, not read as YAML ("::" is a mapping there); IPv6 in brackets for gradio
        assert launches[-1]["server_name"] == ("[::]" if flags[1] == "::" else flags[1])


@pytest.mark.parametrize("host, bound", [("::1", "[::1]"), ("[::1]", "[::1]"), ("localhost", "localhost")])
def test_an_ipv6_loopback_host_is_served_in_brackets_without_a_warning(model_dir, launches, caplog, host, bound):
    import inference_app

    with caplog.at_level(logging.WARNING):
        assert inference_app.main(["--model", str(model_dir), "--config", str(ROOT / "config.yaml"),
                                   "--host", host]) == 0
    assert launches[-1]["server_name"] == bound and "WITHOUT A LOGIN" not in caplog.text


def test_logins_from_the_flag_a_file_or_the_environment(model_dir, launches, caplog, tmp_path, monkeypatch):
    import inference_app

    base = ["--model", str(model_dir), "--config", str(ROOT / "config.yaml"), "--share"]
    logins = tmp_path / "logins.txt"
    # saved by Windows Notepad: a byte-order mark and CRLF line ends
    logins.write_text("anna:hemligt:med:kolon\r\n# who may use the page\r\n\r\nbo:lösen-2\r\n", encoding="utf-8-sig")
    with caplog.at_level(logging.WARNING):
        assert inference_app.main([*base, "--auth", "anna:hemligt"]) == 0
        assert launches[-1]["auth"] == [("anna", "hemligt")]
        assert inference_app.main([*base, "--auth-file", str(logins)]) == 0
        assert launches[-1]["auth"] == [("anna", "hemligt:med:kolon"), ("bo", "lösen-2")]
        monkeypatch.setenv(app.AUTH_ENV, "cecilia:från-miljön")
        assert inference_app.main(base) == 0
        assert launches[-1]["auth"] == [("cecilia", "från-miljön")]
    assert "WITHOUT A LOGIN" not in caplog.text and launches[-1]["share"] is True


@pytest.mark.parametrize("flags, message", [
    (["--auth", "anna"], "error: --auth: expected USER:PASSWORD"),
    (["--auth", ":hemligt"], "error: --auth: expected USER:PASSWORD"),
    (["--share", "--auth", ""], "error: --auth: expected USER:PASSWORD"),  # --auth "$LOGIN", the variable unset
    (["--share", "--auth-file", ""],
     "error: --auth-file: expected the path of a file of USER:PASSWORD lines, got an empty value"),
    (["--auth-file", "/no/such/logins.txt"], "error: app.auth_file: /no/such/logins.txt does not exist"),
    (["--auth-file", "/"], "error: app.auth_file: cannot read /: Is a directory")])
def test_a_bad_login_setting_is_a_one_line_error(model_dir, launches, capsys, flags, message):
    import inference_app

    code = cli.run(inference_app.main, ["--model", str(model_dir), "--config", str(ROOT / "config.yaml"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == message + (", both parts non-empty" if "--auth:" in message else "")
    assert "hemligt" not in err and launches == []



def test_an_auth_file_in_another_encoding_is_a_one_line_error(model_dir, launches, capsys, tmp_path):
    import inference_app

    logins = tmp_path / "logins.txt"
    logins.write_bytes("anna:hemligt-lösen\n".encode("latin-1"))  # saved by an editor in Latin-1
    code = cli.run(inference_app.main, ["--model", str(model_dir), "--config", str(ROOT / "config.yaml"),
                                        "--auth-file", str(logins)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"error: app.auth_file: {logins} is not UTF-8 text; save it as UTF-8"
    assert "hemligt" not in err and launches == []


def test_a_port_that_cannot_be_opened_is_a_one_line_error(model_dir, capsys):
    import socket

    import inference_app

    with socket.socket() as taken:  # another program on the port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = cli.run(inference_app.main, ["--model", str(model_dir), "--config", str(ROOT / "config.yaml"),
                                            "--port", str(port)])
    err = capsys.readouterr().err.strip()  # after the model's loading bar
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"error: cannot serve the page on host 127.0.0.1, port {port}: another program "
                                    "uses the port or the host is no address of this machine; choose another --port "
                                    "(or --host)")


def test_a_port_out_of_range_is_refused_before_the_model_loads(capsys):
    import inference_app

    for port in ("99999", "-1"):
        code = cli.run(inference_app.main, ["--model", "/no/such/model", "--config", str(ROOT / "config.yaml"),
                                            "--port", port])
        assert code == 2 and capsys.readouterr().err.strip() == f"error: app.port: must be from 1 to 65535, got {port}"


def test_ctrl_c_while_the_page_starts_is_one_line_without_a_resume_hint(model_dir, launches, monkeypatch, capsys):
    """A page has no work to go on with: `interrupted`, not the pipelines' "rerun the same command"."""
    import runpy
    import sys

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(app, "find_model", interrupted)  # Ctrl-C while the model is found and loaded
    monkeypatch.setattr(sys, "argv", ["inference_app.py", "--model", str(model_dir),
                                      "--config", str(ROOT / "config.yaml")])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "inference_app.py"), run_name="__main__")
    assert stop.value.code == 130 and capsys.readouterr().err == "interrupted\n" and launches == []


@pytest.fixture
def server(model_dir, tmp_path):
    """`python inference_app.py` in a subprocess on 127.0.0.1, offline for translation, with its
    temporary files (TMPDIR) and Gradio's cache under tmp_path: (url, process, tmp_path)."""
    import socket
    import sys
    import urllib.request

    port, dead = free_port(), free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "TMPDIR": str(tmp_path / "tmp"), "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
           "HTTPS_PROXY": f"http://127.0.0.1:{dead}", "https_proxy": f"http://127.0.0.1:{dead}", "NO_PROXY": "127.0.0.1",
           "no_proxy": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "inference_app.py"), "--model", str(model_dir), "--port",
                             str(port), "--set", f"app.max_media_seconds={MAX_SECONDS}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"inference_app.py exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except (OSError, socket.timeout):
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("inference_app.py did not start serving within 180 s")
    yield url, proc, tmp_path
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def test_gradio_client_api(server, media):
    """The real command line serves the API; Google is unreachable, so the note shows instead."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    url, proc, tmp = server
    client = Client(url, verbose=False)
    text, translation, status, files, chat = client.predict(handle_file(str(media["speech.mp3"])), GOOGLE, "en",
                                                           False, api_name="/transcribe_file")
    assert text and translation == "" and "real-time factor" in status and "Translation failed" in status
    assert sorted(Path(f["name"] if isinstance(f, dict) else f).suffix for f in files) == [".srt", ".txt"]
    with pytest.raises(AppError, match="silent"):
        client.predict(handle_file(str(media["silence.wav"])), GOOGLE, "en", False, api_name="/transcribe_file")
    with pytest.raises(AppError, match="refused"):
        client.predict("file:///etc/passwd", GOOGLE, "en", False, api_name="/transcribe_url")
    # The page keeps serving, and concurrent visitors are queued, not refused.
    speech = handle_file(str(media["speech.mp3"]))
    jobs = [client.submit(speech, NO_TRANSLATION, "en", False, api_name="/transcribe_file") for _ in range(3)]
    assert all(job.result(timeout=120)[0] for job in jobs)

    # Stopped as `kill`, `docker stop` and systemd stop it (SIGTERM), the server deletes the
    # people's speech and transcripts it holds on disk: its own folder and Gradio's cache
    # (where Gradio's emptied upload buffers stay behind).
    def kept():
        files = [*(tmp / "tmp").rglob("*"), *(tmp / "gradio").rglob("*")]
        return sorted(p.name for p in files if p.is_file() and p.stat().st_size)

    assert {".txt", ".srt", ".mp3"} <= {Path(name).suffix for name in kept()}
    proc.terminate()
    assert proc.wait(timeout=60) == 0
    assert kept() == []


@pytest.mark.slow
def test_real_model_two_minutes_end_to_end(real_model_dir, tmp_path, fake_google):
    """The app's default path: the checkpoint exported to CTranslate2 int8, then transcribed."""
    from bench.bench_inference import link_model, make_recording
    from whisper_ft import ct2
    from whisper_ft.metrics import wer_normalized
    from whisper_ft.transcribe import CT2Transcriber

    (tmp_path / "speech").mkdir()
    wave, spoken = make_recording((Path(__file__).parent / "fixtures" / "sv-sentences.txt").read_text(
        encoding="utf-8").splitlines(), 120, tmp_path / "speech")
    wav = tmp_path / "two-minutes.wav"
    sf.write(wav, wave, 16000)
    model = link_model(real_model_dir, tmp_path)
    ct2.export(model)
    transcriber = load_transcriber(str(model))
    assert isinstance(transcriber, CT2Transcriber)
    handlers = Handlers(transcriber, load_config(None), tmp_path / "out")
    text, translation, status, files, *_ = handlers.from_file(str(wav), GOOGLE, "en", True, [])
    assert 115 < len(wave) / 16000 < 140
    error = wer_normalized([spoken], [text])
    print(f"WER {error:.3f}; {status}")
    assert error < 0.8, text  # whisper-base on espeak-ng speech is poor, but it must follow the speech
    assert translation == f"[en] {text}"
    assert Path(files[1]).read_text(encoding="utf-8").count("-->") > 5


def test_transcript_files_are_removed_after_an_hour_without_another_request(cfg, tmp_path, monkeypatch):
    """Old files were removed only when a later request wrote new ones: on a quiet page a
    visitor's transcript stayed until the process ended, not the hour docs/app.md promises."""
    monkeypatch.setattr(app, "CLEAN_EVERY", 0.05)
    handlers = Handlers(None, cfg, tmp_path)
    files, note = handlers._write_files(Transcript("hej då", (), 1.0, 0.1))
    assert len(files) == 2 and not note
    for f in files:
        os.utime(f, (time.time() - 2 * app.DOWNLOAD_MAX_AGE,) * 2)
    for _ in range(100):
        if not any(Path(f).exists() for f in files):
            break
        time.sleep(0.05)
    assert not any(Path(f).exists() for f in files)
    cleaner = handlers._cleaner
    handlers._write_files(Transcript("igen", (), 1.0, 0.1))  # one cleaner per page, however many files
    assert handlers._cleaner is cleaner and cleaner.is_alive()


def test_cleanup_tolerates_a_transcript_another_request_removed(tmp_path, monkeypatch):
    old = tmp_path / "transcript-old.txt"
    old.write_text("x")
    os.utime(old, (0, 0))
    gone = tmp_path / "transcript-gone.txt"  # listed, then removed by a request cleaning up at the same moment
    monkeypatch.setattr(Path, "glob", lambda self, pattern: iter([gone, old]))
    app._remove_old(tmp_path, 3600)
    assert not old.exists()


def test_a_request_leaves_other_visitors_recent_transcripts(cfg, tmp_path):
    """A request removes transcript files older than DOWNLOAD_MAX_AGE, not the files another visitor
    got a minute ago and has yet to download."""
    handlers = Handlers(None, cfg, tmp_path)
    others, _ = handlers._write_files(Transcript("hej då", (), 1.0, 0.1))
    for f in others:
        os.utime(f, (time.time() - 60,) * 2)
    mine, _ = handlers._write_files(Transcript("igen", (), 1.0, 0.1))
    assert all(Path(f).exists() for f in [*others, *mine])
