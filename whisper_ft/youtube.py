"""Audio from YouTube or any other site yt-dlp supports, for the app.

`download_audio(url, limits, timeout)` refuses anything but http(s) URLs, then runs yt-dlp in a
child process (`python -m whisper_ft.youtube`, see `whisper_ft.child`) that is killed at the
download deadline. There, unless `limits.allow_private`, the host and every connection yt-dlp
opens (redirects, the media URL the extractor returns) must be on the public internet
(`whisper_ft.urls`); live streams and media longer than `limits.max_seconds` are refused as soon
as the site tells the duration; the media URL must be http(s); the download stops at
`limits.max_mb`. yt-dlp may neither run ffmpeg nor use curl_cffi, whose connections the guard
would not see. The app then decodes the file with `whisper_ft.audio` (never more than
`max_seconds`, within the time left) and the temporary folder is removed whatever happened.
One of the app's two modules that reach the network for a visitor's request (the other is
`translate`); the list of all of them is in `whisper_ft.sources`.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from whisper_ft import child, urls
from whisper_ft.audio import SAMPLE_RATE, AudioError, TooLong, load_audio
from whisper_ft.errors import first_line

log = logging.getLogger(__name__)

SOCKET_TIMEOUT = 20.0  # seconds per network read
MEMORY_BYTES = 1 << 30  # the download process's heap (`limit_memory`): yt-dlp itself takes about 100 MB
# Formats yt-dlp downloads by itself (HTTP, HLS): the others (RTMP, ...) would need ffmpeg.
FORMAT = "bestaudio[protocol^=http]/bestaudio[protocol^=m3u8]/best[protocol^=http]/best[protocol^=m3u8]"


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


@dataclass(frozen=True)
class Limits:
    """What one URL may cost the server."""

    max_seconds: float  # longest media accepted
    max_mb: float  # largest download, in MB (10^6 bytes)
    download_seconds: float  # deadline of yt-dlp's extraction and download
    allow_private: bool = False  # also fetch from loopback, private and link-local hosts (local use, tests)


def check_url(url: str) -> str:
    """Return the stripped URL if it is an http(s) URL with a host, else raise MediaError."""
    try:
        return urls.check_scheme(url)
    except urls.URLRefused as e:
        raise MediaError(str(e)) from e


def too_long_message(seconds: float | None, max_seconds: float) -> str:
    """For media over `max_seconds`; `seconds` None when only known to be longer."""
    length = f"is {_span(seconds)} long" if seconds is not None else f"is longer than {_span(max_seconds)}"
    return (f"the media {length}; the limit is {_span(max_seconds)} (app.max_media_seconds). "
            "Cut it shorter or ask the page's owner to raise the limit")


def _span(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def download_audio(url: str, limits: Limits, timeout: float, cookies_file: str = "") -> Media:
    """Fetch and decode the audio of `url` within `timeout` seconds (download and decoding); raise
    MediaError for refused URLs, failed downloads and media over `limits`."""
    url = check_url(url)
    if cookies_file and not Path(cookies_file).is_file():
        raise MediaError(f"the cookies file {cookies_file} does not exist (app.cookies_file)")
    deadline = time.monotonic() + timeout
    seconds = min(limits.download_seconds, timeout)
    key = "app.download_timeout_seconds" if limits.download_seconds <= timeout else "app.request_timeout_seconds"
    with tempfile.TemporaryDirectory(prefix="whisper-ft-media-") as tmp:
        # yt-dlp writes its cookie jar back when it closes: it gets a copy, so that the sites a
        # visitor picks never add to the operator's file and parallel downloads never race on it
        # (in a folder of its own: the download is the largest file of `tmp`)
        if cookies_file:
            (Path(tmp) / "cookies").mkdir()
        cookies = str(shutil.copy(cookies_file, Path(tmp) / "cookies" / "cookies.txt")) if cookies_file else ""
        reply = _run_download({"url": url, "out_dir": tmp, "cookies_file": cookies, "memory_bytes": MEMORY_BYTES,
                               **asdict(limits)}, seconds, key)
        try:
            wave = load_audio(reply["path"], max_seconds=limits.max_seconds,
                              timeout=max(deadline - time.monotonic(), 0.01))
        except TooLong as e:
            raise MediaError(too_long_message(e.seconds, limits.max_seconds)) from e
        except AudioError as e:
            raise MediaError(f"the media at {url[:200]} has no readable audio: {e}") from e
    return Media(wave, reply["title"], url)


def _run_download(request: dict, seconds: float, key: str) -> dict:
    """`fetch` in a child process killed after `seconds` (the config `key` that set them); its reply
    {"path", "title"}, or MediaError."""
    try:
        reply = child.run(__name__, request, seconds)
    except TimeoutError as e:
        raise MediaError(f"the download did not finish within {seconds:.3g} s ({key}); try a shorter video") from e
    if "error" in reply:
        raise MediaError(reply["error"])
    return reply


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


class MediaFilter:
    """yt-dlp's match_filter: refuses live streams and long media as soon as the site tells, and
    the chosen format's URLs unless they are http(s) on an allowed host."""

    def __init__(self, max_seconds: float, allow_private: bool):
        self.max_seconds = max_seconds
        self.allow_private = allow_private

    def __call__(self, info: dict, *, incomplete) -> None:
        if info.get("is_live"):
            raise MediaError("live streams cannot be transcribed; wait until the broadcast has ended")
        duration = info.get("duration")
        if duration is not None and duration > self.max_seconds:
            raise MediaError(too_long_message(duration, self.max_seconds))
        if incomplete is False:  # the format is chosen: these are the URLs yt-dlp will fetch
            for media_url in _media_urls(info):
                try:
                    urls.check_url(media_url, self.allow_private)
                except urls.URLRefused as e:
                    raise MediaError(f"the site's media URL was refused: {e}") from e


def _media_urls(info: dict) -> list[str]:
    formats = info.get("requested_formats") or [info]
    return [f[key] for f in formats for key in ("url", "manifest_url", "fragment_base_url") if f.get(key)]


class ByteCap:
    """yt-dlp progress hook that stops a download over `max_bytes`: at once when the server tells the
    size, else when that much has arrived (a stream without end). yt-dlp's own `max_filesize`
    only sees a size the server announces, and then gives up without an error."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes

    def __call__(self, status: dict) -> None:
        size = max(status.get("total_bytes") or 0, status.get("downloaded_bytes") or 0)
        if size > self.max_bytes:
            raise MediaError(f"the media is larger than {self.max_bytes / 1e6:g} MB (app.max_download_mb)")


def _options(request: dict) -> dict:
    out_dir = request["out_dir"]
    opts = {
        "format": FORMAT,
        "outtmpl": str(Path(out_dir) / "media.%(ext)s"),
        "noplaylist": True,
        "extract_flat": "in_playlist",  # a playlist is refused without resolving its entries
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "logger": _QuietLogger(),
        "socket_timeout": SOCKET_TIMEOUT,
        "retries": 1,
        "fragment_retries": 1,
        "cachedir": False,
        "enable_file_urls": False,
        "match_filter": MediaFilter(request["max_seconds"], request["allow_private"]),
        "progress_hooks": [ByteCap(int(request["max_mb"] * 1e6))],
        "external_downloader": {"default": "native"},
        "fixup": "never",
        "ffmpeg_location": str(Path(out_dir) / "no-ffmpeg"),  # does not exist: yt-dlp runs no ffmpeg
    }
    if request["cookies_file"]:
        opts["cookiefile"] = request["cookies_file"]
    return opts


def fetch(request: dict) -> dict:
    """The child's job: download the audio of request["url"] into request["out_dir"] with yt-dlp.
    Returns {"path", "title"} or {"error": message for the user}. Guards this process's connections
    unless private hosts are allowed, and bounds its memory (`limit_memory`), so it runs only in a
    child process of its own."""
    limit_memory(request["memory_bytes"])
    sys.modules["curl_cffi"] = None  # yt-dlp's handler for it would connect from C, out of the guard's sight
    import yt_dlp

    guard = None if request["allow_private"] else urls.guard_connections()
    url = request["url"]
    try:
        urls.check_url(url, request["allow_private"])
        with yt_dlp.YoutubeDL(_options(request)) as ydl:
            info = ydl.extract_info(url, download=False)
            if info.get("_type") == "playlist":
                raise MediaError("this URL is a playlist; paste the URL of a single video")
            ydl.process_ie_result(info, download=True)
    except (MediaError, urls.URLRefused) as e:
        return {"error": str(e)}
    except MemoryError:
        return {"error": f"{url[:200]} needs more than {request['memory_bytes'] >> 20} MB of memory to read; "
                         "paste the URL of a video page"}
    except yt_dlp.utils.DownloadError as e:
        reason = guard.refused[-1] if guard and guard.refused else _clean(e)
        return {"error": f"could not get audio from {url[:200]}: {reason}"}
    files = [p for p in Path(request["out_dir"]).iterdir() if p.is_file() and not p.name.endswith((".part", ".ytdl"))]
    if not files:
        return {"error": f"nothing was downloaded from {url[:200]}"}
    return {"path": str(max(files, key=lambda p: p.stat().st_size)), "title": str(info.get("title") or url)}


def limit_memory(nbytes: int) -> None:
    """Bound this process's memory (its heap and private mappings, RLIMIT_DATA) to `nbytes`: yt-dlp
    reads a web page whole, decompressed, before it finds the media in it, and a huge, endless
    or gzip-bombed page would otherwise take the server's memory. Where the system has no such
    limit (Windows), nothing."""
    try:
        import resource
    except ImportError:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (nbytes if hard == resource.RLIM_INFINITY else min(nbytes, hard), hard))


def _clean(e: Exception) -> str:
    return first_line(e).removeprefix("ERROR: ").strip()


if __name__ == "__main__":
    child.serve(fetch)
