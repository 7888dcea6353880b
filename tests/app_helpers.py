"""Helpers for the app tests: a tiny Whisper that stops after a few tokens (fast on CPU),
synthetic Swedish speech files, and a local HTTP server for yt-dlp."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import threading
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


class Server:
    """`python -m http.server` in a thread, bound to 127.0.0.1, serving `root`."""

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


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, fmt, *args):
        _QuietHandler.requests.append(self.path)


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
