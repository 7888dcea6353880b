"""Trimmed features rebuild exactly what WhisperFeatureExtractor makes; decoding and downmixing;
the app's limits on decoding (length, time) and ffmpeg kept off the network."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
from app_helpers import Server
from conftest import PROCESSOR_DIR

from whisper_ft.audio import (N_FRAMES, N_SAMPLES, SAMPLE_RATE, AudioError, TooLong, load_audio, n_audio_frames,
                              pad_features, probe_seconds, to_mono, trimmed_features)

# Lengths around every hop remainder that matters, the 30 s edge, and very short clips.
LENGTHS = [N_SAMPLES, N_SAMPLES - 1, N_SAMPLES - 10, N_SAMPLES - 100, N_SAMPLES - 200, N_SAMPLES - 500,
           8000, 8119, 8120, 8121, 8159, 8160, 8161, 1600, 400, 1]


@pytest.fixture(scope="module")
def feature_extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor.from_pretrained(PROCESSOR_DIR)


def noisy_waves(lengths, seed=0):
    rng = np.random.default_rng(seed)
    waves = []
    for n in lengths:
        w = (rng.standard_normal(n) * 0.01).astype(np.float32)
        w[-50:] *= 300  # a loud ending: a wrongly trimmed last frame or clip floor shows at once
        waves.append(w)
    return waves


@pytest.mark.parametrize("batched", [False, True])
def test_trimmed_features_rebuild_the_extractor_output(feature_extractor, batched):
    waves = noisy_waves(LENGTHS)
    got = trimmed_features(feature_extractor, waves) if batched else [trimmed_features(feature_extractor, [w])[0]
                                                                      for w in waves]
    for wave, (feats, fill) in zip(waves, got):
        ref = feature_extractor(wave, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
        assert feats.shape == (80, n_audio_frames(len(wave)))
        assert np.abs(pad_features(feats, fill) - ref).max() <= 1e-5, len(wave)
        if feats.shape[1] < N_FRAMES:  # what is left out is the constant fill, nothing more
            assert np.all(ref[:, feats.shape[1]:] == pytest.approx(fill, abs=1e-6))


def test_silence_and_n_audio_frames(feature_extractor):
    (feats, fill), = trimmed_features(feature_extractor, [np.zeros(16000, np.float32)])
    ref = feature_extractor(np.zeros(16000, np.float32), sampling_rate=SAMPLE_RATE, return_tensors="np")
    assert np.abs(pad_features(feats, fill) - ref.input_features[0]).max() <= 1e-6
    assert n_audio_frames(N_SAMPLES * 2) == N_FRAMES
    assert [n_audio_frames(n) for n in (1, 120, 121, 160, 280, 281)] == [2, 2, 3, 3, 3, 4]


def test_load_audio_downmixes_and_resamples(tmp_path):
    t = np.arange(48000 * 2) / 48000
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([left, -left * 0 + 0.1], axis=1)
    sf.write(tmp_path / "x.wav", (stereo * 32767).astype(np.int16), 48000)
    wave = load_audio(tmp_path / "x.wav")
    assert wave.dtype == np.float32 and wave.shape == (32000,)
    assert abs(float(np.mean(wave)) - 0.05) < 1e-3  # the mean of the two channels
    assert load_audio((tmp_path / "x.wav").read_bytes()).shape == (32000,)
    mono = to_mono((stereo * 32767).astype(np.int16), 48000)
    assert np.abs(mono - wave).max() < 1e-3


@pytest.mark.parametrize("content", [b"", b"not audio at all" * 10])
def test_load_audio_rejects_bad_files(tmp_path, content):
    bad = tmp_path / "bad.mp3"
    bad.write_bytes(content)
    with pytest.raises(AudioError):
        load_audio(bad)
    with pytest.raises(AudioError):
        load_audio(tmp_path / "missing.mp3")


needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is needed (apt-get install ffmpeg)")


@needs_ffmpeg
def test_probe_seconds_reads_headers_of_audio_and_video_and_none_otherwise(tmp_path):
    wav, mp4, text = tmp_path / "a.wav", tmp_path / "v.mp4", tmp_path / "notes.txt"
    sf.write(wav, np.zeros(16_000 * 3, dtype=np.float32), 16_000)
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=2.5", "-c:a", "aac",
                    str(mp4)], check=True)
    text.write_text("not media")
    assert probe_seconds(wav) == pytest.approx(3.0)
    assert probe_seconds(mp4) == pytest.approx(2.5, abs=0.1)  # libsndfile cannot read it: ffprobe can
    assert probe_seconds(text) is None
    assert probe_seconds(tmp_path / "missing.wav") is None


@needs_ffmpeg
@pytest.mark.parametrize("reader", ["libsndfile", "ffprobe"])
def test_probe_seconds_of_an_mp3_is_unknown_unless_its_header_counts_its_frames(tmp_path, monkeypatch, reader):
    """A VBR MP3 without a Xing frame: both readers estimate its length from the first frame's
    bitrate, seven to eight times too long here (a quiet start at a low rate): it has none to refuse by."""
    from pathlib import Path

    vbr = tmp_path / "vbr.mp3"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "anullsrc=r=22050:cl=mono:d=2", "-f", "lavfi", "-i",
                    "sine=frequency=440:sample_rate=22050:duration=30", "-filter_complex", "[0][1]concat=n=2:v=0:a=1",
                    "-c:a", "libmp3lame", "-q:a", "0", "-write_xing", "0", str(vbr)], check=True)
    cv_clip = sorted((Path(__file__).parents[1] / "data" / "sample").rglob("clips/*.mp3"))[0]  # LAME's Info frame
    if reader == "ffprobe":  # a libsndfile without MP3 leaves the file to ffprobe
        def unreadable(*args, **kwargs):
            raise sf.LibsndfileError(1)

        monkeypatch.setattr(sf, "info", unreadable)
    assert probe_seconds(vbr) is None
    assert probe_seconds(cv_clip) == pytest.approx(2.5, abs=0.1)
    assert abs(len(load_audio(vbr)) / SAMPLE_RATE - 32.0) < 0.1


@needs_ffmpeg
def test_decoding_stops_at_max_seconds(tmp_path):
    wav, mp4 = tmp_path / "a.wav", tmp_path / "v.mp4"
    sf.write(wav, np.full(16_000 * 5, 0.1, dtype=np.float32), 16_000)
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=5", "-c:a", "aac",
                    str(mp4)], check=True)
    assert load_audio(wav, max_seconds=5).shape == (80_000,)
    with pytest.raises(TooLong) as e:  # soundfile knows the length before reading
        load_audio(wav, max_seconds=4)
    assert e.value.seconds == pytest.approx(5.0)
    assert load_audio(mp4, max_seconds=6).shape[0] == pytest.approx(80_000, abs=2000)
    with pytest.raises(TooLong) as e:  # ffmpeg decodes at most max_seconds + 1 and finds more
        load_audio(mp4, max_seconds=2)
    assert e.value.seconds is None and "longer than 2 s" in str(e.value)


@needs_ffmpeg
def test_a_video_without_sound_says_so(tmp_path):
    mp4 = tmp_path / "silent-film.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "color=c=black:s=64x48:d=2", "-c:v", "mpeg4",
                    str(mp4)], check=True)
    with pytest.raises(AudioError, match="^the file has no audio track$"):
        load_audio(mp4)


@needs_ffmpeg
def test_ffmpeg_has_a_time_limit(tmp_path):
    mp4 = tmp_path / "v.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=duration=30", "-c:a", "aac", str(mp4)],
                   check=True)
    with pytest.raises(AudioError, match="decoding took longer than 0.001 s"):
        load_audio(mp4, timeout=0.001)


@needs_ffmpeg
def test_a_playlist_file_cannot_make_ffmpeg_fetch_urls(tmp_path):
    """An upload may be an HLS playlist naming URLs (server-side request forgery): ffmpeg and
    ffprobe are told to read local files only (-protocol_whitelist), whatever their defaults."""
    with Server(tmp_path) as server:
        (tmp_path / "clip.ts").write_bytes(b"\0" * 188)
        playlist = tmp_path / "upload.mp3"
        playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{server.url}/clip.ts\n#EXT-X-ENDLIST\n")
        asked = len(Server.requests())
        with pytest.raises(AudioError):
            load_audio(playlist)
        assert probe_seconds(playlist) is None
        assert len(Server.requests()) == asked


@needs_ffmpeg
@pytest.mark.parametrize("name", ["upload.mp3", "upload.m3u8", "upload.m3u"])
def test_a_playlist_file_cannot_make_ffmpeg_read_other_local_files(tmp_path, name):
    """A playlist naming a file of this machine (training clips have predictable names) would
    have ffmpeg decode it for the visitor: only media containers are opened (-format_whitelist)."""
    secret = tmp_path / "secret.mp3"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=300:duration=3", str(secret)],
                   check=True)
    assert load_audio(secret).shape[0] == pytest.approx(48_000, abs=2000)  # a real mp3 still decodes
    for line in (f"file://{secret}", str(secret)):
        playlist = tmp_path / name
        playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:3,\n{line}\n#EXT-X-ENDLIST\n")
        with pytest.raises(AudioError):
            load_audio(playlist)
        assert probe_seconds(playlist) is None


def test_many_channels_at_a_huge_rate_are_mixed_down_in_blocks(tmp_path, monkeypatch):
    """A small FLAC of 8 channels at 96 kHz (a decompression bomb when read whole as float32) is
    decoded in blocks: memory follows the 16 kHz mono output, and the result is the same."""
    import whisper_ft.audio as audio

    rng = np.random.default_rng(0)
    frames = (rng.standard_normal((96_000 * 4, 8)) * 0.1).astype(np.float32)
    sf.write(tmp_path / "wide.flac", frames, 96_000)
    whole = load_audio(tmp_path / "wide.flac")
    reads = []
    real_read = sf.SoundFile.read
    monkeypatch.setattr(sf.SoundFile, "read", lambda self, frames=-1, *a, **k: reads.append(frames)
                        or real_read(self, frames, *a, **k))
    monkeypatch.setattr(audio, "MONO_AT_ONCE", 96_000)  # as if the file were long
    blocked = load_audio(tmp_path / "wide.flac")
    assert blocked.shape == whole.shape == (64_000,) and np.abs(blocked - whole).max() < 1e-3
    assert reads and max(reads) <= 1 << 16 and -1 not in reads  # never the whole file at once
    with pytest.raises(AudioError, match="decoding took longer"):
        load_audio(tmp_path / "wide.flac", timeout=0.0)


def test_an_mp3_cut_short_is_refused_where_its_header_counts_its_frames(tmp_path):
    """A Common Voice MP3 (LAME's Info frame counts its frames) cut to 30% would give the whole
    transcript to a third of the speech: refused. A VBR file without such a frame, whose length
    libsndfile only estimates (too long), still decodes whole."""
    from pathlib import Path

    clip = sorted((Path(__file__).parents[1] / "data" / "sample").rglob("clips/*.mp3"))[0]
    data = clip.read_bytes()
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(data[: len(data) * 3 // 10])
    for source in (cut, cut.read_bytes()):
        with pytest.raises(AudioError, match="cut short: its header says 2.50 s, it holds 0.70 s"):
            load_audio(source)
    assert abs(len(load_audio(data[: len(data) * 19 // 20])) - len(load_audio(clip))) < 0.5 * SAMPLE_RATE  # a little short
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed: the VBR file cannot be made")
    vbr = tmp_path / "vbr.mp3"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "anullsrc=r=48000:cl=mono:d=2", "-f", "lavfi", "-i",
                    "sine=frequency=440:sample_rate=48000:duration=4", "-filter_complex", "[0][1]concat=n=2:v=0:a=1",
                    "-c:a", "libmp3lame", "-q:a", "2", "-write_xing", "0", str(vbr)], check=True)
    assert sf.info(str(vbr)).frames > 2 * 6 * 48000  # libsndfile's estimate: far too long
    assert abs(len(load_audio(vbr)) / SAMPLE_RATE - 6.0) < 0.1
    loud_first = tmp_path / "loud-first.mp3"  # estimated too short: libsndfile alone stopped at 5 s
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=4",
                    "-f", "lavfi", "-i", "anullsrc=r=48000:cl=mono:d=8", "-filter_complex", "[0][1]concat=n=2:v=0:a=1",
                    "-c:a", "libmp3lame", "-q:a", "2", "-write_xing", "0", str(loud_first)], check=True)
    assert sf.info(str(loud_first)).frames < 9 * 48000
    assert abs(len(load_audio(loud_first)) / SAMPLE_RATE - 12.0) < 0.1  # decoded by ffmpeg, whole
    long = tmp_path / "long.mp3"  # decoded in blocks: over MONO_AT_ONCE samples
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=70",
                    "-ac", "2", "-c:a", "libmp3lame", "-b:a", "64k", str(long)], check=True)
    data = long.read_bytes()
    with pytest.raises(AudioError, match="cut short: its header says 70"):
        load_audio(data[: len(data) * 4 // 10])
    assert abs(len(load_audio(long)) / SAMPLE_RATE - 70.0) < 0.1


def test_a_wav_or_flac_cut_short_is_refused_by_the_length_its_header_counts(tmp_path):
    """libsndfile counts a WAV's frames from the bytes there are and stops at a cut FLAC (ffmpeg
    then decodes the rest it can): the `data` chunk's and STREAMINFO's counts tell them cut short."""
    t = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
    wave = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    for fmt, subtype in (("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_16")):
        whole = tmp_path / f"whole.{fmt.lower()}"
        sf.write(whole, wave, SAMPLE_RATE, format=fmt, subtype=subtype)
        assert len(load_audio(whole)) == len(wave)
        data = whole.read_bytes()
        cut = tmp_path / f"cut.{fmt.lower()}"
        cut.write_bytes(data[: len(data) // 2])
        if fmt == "FLAC" and shutil.which("ffmpeg") is None:
            with pytest.raises(AudioError):
                load_audio(cut)
            continue
        for source in (cut, cut.read_bytes()):
            with pytest.raises(AudioError, match=r"cut short: its header says 3.00 s, it holds 1\.[0-9]{2} s"):
                load_audio(source)
        # a fifth missing is no rounding of the header either: the last words would still lose their speech
        with pytest.raises(AudioError, match=r"cut short: its header says 3.00 s, it holds 2\.[0-9]{2} s"):
            load_audio(data[: len(data) * 4 // 5])
        assert abs(len(load_audio(data[: len(data) * 19 // 20])) - len(wave)) < 0.5 * SAMPLE_RATE  # a little short
    streamed = bytearray((tmp_path / "whole.wav").read_bytes())  # a writer that could not seek back
    at = streamed.index(b"data") + 4
    streamed[at:at + 4] = b"\xff\xff\xff\xff"
    assert len(load_audio(bytes(streamed[: len(streamed) // 2]))) == pytest.approx(len(wave) / 2, abs=50)


@pytest.mark.parametrize("ffmpeg", [True, False], ids=["ffmpeg", "libsndfile"])
def test_a_flac_whose_header_leaves_its_length_open_decodes_and_is_held_to_the_limit(tmp_path, monkeypatch, ffmpeg):
    """A FLAC written to a pipe counts 0 samples in STREAMINFO, which libsndfile reports as 2**63 - 1
    frames: the app refused a 2 s recording as 9.6 trillion minutes long, stage 1 dropped it as too long."""
    if ffmpeg and shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    if not ffmpeg:
        monkeypatch.setattr(shutil, "which", lambda name: None)
    t = np.arange(2 * SAMPLE_RATE) / SAMPLE_RATE
    wave = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    streamed = tmp_path / "streamed.flac"
    sf.write(streamed, wave, SAMPLE_RATE, format="FLAC")
    data = bytearray(streamed.read_bytes())
    data[21] &= 0xF0  # STREAMINFO's 36-bit sample count: unknown
    data[22:26] = bytes(4)
    streamed.write_bytes(data)
    assert sf.info(str(streamed)).frames > 2**62
    assert probe_seconds(streamed) is None
    if not ffmpeg:  # libsndfile cannot read such a file to its end
        with pytest.raises(AudioError, match="needs ffmpeg, which is not installed"):
            load_audio(streamed, max_seconds=60)
        return
    assert len(load_audio(streamed, max_seconds=60)) == pytest.approx(len(wave), abs=50)
    with pytest.raises(TooLong):
        load_audio(streamed, max_seconds=1)
