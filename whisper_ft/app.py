"""The Gradio page of stage 3: transcribe speech (Swedish by default) from the microphone, an
uploaded file or a video URL, translate it, and offer the transcript as .txt and .srt.

Built by `inference_app.py`: `find_model` picks the model, `load_app_transcriber` loads it once,
`Handlers` holds the request logic (tested directly), `build_app` lays out the page,
`read_logins` and `exposure_warning` decide about the login, `serve` opens the page. Bad input
raises `gr.Error` with a message for the user. The page is safe to share: each request has a
deadline (`app.request_timeout_seconds`) and bounded work (length, download size and time, see
`whisper_ft.youtube`); `app.workers` requests run at once, downloading and decoding side by
side, transcribing one at a time; a full queue tells visitors the page is busy.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
from gradio_client import utils as client_utils

from whisper_ft import child, translate, youtube
from whisper_ft.audio import MEDIA_EXTENSIONS, SAMPLE_RATE, AudioError, TooLong, is_silent, load_audio, probe_seconds
from whisper_ft.config import AppConfig, Config
from whisper_ft.errors import UserError
from whisper_ft.model import language_name
from whisper_ft.transcribe import Transcript, to_srt, to_txt

log = logging.getLogger(__name__)

GOOGLE = "Google Translate (online)"
WHISPER = "Whisper (offline, to English)"
NO_TRANSLATION = "No translation"
TRANSLATORS = (GOOGLE, WHISPER, NO_TRANSLATION)
HISTORY_TURNS = 20  # conversation turns kept on the page per visitor
DOWNLOAD_MAX_AGE = 3600.0  # seconds a transcript file stays on disk
CLEAN_EVERY = 600.0  # seconds between removals of older transcript files (and of Gradio's cached files)
PROBE_TIMEOUT = 20.0  # seconds for ffprobe to read an upload's duration
AUTH_ENV = "WHISPER_APP_AUTH"  # USER:PASSWORD, for a login kept out of the shell history
BUSY = "The page is busy with other visitors' recordings; try again in a few minutes."


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
                       f"model `{cfg.model.name_or_path}`, which is **not fine-tuned** for "
                       f"{language_name(cfg.model.language)}.")


class Handlers:
    """Request logic of the page. Each `from_*` method returns (transcript, translation, status
    markdown, [.txt, .srt paths] or [] when no speech was recognised or the files could not be
    written, chat messages, history state) or raises gr.Error."""

    def __init__(self, transcriber, cfg: Config, out_dir: str | Path | None = None):
        self.transcriber = transcriber
        self.cfg = cfg
        self.language = getattr(transcriber, "language", cfg.model.language)  # the served model's own
        self._model_lock = threading.Lock()  # one transcription at a time; downloads and decoding run side by side
        if not out_dir:
            # Transcripts are people's speech: this folder is removed when the process ends.
            self._tmp = tempfile.TemporaryDirectory(prefix="whisper-ft-app-")
            out_dir = self._tmp.name
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._cleaner: threading.Thread | None = None

    def from_microphone(self, path, translator=GOOGLE, target="en", timestamps=False, history=None):
        deadline = self._deadline()
        if not path:
            raise gr.Error("Record something first: press the microphone button, speak, then stop.")
        wave = self._decode(Path(path), "The recording", deadline)
        return self._run(wave, "Microphone recording", translator, target, timestamps, history, deadline)

    def from_file(self, path, translator=GOOGLE, target="en", timestamps=False, history=None):
        deadline = self._deadline()
        if not path:
            raise gr.Error("Upload an audio or video file first.")
        path = Path(path)
        wave = self._decode(path, path.name, deadline)
        return self._run(wave, f"File {path.name}", translator, target, timestamps, history, deadline)

    def _decode(self, path: Path, what: str, deadline: float):
        """An uploaded file (or the browser's recording) as 16 kHz mono, refused by its header
        before decoding when too long, and never decoded past the limit (the API accepts any file
        as a "recording")."""
        max_seconds = self.cfg.app.max_media_seconds
        seconds = probe_seconds(path, min(PROBE_TIMEOUT, self._left(deadline)))  # refused before decoding
        if seconds is not None and seconds > max_seconds:
            raise gr.Error(youtube.too_long_message(seconds, max_seconds))
        try:
            return load_audio(path, max_seconds=max_seconds, timeout=self._left(deadline))
        except TooLong as e:
            raise gr.Error(youtube.too_long_message(e.seconds, max_seconds)) from e
        except AudioError as e:
            raise gr.Error(f"{what} could not be read as audio or video: {e}") from e

    def from_url(self, url, translator=GOOGLE, target="en", timestamps=False, history=None):
        deadline = self._deadline()
        app = self.cfg.app
        limits = youtube.Limits(app.max_media_seconds, app.max_download_mb, app.download_timeout_seconds,
                                app.allow_private_urls)
        try:
            media = youtube.download_audio(url, limits, self._left(deadline), app.cookies_file)
        except youtube.MediaError as e:
            raise gr.Error(str(e)) from e
        except child.ChildFailed as e:  # a bug, for the log
            log.error("the download process crashed: %s", e)
            raise gr.Error("The download failed unexpectedly (the app's log says why); try again, or download "
                           "the video yourself and upload the file.") from e
        return self._run(media.wave, f"{media.title} ({media.url})", translator, target, timestamps, history,
                         deadline)

    def _deadline(self) -> float:
        return time.monotonic() + self.cfg.app.request_timeout_seconds

    def _left(self, deadline: float) -> float:
        """Seconds left before `deadline`; gr.Error once it has passed."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise gr.Error(f"The request took longer than {self.cfg.app.request_timeout_seconds:.0f} s "
                           "(app.request_timeout_seconds) and was stopped; try a shorter recording.")
        return left

    @contextmanager
    def _model(self, deadline: float):
        """Hold the model, waiting for other visitors' transcriptions at most until `deadline`."""
        if not self._model_lock.acquire(timeout=self._left(deadline)):
            raise gr.Error(BUSY)
        try:
            yield self.transcriber
        finally:
            self._model_lock.release()

    def _run(self, wave: np.ndarray, label: str, translator: str, target: str, timestamps: bool, history,
             deadline: float):
        seconds = len(wave) / SAMPLE_RATE
        if is_silent(wave):
            raise gr.Error("The audio is empty or silent: nothing to transcribe. Check the microphone or the file.")
        if seconds > self.cfg.app.max_media_seconds:
            raise gr.Error(youtube.too_long_message(seconds, self.cfg.app.max_media_seconds))
        if translator not in TRANSLATORS:
            raise gr.Error(f"Unknown translator {translator!r}; choose one of: {', '.join(TRANSLATORS)}.")
        with self._model(deadline) as model:
            result = model.transcribe(wave, task="transcribe", timestamps=bool(timestamps))
            english = model.transcribe(wave, task="translate") if result.text and translator == WHISPER else None
        notes = [_speed_note(result, self.transcriber.backend)]
        if not result.text:
            notes.append("No speech was recognised.")
        translation = ""
        if result.text and translator == GOOGLE:
            translation, note = self._google(result.text, target, deadline - time.monotonic())
            notes += [note] if note else []
        elif english is not None:
            translation = english.text
            notes.append(f"Whisper's translation to English took {english.elapsed_seconds:.1f} s.")
        files = []  # nothing to download without speech
        if result.text:
            files, note = self._write_files(result)
            notes += [note] if note else []
        history = _append_history(history, label, seconds, result.text, translation)
        return result.text, translation, "\n\n".join(notes), files, history, history

    def _google(self, text: str, target: str, seconds_left: float) -> tuple[str, str]:
        timeout = min(self.cfg.app.translate_timeout_seconds, seconds_left)
        try:
            if timeout <= 0:
                raise translate.TranslationError("no time was left for it (app.request_timeout_seconds)")
            return translate.translate(text, target, self.language, timeout), ""
        except translate.TranslationError as e:
            log.warning("translation failed: %s", e)
            reason = str(e)
        except child.ChildFailed as e:  # a bug, for the log; the visitor still gets the transcript
            log.error("the translation process crashed: %s", e)
            reason = "the translation process crashed (the app's log says why)"
        gr.Warning(f"Translation failed: {reason}")
        return "", (f"**Translation failed:** {reason}. The transcript above is complete; choose "
                    f"“{WHISPER}” to translate without network access.")

    def _write_files(self, result: Transcript) -> tuple[list[str], str]:
        """The .txt and .srt downloads, and a status note; a disk that cannot take them (full, or
        removed) costs the visitor the downloads, not the transcript already computed."""
        stem = self.out_dir / f"transcript-{uuid.uuid4().hex[:8]}"
        txt, srt = stem.with_suffix(".txt"), stem.with_suffix(".srt")
        self._start_cleaner()
        try:
            _remove_old(self.out_dir, DOWNLOAD_MAX_AGE)
            txt.write_text(to_txt(result), encoding="utf-8")
            srt.write_text(to_srt(result), encoding="utf-8")
        except OSError as e:
            log.warning("the transcript files could not be written in %s: %s", self.out_dir, e)
            for p in (txt, srt):  # no half of a download
                p.unlink(missing_ok=True)
            reason = e.strerror or str(e)
            gr.Warning(f"The transcript files could not be written: {reason}")
            return [], (f"**No download files:** they could not be written ({reason}). The transcript above is "
                        "complete; copy it from the page.")
        return [str(txt), str(srt)], ""

    def _start_cleaner(self) -> None:
        """Transcript files are removed an hour after they were written, also when no request comes
        to find them: a thread that looks every CLEAN_EVERY seconds, started by the first file."""
        if self._cleaner is not None:
            return

        def clean(folder: Path = self.out_dir) -> None:
            while True:
                time.sleep(CLEAN_EVERY)
                try:
                    _remove_old(folder, DOWNLOAD_MAX_AGE)
                except OSError as e:  # the folder removed with the process's temporary folder
                    log.debug("transcript files not cleaned up: %s", e)

        self._cleaner = threading.Thread(target=clean, name="transcript-cleaner", daemon=True)
        self._cleaner.start()


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
        try:
            if p.stat().st_mtime < cutoff:
                p.unlink(missing_ok=True)
        except FileNotFoundError:  # removed by a request cleaning up at the same moment
            pass


def uploads_only(component):
    """`component` (a file input of the page) refusing a URL sent in its place: Gradio fetches such
    a URL, with no limit on size or time, before any handler runs. A URL goes in the Video URL
    tab, with its limits (`whisper_ft.youtube`). Set on the instance: a subclass of a Gradio
    component would make Gradio write a type stub beside this module."""
    move = component.async_move_resource_to_block_cache

    async def checked(url_or_file_path):
        if url_or_file_path is not None and client_utils.is_http_url_like(str(url_or_file_path)):
            raise gr.Error("Send the file itself: a URL goes in the Video URL tab.")
        return await move(url_or_file_path)

    component.async_move_resource_to_block_cache = checked
    return component


def build_app(handlers: Handlers, model_name: str, notice: str = "") -> gr.Blocks:
    """The page: inputs in tabs, shared options, transcript, translation, downloads and history."""
    cfg = handlers.cfg.app
    # Uploads and transcripts in Gradio's cache are people's speech: delete them after an hour.
    title = f"{language_name(handlers.language)} speech to text"
    with gr.Blocks(title=title, delete_cache=(int(CLEAN_EVERY), int(DOWNLOAD_MAX_AGE))) as demo:
        gr.Markdown(f"# {title}\nModel: `{model_name}` ({handlers.transcriber.backend})")
        if notice:
            gr.Markdown(f"**Notice:** {notice}", elem_id="model-notice")
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tab("Microphone"):
                    # a file path, decoded like an upload: anyone can post any file to this endpoint
                    mic = uploads_only(gr.Audio(sources=["microphone"], type="filepath",
                                                label=f"Record {language_name(handlers.language)} speech"))
                    mic_button = gr.Button("Transcribe recording", variant="primary")
                with gr.Tab("File"):
                    # every container the decoder reads, by name: gradio refuses the others at upload
                    upload = uploads_only(gr.File(label="Audio or video file",
                                                  file_types=["audio", "video", *MEDIA_EXTENSIONS], type="filepath",
                                                  elem_id="upload"))
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
        # app.workers requests at once over the three (Handlers transcribes one at a time)
        shared = {"concurrency_id": "transcribe", "concurrency_limit": cfg.workers}
        mic_button.click(handlers.from_microphone, [mic, *options], outputs, api_name="transcribe_microphone", **shared)
        file_button.click(handlers.from_file, [upload, *options], outputs, api_name="transcribe_file", **shared)
        url_button.click(handlers.from_url, [url, *options], outputs, api_name="transcribe_url", **shared)
    # a full queue answers "busy, try again"; without api_open=False, Gradio's /run/ route would
    # run a request at once, past the queue and app.workers (it is closed on Spaces only)
    demo.queue(max_size=cfg.queue_size, api_open=False)
    return demo


class ServeError(UserError):
    """The page cannot be served where asked."""


def serve(demo: gr.Blocks, app: AppConfig, logins: list[tuple[str, str]]) -> None:
    """Serve the page on app.host:app.port (and a gradio.live link with app.share) until stopped
    by Ctrl-C or SIGTERM (`kill`, `docker stop`, systemd), which both close the server, so that
    the uploads and transcripts on disk are deleted as the process ends."""
    with _sigterm_as_interrupt():
        try:
            demo.launch(server_name=bind_name(app.host), server_port=app.port, share=app.share, max_file_size="1gb",
                        auth=logins or None, auth_message=f"{demo.title}: sign in")
        except OSError as e:
            if demo.is_running:  # the server was up: not a matter of the address
                raise
            raise ServeError(f"cannot serve the page on host {app.host}, port {app.port}: another program uses the "
                             "port or the host is no address of this machine; choose another --port (or --host)") from e
    # Gradio deletes its cache when its server shuts down, but waits for open pages to
    # disconnect first and the process ends before that: delete it here, as Gradio would.
    from gradio.route_utils import delete_files_created_by_app

    delete_files_created_by_app(demo, age=None)


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does: Gradio then closes
    the server and deletes its cache, and the interpreter's exit removes the transcript folder.
    By default SIGTERM ends the process on the spot and leaves both on disk."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def bind_name(host: str) -> str:
    """`host` as gradio takes it: an IPv6 address in brackets (gradio writes its own URL from it)."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:  # a name, or already in brackets
        return host


class AuthError(UserError):
    """A login setting that cannot be used; the message never repeats the password."""


def read_logins(auth: str | None, auth_file: str, environ) -> list[tuple[str, str]]:
    """Logins for the page: `--auth USER:PASSWORD`, else the lines of `auth_file` (app.auth_file,
    --auth-file; blank lines and # comments skipped), else $WHISPER_APP_AUTH; [] when none is set.
    An `--auth ""` given (`--auth "$LOGIN"` with the variable unset) is refused, not taken for no
    login: the page would go public without one."""
    if auth is not None:
        return [parse_login(auth, "--auth")]
    if auth_file:
        path = Path(auth_file).expanduser()
        if not path.exists():
            raise AuthError(f"app.auth_file: {auth_file} does not exist")
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Notepad's UTF-8) is no user name
        except UnicodeDecodeError as e:  # the message would quote the bytes, perhaps of a password
            raise AuthError(f"app.auth_file: {auth_file} is not UTF-8 text; save it as UTF-8") from e
        except OSError as e:
            raise AuthError(f"app.auth_file: cannot read {auth_file}: {e.strerror or e}") from e
        lines = [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1)]
        logins = [parse_login(line, f"{auth_file}, line {i}") for i, line in lines
                  if line and not line.startswith("#")]
        if not logins:
            raise AuthError(f"app.auth_file: {auth_file} holds no USER:PASSWORD line")
        return logins
    if environ.get(AUTH_ENV):
        return [parse_login(environ[AUTH_ENV], AUTH_ENV)]
    return []


def parse_login(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.strip().partition(":")
    if not sep or not user.strip() or not password:
        raise AuthError(f"{where}: expected USER:PASSWORD, both parts non-empty")
    return user.strip(), password


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.1, ::1 or [::1], localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def exposure_warning(app: AppConfig, logins: list) -> str:
    """A loud warning when the page is reachable from other machines without a login; "" otherwise."""
    if logins or (not app.share and is_loopback(app.host)):
        return ""
    where = "on a public gradio.live link" if app.share else f"on {app.host}, reachable from other machines"
    bar = "!" * 100
    return (f"\n{bar}\n  The page is {where} WITHOUT A LOGIN: anyone who finds it can use this machine.\n"
            f"  Set one with --auth-file PATH (USER:PASSWORD lines), ${AUTH_ENV}=USER:PASSWORD or "
            f"--auth USER:PASSWORD.\n{bar}")
