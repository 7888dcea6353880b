"""Load and abuse, on 127.0.0.1 only: 20 concurrent clients of the page's HTTP API mix good
uploads and URLs, bad files, oversized media, streams that never end and private-address URLs.
Every good request is answered, every bad one gets a clear error, the page keeps serving, and
afterwards no temporary file, child process or busy thread is left and memory is back near its
start. A second test fills the queue and is told the page is busy, and a third finds no route
around the queue.

Two pages share the run: one as deployed (private addresses refused) and one for local use
(`app.allow_private_urls`), which alone can fetch from the test's media server on 127.0.0.1.
The figures printed at the end are recorded in docs/app.md.
"""

from __future__ import annotations

import ctypes
import gc
import shutil
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf

from app_helpers import Server, call_api, fast_model, free_port, speech_media, speech_wav
from whisper_ft.app import Handlers, build_app
from whisper_ft.config import load_config
from whisper_ft.transcribe import load_transcriber

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("ffmpeg") is None,
                                reason="espeak-ng and ffmpeg are needed for synthetic speech")

LIMITS = ["app.max_media_seconds=20", "app.max_download_mb=2", "app.download_timeout_seconds=20",
          "app.request_timeout_seconds=60", "app.workers=4", "app.translate_timeout_seconds=1"]
OPTIONS = ["No translation", "en", False, []]  # translator, target language, timestamps, history
SETTLE_SECONDS = 10  # for the media server's stream threads to notice their client has gone
PYTHON_SLACK_MB = 20  # Gradio keeps each visitor's session state: about 4 MB for these 20
RSS_SLACK_MB = 250  # allocator arenas of threads new to the work: +50 to +130 MB measured, less with each burst


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Speech (WAV, MP3, MP4), a 25 s recording (over the 20 s limit), noise, silence and a text file."""
    root = tmp_path_factory.mktemp("load-media")
    speech_media(root)
    speech_wav("Det här är en lång inspelning.", root / "long.wav", repeat=12)  # about 25 s
    (root / "noise.mp3").write_bytes(np.random.default_rng(0).bytes(4096))
    sf.write(root / "silence.wav", np.zeros(3 * 16000, np.float32), 16000)
    (root / "notes.txt").write_text("Inget ljud här.")
    return root


@pytest.fixture(scope="module")
def site(media):
    with Server(media) as server:
        yield server


@pytest.fixture(scope="module")
def pages(tiny_model_dir, tmp_path_factory):
    """{"public": as deployed, "local": allow_private_urls}, each with its own tiny model, on 127.0.0.1."""
    model = fast_model(tiny_model_dir, tmp_path_factory.mktemp("fast-whisper"))
    demos = {}
    for name, private in (("public", "false"), ("local", "true")):
        cfg = load_config(None, [*LIMITS, f"app.allow_private_urls={private}"])
        out = tmp_path_factory.mktemp(f"out-{name}")
        handlers = Handlers(load_transcriber(str(model), use_ctranslate2=False, beam_size=1), cfg, out)
        demos[name] = build_app(handlers, str(model))
        demos[name].launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                           allowed_paths=[str(out)])  # the transcripts, once the temp folder is moved (temp_root)
    yield {name: demo.local_url for name, demo in demos.items()}
    for demo in demos.values():
        demo.close()


def requests_mix(media: Path, site: str) -> list[tuple[str, str, str, Path | None, list, str]]:
    """(kind, page, API, upload, inputs, expected): "" for an answer, else a piece of the error message."""
    port = site.rsplit(":", 1)[1]
    return [
        *[("good upload", "public", "transcribe_file", media / name, OPTIONS, "")
          for name in ("speech.wav", "speech.wav", "speech.mp3", "video.mp4")],
        *[("good upload", "local", "transcribe_file", media / name, OPTIONS, "")
          for name in ("speech.wav", "video.mp4")],
        *[("good URL", "local", "transcribe_url", None, [f"{site}/{name}", *OPTIONS], "")
          for name in ("speech.mp3", "video.mp4")],
        ("bad file", "public", "transcribe_file", media / "noise.mp3", OPTIONS, "could not be read"),
        ("bad file", "public", "transcribe_file", media / "notes.txt", OPTIONS, "Invalid file type"),  # Gradio's check
        ("bad file", "local", "transcribe_file", media / "silence.wav", OPTIONS, "silent"),
        ("oversized", "public", "transcribe_file", media / "long.wav", OPTIONS, "the limit is 20 s"),
        ("oversized", "local", "transcribe_url", None, [f"{site}/long.wav", *OPTIONS], "the limit is 20 s"),
        ("oversized", "local", "transcribe_url", None, [f"{site}/stream/huge.mp3", *OPTIONS], "larger than 2 MB"),
        ("endless stream", "local", "transcribe_url", None, [f"{site}/stream/endless.mp3", *OPTIONS],
         "larger than 2 MB"),
        ("endless stream", "local", "transcribe_url", None, [f"{site}/stream/endless.mp3", *OPTIONS],
         "larger than 2 MB"),
        ("endless stream", "local", "transcribe_url", None, [f"{site}/stream/trickle.mp3", *OPTIONS],
         "did not finish within 20 s"),
        ("private URL", "public", "transcribe_url", None, [f"{site}/speech.mp3", *OPTIONS], "loopback address"),
        ("private URL", "public", "transcribe_url", None, [f"http://localhost:{port}/speech.mp3", *OPTIONS],
         "loopback address"),
        ("private URL", "public", "transcribe_url", None, ["http://169.254.169.254/latest/meta-data/", *OPTIONS],
         "link-local address"),
    ]


def timed_call(pages: dict, request, start: threading.Barrier) -> tuple[str, str, str, float]:
    """(kind, outcome, message or transcript, seconds) of one request, sent when all clients are ready."""
    kind, page, api, upload, inputs, expected = request
    start.wait()
    began = time.perf_counter()
    outcome, payload = call_api(pages[page], api, inputs, upload)
    seconds = time.perf_counter() - began
    return kind, outcome, payload[0] if outcome == "complete" else str(payload), seconds


def resources(temp_root: Path) -> dict:
    """What a request could leave behind: files, child processes, threads, memory (Python's own, as
    traced by tracemalloc, and resident)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back to the system, so that RSS shows what is held
    me = psutil.Process()
    return {"temp": sorted(p.name for p in temp_root.iterdir() if p.name.startswith("whisper-ft-")),
            "children": me.children(recursive=True), "threads": {t.ident: t for t in threading.enumerate()},
            "python_mb": tracemalloc.get_traced_memory()[0] / 1e6, "rss_mb": me.memory_info().rss / 1e6}


def busy_threads(before: dict, after: dict) -> list[str]:
    """Threads started since `before` that are doing something: idle pool workers wait on a queue."""
    frames = sys._current_frames()
    busy = []
    for ident, thread in after.items():
        stack = _stack(frames.get(ident))
        if ident not in before and not any(name in ("get", "wait") for name in stack[:2]):
            busy.append(f"{thread.name}: {' < '.join(stack[:4])}")
    return busy


def _stack(frame) -> list[str]:
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return names


@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    """The app's temporary folders go to an empty directory, so that leftovers can be seen; Gradio's
    uploads stay where the pages put them."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str((Path(tempfile.gettempdir()) / "gradio").resolve()))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def run_together(pages: dict, requests: list) -> tuple[list, float]:
    """Send all `requests` at once, one client each; their results and the wall time."""
    start = threading.Barrier(len(requests))
    began = time.perf_counter()
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda r: timed_call(pages, r, start), requests))
    return results, time.perf_counter() - began


def test_twenty_concurrent_clients_good_and_bad(pages, media, site, temp_root):
    mix = requests_mix(media, site.url)
    assert len(mix) == 20
    # Warm-up: the good requests at once grow the model's, Gradio's and the allocator's pools to size.
    assert all(outcome == "complete" for _, outcome, _, _ in run_together(pages, [r for r in mix if not r[-1]])[0])
    tracemalloc.start()
    try:
        before = resources(temp_root)
        results, wall = run_together(pages, mix)
        for (kind, *_, expected), (_, outcome, message, _) in zip(mix, results):
            assert outcome == ("error" if expected else "complete") and message and expected in message, (
                kind, outcome, message)
        assert "/stream/huge.mp3" in Server.requests()  # the abuse reached the media server
        for page in pages.values():  # still serving
            assert call_api(page, "transcribe_file", OPTIONS, media / "speech.mp3")[0] == "complete"
        after = settled(temp_root, before)
    finally:
        tracemalloc.stop()
    report(mix, results, wall, before, after)
    assert after["temp"] == [] and after["children"] == []
    assert busy_threads(before["threads"], after["threads"]) == []
    assert after["python_mb"] - before["python_mb"] < PYTHON_SLACK_MB
    assert after["rss_mb"] - before["rss_mb"] < RSS_SLACK_MB


def settled(temp_root: Path, before: dict) -> dict:
    """`resources` once the media server's stream threads have noticed that their clients are gone."""
    deadline = time.monotonic() + SETTLE_SECONDS
    after = resources(temp_root)
    while busy_threads(before["threads"], after["threads"]) and time.monotonic() < deadline:
        time.sleep(0.5)
        after = resources(temp_root)
    return after


def report(mix, results, wall: float, before: dict, after: dict) -> None:
    """The figures for docs/app.md, on stdout (pytest -s shows them)."""
    latencies = sorted(seconds for *_, seconds in results)
    errors = Counter(kind for (kind, *_, expected), (_, outcome, _, _) in zip(mix, results) if outcome == "error")
    good = [seconds for (*_, expected), (*_, seconds) in zip(mix, results) if not expected]
    print(f"\nload: {len(results)} requests in {wall:.1f} s; latency p50 {statistics.median(latencies):.1f} s, "
          f"p95 {np.percentile(latencies, 95):.1f} s, max {latencies[-1]:.1f} s; good answered: {len(good)} "
          f"(p50 {statistics.median(good):.1f} s); errors by kind: {dict(errors)}; "
          f"Python heap {before['python_mb']:.1f} -> {after['python_mb']:.1f} MB, resident {before['rss_mb']:.0f} -> "
          f"{after['rss_mb']:.0f} MB; threads {len(before['threads'])} -> {len(after['threads'])}, none busy; "
          f"child processes left {len(after['children'])}")


@pytest.fixture
def one_worker_page(tiny_model_dir, tmp_path):
    """The page's address, served on a free local port with one worker and one place in the queue."""
    cfg = load_config(None, ["app.workers=1", "app.queue_size=1"])
    handlers = Handlers(load_transcriber(str(fast_model(tiny_model_dir, tmp_path / "m")), use_ctranslate2=False,
                                         beam_size=1), cfg, tmp_path / "out")
    demo = build_app(handlers, "tiny")
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield demo.local_url
    demo.close()


def test_a_full_queue_answers_busy(one_worker_page, monkeypatch):
    """One worker busy with a download, one visitor waiting: the next is told to come back.
    The download is held until the busy answer has come, whatever the machine's load."""
    from whisper_ft import youtube

    started, release = threading.Event(), threading.Event()

    def held_download(url, *args, **kwargs):
        started.set()
        release.wait(120)
        raise youtube.MediaError("the download did not finish")

    monkeypatch.setattr(youtube, "download_audio", held_download)
    video = ["https://www.youtube.com/watch?v=held", *OPTIONS]
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(call_api, one_worker_page, "transcribe_url", video)
            assert started.wait(60), "the first request never reached the download"
            second = pool.submit(call_api, one_worker_page, "transcribe_url", video)
            wait_for(lambda: queue_size(one_worker_page) == 1)
            outcome, body = call_api(one_worker_page, "transcribe_url", video)
            assert outcome == "http 503" and "Queue is full" in body
            release.set()
            assert [f.result()[0] for f in (first, second)] == ["error", "error"]
    finally:
        release.set()


def test_no_request_goes_past_the_queue(one_worker_page, monkeypatch):
    """Gradio's /run/ and /api/ routes answer a request at once, outside the queue: a visitor
    could start any number of downloads past app.workers and app.queue_size. They are closed;
    the queued API (/call/, the page's own) answers."""
    import httpx

    from whisper_ft import youtube

    def no_download(url, *args, **kwargs):
        raise youtube.MediaError("no such video")

    monkeypatch.setattr(youtube, "download_audio", no_download)
    video = ["https://www.youtube.com/watch?v=x", *OPTIONS]
    for route in ("run", "api"):
        response = httpx.post(f"{one_worker_page.rstrip('/')}/gradio_api/{route}/transcribe_url",
                              json={"data": video}, timeout=60)
        assert response.status_code == 404, (route, response.status_code, response.text[:200])
    assert call_api(one_worker_page, "transcribe_url", video) == ("error", "no such video")


def queue_size(root: str) -> int:
    import httpx

    return httpx.get(f"{root.rstrip('/')}/gradio_api/queue/status", timeout=10).json()["queue_size"]


def wait_for(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)
