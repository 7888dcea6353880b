"""Audio from YouTube or any other site yt-dlp supports, for the app.

`download_audio(url, max_seconds)` checks the URL (http and https only: `file://` URLs and
local paths are refused), asks the site for the duration and refuses long media before
anything is downloaded, fetches the audio-only format when the site offers one, and decodes
it with `whisper_ft.audio`. Downloads go to a temporary folder that is always removed.
One of the two modules with network access (the other is `translate`).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from whisper_ft.audio import SAMPLE_RATE, AudioError, load_audio, probe_seconds

log = logging.getLogger(__name__)

SOCKET_TIMEOUT = 20.0  # seconds per network read
PROBE_TIMEOUT = 20.0  # seconds for ffprobe to read a duration from a direct media link


class MediaError(ValueError):
    """A URL that cannot be used or downloaded; the message says why."""


@dataclass(frozen=True)
class Media:
    wave: np.ndarray  # mono float32 at SAMPLE_RATE
    title: str
    url: str

    @property
    def seconds(self) -> float:
        return len(self.wave) / SAMPLE_RATE


def check_url(url: str) -> str:
    """Return the stripped URL if it is an http(s) URL with a host, else raise MediaError."""
    url = (url or "").strip()
    if not url:
        raise MediaError("paste the URL of a video (YouTube or any site yt-dlp supports)")
    parsed = urlparse(url)
    if parsed.scheme.lower() not in ("http", "https") or not parsed.netloc:
        raise MediaError(f"not a web address: {url[:200]!r}. Only http:// and https:// URLs are accepted "
                         "(file:// URLs and local paths are refused; upload files in the File tab)")
    return url


class _QuietLogger:
    """Keeps yt-dlp off stderr; errors still arrive as DownloadError."""

    def debug(self, msg: str) -> None:
        log.debug(msg)

    def info(self, msg: str) -> None:
        log.debug(msg)

    def warning(self, msg: str) -> None:
        log.debug(msg)

    def error(self, msg: str) -> None:
        log.debug(msg)


def _options(out_dir: str, cookies_file: str) -> dict:
    opts = {
        "format": "bestaudio/best",  # audio only when the site offers it
        "outtmpl": str(Path(out_dir) / "media.%(ext)s"),
        "noplaylist": True,
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "logger": _QuietLogger(),
        "socket_timeout": SOCKET_TIMEOUT,
        "retries": 1,
        "cachedir": False,
        "enable_file_urls": False,
    }
    if cookies_file:
        if not Path(cookies_file).is_file():
            raise MediaError(f"the cookies file {cookies_file} does not exist (app.cookies_file)")
        opts["cookiefile"] = cookies_file
    return opts


def _clean(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.removeprefix("ERROR: ").strip()


def probe_duration(url: str) -> float | None:
    """Duration of a direct media link read by ffprobe from its header; None when unknown."""
    return probe_seconds(url, PROBE_TIMEOUT)


def too_long_message(seconds: float, max_seconds: float) -> str:
    return (f"the media is {_span(seconds)} long; the limit is {_span(max_seconds)} (app.max_media_seconds). "
            "Cut it shorter or ask the page's owner to raise the limit")


def _span(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _check_duration(info: dict, max_seconds: float) -> None:
    if info.get("is_live"):
        raise MediaError("live streams cannot be transcribed; wait until the broadcast has ended")
    duration = info.get("duration")
    if duration is None and info.get("url"):
        duration = probe_duration(info["url"])
    if duration is not None and duration > max_seconds:
        raise MediaError(too_long_message(duration, max_seconds))


def download_audio(url: str, max_seconds: float, cookies_file: str = "") -> Media:
    """Fetch and decode the audio of `url`; raise MediaError for bad URLs, failed downloads and
    media longer than `max_seconds` (checked before the download when the site says)."""
    import yt_dlp

    url = check_url(url)
    with tempfile.TemporaryDirectory(prefix="whisper-ft-media-") as tmp:
        try:
            with yt_dlp.YoutubeDL(_options(tmp, cookies_file)) as ydl:
                info = ydl.extract_info(url, download=False)
                if info.get("_type") == "playlist":
                    raise MediaError("this URL is a playlist; paste the URL of a single video")
                _check_duration(info, max_seconds)
                ydl.process_ie_result(info, download=True)
        except yt_dlp.utils.DownloadError as e:
            raise MediaError(f"could not get audio from {url[:200]}: {_clean(e)}") from e
        files = [p for p in Path(tmp).iterdir() if p.is_file() and not p.name.endswith((".part", ".ytdl"))]
        if not files:
            raise MediaError(f"nothing was downloaded from {url[:200]}")
        try:
            wave = load_audio(max(files, key=lambda p: p.stat().st_size))
        except AudioError as e:
            raise MediaError(f"the media at {url[:200]} has no readable audio: {e}") from e
    media = Media(wave, str(info.get("title") or url), url)
    if media.seconds > max_seconds:
        raise MediaError(too_long_message(media.seconds, max_seconds))
    return media
