"""Helpers for the app tests: a tiny Whisper that stops after a few tokens (fast on CPU),
synthetic Swedish speech files, a local HTTP server for yt-dlp (with streams that never end),
and a client of the page's HTTP API."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf

MAX_TOKENS = 12  # a random model never stops by itself; cap generation to keep tests fast


def fast_model(tiny_model_dir: Path, out: Path) -> Path:
    """Copy of the tiny random model whose generation stops after MAX_TOKENS tokens."""
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    gen_file = out / "generation_config.json"
    gen = json.loads(gen_file.read_text())
    gen["max_length"] = MAX_TOKENS
    gen_file.write_text(json.dumps(gen))
    return out


def speech_wav(text: str, out: Path, voice: str = "sv", repeat: int = 1) -> Path:
    """Swedish speech by espeak-ng (22.05 kHz WAV), `repeat` times in a row."""
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(out), text], check=True, capture_output=True)
    if repeat > 1:
        wave, sr = sf.read(out)
        sf.write(out, np.tile(wave, repeat), sr)
    return out


FFMPEG = ["ffmpeg", "-nostdin", "-v", "error", "-y"]


def speech_media(root: Path) -> Path:
    """A short Swedish sentence as speech.wav, speech.mp3 (48 kHz) and video.mp4 (the speech under
    a black picture) in `root`; returns the WAV."""
    wav = speech_wav("Hej, jag heter Anna och jag bor i Stockholm.", root / "speech.wav")
    subprocess.run([*FFMPEG, "-i", str(wav), "-ar", "48000", "-c:a", "libmp3lame", str(root / "speech.mp3")],
                   check=True)
    subprocess.run([*FFMPEG, "-f", "lavfi", "-i", "color=c=black:s=64x64:d=4", "-i", str(wav), "-shortest",
                    "-c:v", "libx264", "-c:a", "aac", str(root / "video.mp4")], check=True)
    return wav


class Server:
    """`python -m http.server` in a thread, bound to 127.0.0.1, serving `root`, plus three MP3 streams
    that abuse a downloader: /stream/endless.mp3 (no length, never ends), /stream/trickle.mp3 (a byte
    every 0.2 s, never ends) and /stream/huge.mp3 (announces 10 GB); and a web page that is a gzip
    bomb, /page/bomb.html."""

    def __init__(self, root: Path):
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def requests() -> list[str]:
        """Paths requested from any Server so far."""
        return list(_QuietHandler.requests)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, fmt, *args):
        _QuietHandler.requests.append(self.path)

    def do_GET(self):
        if self.path == "/page/bomb.html":
            return self.gzip_bomb()
        stream = STREAMS.get(self.path)
        if stream is None:
            return super().do_GET()
        block, pause, length = stream
        self.send_response(200)
        self.send_header("Content-Type", "audio/mpeg")
        if length:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        try:
            while True:  # until the client goes away
                self.wfile.write(block)
                time.sleep(pause)
        except OSError:
            self.close_connection = True


    def gzip_bomb(self):
        """A web page of a few hundred kB on the wire and BOMB_MB megabytes once decompressed."""
        body = _bomb()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            self.close_connection = True


BOMB_MB = 600


@functools.cache
def _bomb() -> bytes:
    import gzip

    return gzip.compress(b"<html><body>" + b" " * (BOMB_MB << 20), compresslevel=1)


STREAMS = {  # path: (block written, pause after each block in seconds, announced length)
    "/stream/endless.mp3": (b"\xff" * 65536, 0.0, 0),
    "/stream/trickle.mp3": (b"\xff", 0.2, 0),
    "/stream/huge.mp3": (b"\xff" * 65536, 0.0, 10 * 10**9),
}


def route_through_refusing_proxy(monkeypatch) -> None:
    """Send HTTP(S) from `requests` to a local port that refuses connections: offline, for real."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (others may run the app on 7860)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call_api(root: str, api_name: str, data: list, upload: Path | None = None, timeout: float = 120):
    """One request to the page's HTTP API (as with curl; see Gradio's "Querying Gradio apps with curl"):
    upload the file if any (it becomes the first input), call `api_name`, read the event stream.
    Returns ("complete", outputs), ("error", message) or ("http <status>", body)."""
    import httpx

    with httpx.Client(base_url=root.rstrip("/") + "/gradio_api", timeout=timeout) as client:
        if upload is not None:
            with open(upload, "rb") as f:
                path = client.post("/upload", files={"files": (upload.name, f)}).json()[0]
            data = [{"path": path, "meta": {"_type": "gradio.FileData"}}, *data]
        response = client.post(f"/call/{api_name}", json={"data": data})
        if response.status_code != 200:
            return f"http {response.status_code}", response.text
        events = client.get(f"/call/{api_name}/{response.json()['event_id']}").text
    kind, payload = _last_event(events)
    return kind, payload.get("error", "") if kind == "error" and isinstance(payload, dict) else payload


def _last_event(stream: str):
    kind, data = "", None
    for line in stream.splitlines():
        if line.startswith("event: "):
            kind = line.removeprefix("event: ").strip()
        elif line.startswith("data: ") and kind in ("complete", "error"):
            data = json.loads(line.removeprefix("data: "))
    return kind, data
