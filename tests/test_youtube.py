"""Video URLs through yt-dlp (in a child process) against media served on 127.0.0.1 by the test:
direct files, a page with a <video>, the limits on length, size and time, temp files removed, bad
URLs, and private addresses refused unless allowed."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil
import pytest

from app_helpers import Server, speech_wav
from conftest import ROOT
from whisper_ft import urls, youtube
from whisper_ft.youtube import Limits, MediaError, check_url, download_audio

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("ffmpeg") is None,
                                reason="espeak-ng and ffmpeg are needed for synthetic media")

LOCAL = Limits(max_seconds=3600, max_mb=50, download_seconds=60, allow_private=True)  # the test server is local


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Serves speech.mp3 (about 3 s), video.mp4 (speech with a black picture), page.html and the streams."""
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
                                 "ftp://example.com/a.mp3", "youtube.com/watch?v=x", "https://", "javascript:alert(1)",
                                 "http://example.com:99999/a.mp3", "rtmp://example.com/live", "data:audio/mp3,xyz"])
def test_bad_urls_are_refused(url):
    with pytest.raises(MediaError):
        check_url(url)


@pytest.mark.parametrize("url", ["https://www.youtube.com/watch?v=x", "HTTPS://youtu.be/x", "Http://example.com/a.mp3",
                                 "http://[2001:db8::1]:8080/a.mp3"])
def test_web_addresses_are_accepted_whatever_the_scheme_case(url):
    """A URL typed on a phone starts with a capital ("Https://..."): schemes are case-insensitive."""
    assert check_url(f"  {url}\n") == url


def test_file_urls_are_refused_before_yt_dlp(monkeypatch):
    monkeypatch.setattr(youtube.child, "run", None)  # never reached
    with pytest.raises(MediaError, match="file:// URLs and local paths are refused"):
        download_audio("file:///etc/passwd", LOCAL, 60)


@pytest.mark.parametrize("name", ["speech.mp3", "video.mp4", "page.html"])
def test_downloads_audio_and_removes_temp_files(site, tmp_root, name):
    media = download_audio(f"{site.url}/{name}", LOCAL, 60)
    assert media.wave.dtype.name == "float32" and media.wave.ndim == 1
    assert 2.0 < media.seconds < 5.0
    assert media.title
    assert list(tmp_root.iterdir()) == []


def test_a_duration_the_site_tells_is_checked_before_downloading():
    check = youtube.MediaFilter(max_seconds=60, allow_private=True)
    assert check({"duration": 59, "url": "https://example.com/a.mp3"}, incomplete=False) is None
    with pytest.raises(MediaError, match="is 2.0 min long; the limit is 60 s"):
        check({"duration": 120}, incomplete=True)
    with pytest.raises(MediaError, match="live streams"):
        check({"is_live": True}, incomplete=True)


@pytest.mark.parametrize("info", [{"url": "rtmp://example.com/live"}, {"url": "file:///etc/passwd"},
                                  {"requested_formats": [{"url": "https://example.com/v.mp4"},
                                                         {"url": "http://169.254.169.254/a.m4a"}]},
                                  {"url": "https://example.com/a.m3u8", "manifest_url": "http://10.0.0.7/x.m3u8"}])
def test_the_media_urls_an_extractor_returns_are_checked(info):
    with pytest.raises(MediaError, match="media URL was refused"):
        youtube.MediaFilter(max_seconds=60, allow_private=False)(info, incomplete=False)


def test_too_long_without_known_duration_is_refused_while_decoding(site, tmp_root):
    with pytest.raises(MediaError, match="limit is 2 s"):
        download_audio(f"{site.url}/speech.mp3", Limits(2, 50, 60, allow_private=True), 60)
    assert list(tmp_root.iterdir()) == []


@pytest.mark.parametrize("path", ["speech.mp3", "stream/endless.mp3", "stream/huge.mp3"])
def test_downloads_stop_at_the_size_limit(site, tmp_root, path):
    start = time.monotonic()
    with pytest.raises(MediaError, match=r"larger than 0.01 MB \(app.max_download_mb\)"):
        download_audio(f"{site.url}/{path}", Limits(3600, 0.01, 60, allow_private=True), 60)
    # well before the 60 s download deadline, which a cap that never stopped it would meet; not
    # tighter: the download's own process takes seconds to start on a loaded machine
    assert time.monotonic() - start < 45
    assert list(tmp_root.iterdir()) == []


def test_a_web_page_too_large_to_read_is_refused_within_the_download_memory(site, tmp_root, monkeypatch):
    """yt-dlp reads a web page whole, decompressed, before it looks for media in it: a gzip bomb
    (a few MB on the wire, BOMB_MB once read) stops at the download process's memory limit with
    one message, instead of taking the server's memory."""
    from app_helpers import BOMB_MB

    monkeypatch.setattr(youtube, "MEMORY_BYTES", 300 << 20)  # the request carries it to the download process
    assert BOMB_MB << 20 > youtube.MEMORY_BYTES
    with pytest.raises(MediaError, match=r"bomb.html needs more than 300 MB of memory to read"):
        download_audio(f"{site.url}/page/bomb.html", Limits(3600, 50, 60, allow_private=True), 60)
    assert list(tmp_root.iterdir()) == []


def test_a_size_the_server_announces_stops_the_download_at_once():
    """A server that announces 10 GB is refused on its first progress report, before the cap's
    worth has arrived; without an announced size, the bytes that arrived count."""
    cap = youtube.ByteCap(10**6)
    with pytest.raises(MediaError, match=r"larger than 1 MB \(app.max_download_mb\)"):
        cap({"status": "downloading", "total_bytes": 10 * 10**9, "downloaded_bytes": 1024})
    with pytest.raises(MediaError, match="larger than 1 MB"):
        cap({"status": "downloading", "total_bytes": None, "downloaded_bytes": 10**6 + 1})
    assert cap({"status": "downloading", "total_bytes": 10**6, "downloaded_bytes": 10**6}) is None


def test_a_stream_that_trickles_is_stopped_at_the_deadline(site, tmp_root):
    start = time.monotonic()
    with pytest.raises(MediaError, match=r"did not finish within 1.5 s \(app.download_timeout_seconds\)"):
        download_audio(f"{site.url}/stream/trickle.mp3", Limits(3600, 50, 1.5, allow_private=True), 60)
    assert time.monotonic() - start < 4
    with pytest.raises(MediaError, match=r"within 1 s \(app.request_timeout_seconds\)"):
        download_audio(f"{site.url}/stream/trickle.mp3", Limits(3600, 50, 60, allow_private=True), 1)
    assert list(tmp_root.iterdir()) == []
    assert psutil.Process().children() == []  # the yt-dlp process was killed and reaped


def test_decoding_gets_the_time_the_download_left(monkeypatch):
    """The timeout bounds download and decoding together: a download that took 0.5 s of 5 leaves
    decoding 4.5 s, not 5 again, or a request could run past its deadline."""
    def download(request, seconds, key):
        time.sleep(0.5)
        return {"path": "media.m4a", "title": "Klipp"}

    decoding = []
    monkeypatch.setattr(youtube, "_run_download", download)
    monkeypatch.setattr(youtube, "load_audio", lambda path, max_seconds, timeout: decoding.append(timeout) or
                        np.zeros(16000, np.float32))
    assert download_audio("https://example.com/v", LOCAL, 5).title == "Klipp"
    assert len(decoding) == 1 and decoding[0] <= 4.5


def test_missing_media_and_dead_hosts_give_clear_errors(site, tmp_root):
    with pytest.raises(MediaError, match="404"):
        download_audio(f"{site.url}/missing.mp3", LOCAL, 60)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MediaError, match="could not get audio"):
        download_audio(f"http://127.0.0.1:{port}/video.mp4", LOCAL, 60)
    assert list(tmp_root.iterdir()) == []


def test_page_without_media_is_refused(site, tmp_path):
    (tmp_path / "plain.html").write_text("<html><body>Ingen video här.</body></html>")
    with Server(tmp_path) as server, pytest.raises(MediaError, match="could not get audio"):
        download_audio(f"{server.url}/plain.html", LOCAL, 60)


def test_a_playlist_is_refused_with_what_to_paste_instead(site, tmp_path, tmp_root):
    """A page with two videos is a playlist to yt-dlp: it would download them all, one after another."""
    (tmp_path / "two.html").write_text(f'<html><body><video src="{site.url}/video.mp4"></video>'
                                       f'<video src="{site.url}/speech.mp3"></video></body></html>')
    with Server(tmp_path) as server, pytest.raises(MediaError, match="^this URL is a playlist; paste the URL of a"):
        download_audio(f"{server.url}/two.html", LOCAL, 60)
    assert list(tmp_root.iterdir()) == []


def test_cookies_file(site, tmp_path):
    with pytest.raises(MediaError, match="cookies file"):
        download_audio(f"{site.url}/speech.mp3", LOCAL, 60, cookies_file=str(tmp_path / "missing.txt"))
    cookies = tmp_path / "cookies.txt"
    cookies.write_text("# Netscape HTTP Cookie File\n# the operator's note\n"
                       "127.0.0.1\tFALSE\t/\tFALSE\t0\tconsent\tyes\n")
    before = cookies.read_bytes()
    assert download_audio(f"{site.url}/speech.mp3", LOCAL, 60, cookies_file=str(cookies)).seconds > 2
    assert cookies.read_bytes() == before  # yt-dlp saved its cookie jar into a copy, not into this file
    with open(cookies, "a") as f:  # a cookie export larger than the download is not taken for it
        f.writelines(f".example.com\tTRUE\t/\tFALSE\t0\tc{i}\t{'x' * 200}\n" for i in range(2000))
    assert cookies.stat().st_size > 300_000  # speech.mp3, 3 s at 48 kHz, is some 50 kB
    assert download_audio(f"{site.url}/speech.mp3", LOCAL, 60, cookies_file=str(cookies)).seconds > 2


@pytest.mark.parametrize("address, problem", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"), ("10.1.2.3", "private"),
    ("192.168.0.10", "private"), ("172.16.5.4", "private"), ("169.254.169.254", "link-local"),
    ("fe80::1%eth0", "link-local"), ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"),
    ("240.0.0.1", "reserved"), ("100.64.0.1", "not globally routable"), ("fd00::1", "private"),
    ("2002:7f00:1::1", "loopback"), ("2002:c0a8:101::1", "private"), ("64:ff9b::a9fe:a9fe", "link-local"),
    ("8.8.8.8", None), ("2001:4860:4860::8888", None), ("2002:808:808::1", None)])
def test_address_problems(address, problem):
    assert urls.address_problem(address) == problem


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/a.mp3", "http://localhost/a.mp3", "http://[::1]/a.mp3",
                                 "http://10.0.0.1/a.mp3", "https://169.254.169.254/latest/meta-data/",
                                 "http://0.0.0.0:7860/", "http://[::ffff:7f00:1]/a.mp3"])
def test_private_urls_are_refused_unless_allowed(url):
    with pytest.raises(urls.URLRefused, match="not on the public internet"):
        urls.check_url(url)
    assert urls.check_url(url, allow_private=True) == url


def test_private_hosts_are_refused_end_to_end(site, tmp_root):
    """With the default (allow_private false) the local server is not fetched: the child process
    refuses it before yt-dlp connects, by name and by address."""
    port = site.url.rsplit(":", 1)[1]
    served = len(Server.requests())
    for host in ("127.0.0.1", "localhost"):
        with pytest.raises(MediaError, match="loopback address"):
            download_audio(f"http://{host}:{port}/speech.mp3", Limits(3600, 50, 60), 60)
    with pytest.raises(MediaError, match="link-local address"):
        download_audio("http://169.254.169.254/latest/meta-data/", Limits(3600, 50, 60), 60)
    assert len(Server.requests()) == served
    assert list(tmp_root.iterdir()) == []


def test_the_yt_dlp_process_guards_its_connections_unless_private_hosts_are_allowed(site, tmp_path):
    """A host that resolves to a public address when checked and to a private one when yt-dlp
    connects (DNS rebinding), or a redirect to one: the child's guard is what still refuses it.
    Here the URL checks are switched off in the child, so that only the guard stands in the way."""
    code = ("import json, sys; from whisper_ft import urls, youtube; urls.check_url = lambda url, *a: url; "
            "print(json.dumps(youtube.fetch({'url': sys.argv[1], 'out_dir': sys.argv[2], 'cookies_file': '', "
            "'max_seconds': 3600, 'max_mb': 50, 'download_seconds': 60, 'allow_private': sys.argv[3] == 'yes', "
            "'memory_bytes': youtube.MEMORY_BYTES})))")

    def fetch(allow_private: str, out_dir) -> dict:
        out_dir.mkdir()
        proc = subprocess.run([sys.executable, "-c", code, f"{site.url}/speech.mp3", str(out_dir), allow_private],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    served = len(Server.requests())
    reply = fetch("no", tmp_path / "guarded")
    assert "127.0.0.1 is not on the public internet (loopback address)" in reply.get("error", ""), reply
    assert len(Server.requests()) == served and list((tmp_path / "guarded").iterdir()) == []
    assert "path" in fetch("yes", tmp_path / "allowed")  # app.allow_private_urls: the same download goes through


def test_the_guard_refuses_every_connection_of_its_process(site):
    """What stops redirects and re-resolved hosts: in the yt-dlp process, any connection to a private
    address fails, whichever library opens it."""
    code = ("import urllib.request, sys; from whisper_ft import urls; urls.guard_connections(); "
            "urllib.request.urlopen(sys.argv[1], timeout=5)")
    proc = subprocess.run([sys.executable, "-c", code, f"{site.url}/speech.mp3"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode != 0 and "127.0.0.1 is not on the public internet (loopback address)" in proc.stderr


def ipv6_listener() -> socket.socket | None:
    """A socket listening on [::1], or None where this machine has no IPv6 loopback."""
    try:
        listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        listener.bind(("::1", 0))
    except OSError:
        return None
    listener.listen()
    return listener


def test_the_guard_refuses_ipv6_connections_too():
    """A host that resolves to [::1] (or another private IPv6 address) is no way round the guard: an IPv6
    connection to the loopback is refused like an IPv4 one, even with a server listening there."""
    listener = ipv6_listener()
    if listener is None:
        pytest.skip("this machine has no IPv6 loopback ([::1])")
    with listener:
        code = ("import socket, sys; from whisper_ft import urls; urls.guard_connections(); "
                "socket.create_connection(('::1', int(sys.argv[1])), timeout=5)")
        proc = subprocess.run([sys.executable, "-c", code, str(listener.getsockname()[1])], capture_output=True,
                              text=True, cwd=ROOT, timeout=60)
    assert proc.returncode != 0 and "::1 is not on the public internet (loopback address)" in proc.stderr
