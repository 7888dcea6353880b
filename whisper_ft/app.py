"""The Gradio page of stage 3: transcribe Swedish speech from the microphone, an uploaded file
or a video URL, translate it, and offer the transcript as .txt and .srt.

Built by `inference_app.py`: `find_model` picks the model, `load_transcriber` loads it once,
`Handlers` holds the request logic (tested directly), `build_app` lays out the page. Bad input
raises `gr.Error` with a message for the user; the queue runs one transcription at a time
and lets other visitors wait their turn.
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np

from whisper_ft import translate, youtube
from whisper_ft.audio import SAMPLE_RATE, AudioError, is_silent, load_audio, probe_seconds, to_mono
from whisper_ft.config import Config
from whisper_ft.transcribe import Transcript, load_transcriber, to_srt, to_txt

log = logging.getLogger(__name__)

GOOGLE = "Google Translate (online)"
WHISPER = "Whisper (offline, to English)"
NO_TRANSLATION = "No translation"
TRANSLATORS = (GOOGLE, WHISPER, NO_TRANSLATION)
HISTORY_TURNS = 20  # conversation turns kept on the page per visitor
QUEUE_SIZE = 64  # visitors that may wait; more get "queue full"
DOWNLOAD_MAX_AGE = 3600.0  # seconds a transcript file stays on disk


@dataclass(frozen=True)
class ModelChoice:
    path: str
    notice: str  # shown on the page; empty for a fine-tuned model


def newest_best(output_dir: str | Path) -> Path | None:
    """The newest `<output_dir>/<run>/best/` holding a model, by modification time."""
    root = Path(output_dir)
    found = [p for p in root.glob("*/best") if (p / "config.json").is_file()] if root.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def find_model(cfg: Config) -> ModelChoice:
    """`app.model` if set, else the newest best checkpoint, else the base model with a notice."""
    if cfg.app.model:
        return ModelChoice(cfg.app.model, "")
    best = newest_best(cfg.training.output_dir)
    if best is not None:
        return ModelChoice(str(best), "")
    return ModelChoice(cfg.model.name_or_path,
                       f"No fine-tuned model found under `{cfg.training.output_dir}/`: this page runs the base "
                       f"model `{cfg.model.name_or_path}`, which is **not fine-tuned** for Swedish.")


def load_for_app(choice: ModelChoice, cfg: Config):
    app = cfg.app
    return load_transcriber(choice.path, language=cfg.model.language, chunk_seconds=app.chunk_seconds,
                            stride_seconds=app.stride_seconds, batch_size=app.batch_size,
                            use_ctranslate2=app.use_ctranslate2, beam_size=app.beam_size)


class Handlers:
    """Request logic of the page. Each `from_*` method returns (transcript, translation, status
    markdown, [.txt, .srt paths], chat messages, history state) or raises gr.Error."""

    def __init__(self, transcriber, cfg: Config, out_dir: str | Path | None = None):
        self.transcriber = transcriber
        self.cfg = cfg
        self.language = cfg.model.language
        if not out_dir:
            # Transcripts are people's speech: this folder is removed when the process ends.
            self._tmp = tempfile.TemporaryDirectory(prefix="whisper-ft-app-")
            out_dir = self._tmp.name
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def from_microphone(self, audio, translator=GOOGLE, target="en", timestamps=False, history=None):
        if audio is None:
            raise gr.Error("Record something first: press the microphone button, speak, then stop.")
        sr, data = audio
        try:
            wave = to_mono(data, sr)
        except AudioError as e:
            raise gr.Error(f"The recording could not be read: {e}") from e
        return self._run(wave, "Microphone recording", translator, target, timestamps, history)

    def from_file(self, path, translator=GOOGLE, target="en", timestamps=False, history=None):
        if not path:
            raise gr.Error("Upload an audio or video file first.")
        path = Path(path)
        seconds = probe_seconds(path)  # an over-long upload is refused before decoding
        if seconds is not None and seconds > self.cfg.app.max_media_seconds:
            raise gr.Error(youtube.too_long_message(seconds, self.cfg.app.max_media_seconds))
        try:
            wave = load_audio(path)
        except AudioError as e:
            raise gr.Error(f"{path.name} could not be read as audio or video: {e}") from e
        return self._run(wave, f"File {path.name}", translator, target, timestamps, history)

    def from_url(self, url, translator=GOOGLE, target="en", timestamps=False, history=None):
        try:
            media = youtube.download_audio(url, self.cfg.app.max_media_seconds, self.cfg.app.cookies_file)
        except youtube.MediaError as e:
            raise gr.Error(str(e)) from e
        return self._run(media.wave, f"{media.title} ({media.url})", translator, target, timestamps, history)

    def _run(self, wave: np.ndarray, label: str, translator: str, target: str, timestamps: bool, history):
        seconds = len(wave) / SAMPLE_RATE
        if is_silent(wave):
            raise gr.Error("The audio is empty or silent: nothing to transcribe. Check the microphone or the file.")
        if seconds > self.cfg.app.max_media_seconds:
            raise gr.Error(youtube.too_long_message(seconds, self.cfg.app.max_media_seconds))
        if translator not in TRANSLATORS:
            raise gr.Error(f"Unknown translator {translator!r}; choose one of: {', '.join(TRANSLATORS)}.")
        result = self.transcriber.transcribe(wave, task="transcribe", timestamps=bool(timestamps))
        notes = [_speed_note(result, self.transcriber.backend)]
        if not result.text:
            notes.append("No speech was recognised.")
        translation = ""
        if result.text and translator == GOOGLE:
            translation, note = self._google(result.text, target)
            notes += [note] if note else []
        elif result.text and translator == WHISPER:
            english = self.transcriber.transcribe(wave, task="translate")
            translation = english.text
            notes.append(f"Whisper's translation to English took {english.elapsed_seconds:.1f} s.")
        files = self._write_files(result)
        history = _append_history(history, label, seconds, result.text, translation)
        return result.text, translation, "\n\n".join(notes), files, history, history

    def _google(self, text: str, target: str) -> tuple[str, str]:
        try:
            return translate.translate(text, target, self.language, self.cfg.app.translate_timeout_seconds), ""
        except translate.TranslationError as e:
            log.warning("translation failed: %s", e)
            gr.Warning(f"Translation failed: {e}")
            return "", (f"**Translation failed:** {e}. The transcript above is complete; choose "
                        f"“{WHISPER}” to translate without network access.")

    def _write_files(self, result: Transcript) -> list[str]:
        _remove_old(self.out_dir, DOWNLOAD_MAX_AGE)
        stem = self.out_dir / f"transcript-{uuid.uuid4().hex[:8]}"
        txt, srt = stem.with_suffix(".txt"), stem.with_suffix(".srt")
        txt.write_text(to_txt(result), encoding="utf-8")
        srt.write_text(to_srt(result), encoding="utf-8")
        return [str(txt), str(srt)]


def _speed_note(result: Transcript, backend: str) -> str:
    return (f"Transcribed {result.audio_seconds:.1f} s of audio in {result.elapsed_seconds:.1f} s: "
            f"**real-time factor {result.rtf:.2f}** ({backend}).")


def _append_history(history, label: str, seconds: float, text: str, translation: str) -> list[dict]:
    history = list(history or [])
    answer = text or "(no speech recognised)"
    if translation:
        answer += f"\n\n*Translation:* {translation}"
    history += [{"role": "user", "content": f"{label}, {seconds:.1f} s"}, {"role": "assistant", "content": answer}]
    return history[-2 * HISTORY_TURNS:]


def _remove_old(folder: Path, max_age: float) -> None:
    cutoff = time.time() - max_age
    for p in folder.glob("transcript-*"):
        if p.stat().st_mtime < cutoff:
            p.unlink(missing_ok=True)


def build_app(handlers: Handlers, model_name: str, notice: str = "") -> gr.Blocks:
    """The page: inputs in tabs, shared options, transcript, translation, downloads and history."""
    cfg = handlers.cfg.app
    # Uploads and transcripts in Gradio's cache are people's speech: delete them after an hour.
    with gr.Blocks(title="Swedish Whisper", delete_cache=(int(DOWNLOAD_MAX_AGE), int(DOWNLOAD_MAX_AGE))) as demo:
        gr.Markdown(f"# Swedish speech to text\nModel: `{model_name}` ({handlers.transcriber.backend})")
        if notice:
            gr.Markdown(f"**Notice:** {notice}", elem_id="model-notice")
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tab("Microphone"):
                    mic = gr.Audio(sources=["microphone"], type="numpy", label="Record Swedish speech")
                    mic_button = gr.Button("Transcribe recording", variant="primary")
                with gr.Tab("File"):
                    upload = gr.File(label="Audio or video file", file_types=["audio", "video"], type="filepath",
                                     elem_id="upload")
                    file_button = gr.Button("Transcribe file", variant="primary", elem_id="transcribe-file")
                with gr.Tab("Video URL"):
                    url = gr.Textbox(label="YouTube or other video URL",
                                     placeholder="https://www.youtube.com/watch?v=...")
                    url_button = gr.Button("Transcribe video", variant="primary")
            with gr.Column(scale=2):
                translator = gr.Radio(list(TRANSLATORS), value=GOOGLE, label="Translation")
                target = gr.Dropdown(list(translate.LANGUAGES.items()), value=cfg.translate_to,
                                     label="Translate to (Google)")
                timestamps = gr.Checkbox(False, label="Timestamps")
        status = gr.Markdown(elem_id="status")
        transcript = gr.Textbox(label="Transcript", lines=6, elem_id="transcript")
        translation = gr.Textbox(label="Translation", lines=6, elem_id="translation")
        downloads = gr.File(label="Download transcript (.txt, .srt)", file_count="multiple", elem_id="downloads")
        chat = gr.Chatbot(label="History", elem_id="history")
        options = [translator, target, timestamps, history]
        outputs = [transcript, translation, status, downloads, chat, history]
        mic_button.click(handlers.from_microphone, [mic, *options], outputs, api_name="transcribe_microphone")
        file_button.click(handlers.from_file, [upload, *options], outputs, api_name="transcribe_file")
        url_button.click(handlers.from_url, [url, *options], outputs, api_name="transcribe_url")
    # One model, one transcription at a time; other visitors wait in the queue.
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    return demo
