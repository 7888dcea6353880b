"""Video URLs through yt-dlp against media served on 127.0.0.1 by the test: direct files, a page
with a <video>, the duration limit checked before downloading, temp files removed, bad URLs."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile

import pytest

from app_helpers import Server, speech_wav
from whisper_ft import youtube
from whisper_ft.youtube import MediaError, check_url, download_audio

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("ffmpeg") is None,
                                reason="espeak-ng and ffmpeg are needed for synthetic media")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Serves speech.mp3 (about 3 s), video.mp4 (speech with a black picture) and page.html."""
    root = tmp_path_factory.mktemp("site")
    wav = speech_wav("Hej, jag heter Anna och jag bor i Stockholm.", root / "speech.wav")
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(wav), "-ar", "48000", "-ac", "1", "-c:a", "libmp3lame",
                    str(root / "speech.mp3")], check=True)
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "color=c=black:s=64x64:d=4", "-i", str(wav),
                    "-shortest", "-c:v", "libx264", "-c:a", "aac", str(root / "video.mp4")], check=True)
    (root / "page.html").write_text('<html><body><h1>Klipp</h1><video src="video.mp4"></video></body></html>')
    with Server(root) as server:
        yield server


@pytest.fixture
def tmp_root(tmp_path, monkeypatch):
    """Point the temp folder at an empty directory so that leftovers can be seen."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.mark.parametrize("url", ["", "   ", "file:///etc/passwd", "/etc/passwd", "~/video.mp4", "C:\\video.mp4",
                                 "ftp://example.com/a.mp3", "youtube.com/watch?v=x", "https://", "javascript:alert(1)"])
def test_bad_urls_are_refused(url):
    with pytest.raises(MediaError):
        check_url(url)


def test_file_urls_are_refused_before_yt_dlp(monkeypatch):
    import yt_dlp

    monkeypatch.setattr(yt_dlp, "YoutubeDL", None)  # never reached
    with pytest.raises(MediaError, match="file:// URLs and local paths are refused"):
        download_audio("file:///etc/passwd", 3600)


@pytest.mark.parametrize("name", ["speech.mp3", "video.mp4", "page.html"])
def test_downloads_audio_and_removes_temp_files(site, tmp_root, name):
    media = download_audio(f"{site.url}/{name}", max_seconds=3600)
    assert media.wave.dtype.name == "float32" and media.wave.ndim == 1
    assert 2.0 < media.seconds < 5.0
    assert media.title
    assert list(tmp_root.iterdir()) == []


def test_too_long_is_refused_before_downloading(site, tmp_root, monkeypatch):
    import yt_dlp

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded although the media is too long")

    monkeypatch.setattr(yt_dlp.YoutubeDL, "dl", no_download)
    with pytest.raises(MediaError, match="limit is 2 s"):
        download_audio(f"{site.url}/speech.mp3", max_seconds=2)
    assert list(tmp_root.iterdir()) == []


def test_too_long_without_known_duration_is_refused_after_decoding(site, tmp_root, monkeypatch):
    monkeypatch.setattr(youtube, "probe_duration", lambda url: None)
    with pytest.raises(MediaError, match="limit"):
        download_audio(f"{site.url}/speech.mp3", max_seconds=2)
    assert list(tmp_root.iterdir()) == []


def test_missing_media_and_dead_hosts_give_clear_errors(site, tmp_root):
    with pytest.raises(MediaError, match="404"):
        download_audio(f"{site.url}/missing.mp3", 3600)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MediaError, match="could not get audio"):
        download_audio(f"http://127.0.0.1:{port}/video.mp4", 3600)
    assert list(tmp_root.iterdir()) == []


def test_page_without_media_is_refused(site, tmp_path):
    (tmp_path / "plain.html").write_text("<html><body>Ingen video här.</body></html>")
    with Server(tmp_path) as server, pytest.raises(MediaError, match="could not get audio"):
        download_audio(f"{server.url}/plain.html", 3600)


def test_cookies_file(site, tmp_path):
    with pytest.raises(MediaError, match="cookies file"):
        download_audio(f"{site.url}/speech.mp3", 3600, cookies_file=str(tmp_path / "missing.txt"))
    cookies = tmp_path / "cookies.txt"
    cookies.write_text("# Netscape HTTP Cookie File\n127.0.0.1\tFALSE\t/\tFALSE\t0\tconsent\tyes\n")
    assert download_audio(f"{site.url}/speech.mp3", 3600, cookies_file=str(cookies)).seconds > 2
