"""Audio decoding and Whisper log-Mel features, shared by the feature pipeline and the app
so that training and serving can never drift.

Decoding uses soundfile (libsndfile reads WAV, FLAC, OGG and MP3) and falls back to the
ffmpeg command for anything else (video containers, AAC, ...); resampling uses soxr.
Nothing here depends on torchcodec. For the app, `load_audio` takes a length cap (nothing longer
is ever decoded into memory; long or many-channel audio is mixed down and resampled in blocks)
and a time limit, and ffmpeg and ffprobe read media containers from local files only: a file
that points elsewhere (an HLS playlist, say) can make them neither fetch a URL nor read
another file of this machine.

Whisper pads every input to 30 s. Most clips are far shorter, so features are stored
trimmed to the frames that hold audio plus one fill value, and `pad_features` rebuilds the
exact 3000-frame input that `WhisperFeatureExtractor` would have produced.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16_000
HOP_LENGTH = 160
N_FFT = 400
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480_000 samples in a Whisper input
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 frames in a Whisper input
# ffmpeg/ffprobe input options: no network protocols, and media containers only. An HLS playlist
# (hls), a concat script or a DASH manifest could make ffmpeg read other files of this machine,
# whatever the upload's name says.
# Each demuxer with the file name endings of its containers.
MEDIA_FORMATS = {
    "mov": (".mov", ".mp4", ".m4a", ".m4b", ".m4v", ".3gp", ".3g2", ".f4v", ".f4a"), "matroska": (".mkv", ".mka"),
    "webm": (".webm",), "mp3": (".mp3",), "ogg": (".ogg", ".oga", ".ogv", ".opus", ".spx"), "wav": (".wav",),
    "w64": (".w64",), "flac": (".flac",), "aac": (".aac",), "ac3": (".ac3",), "eac3": (".eac3", ".ec3"),
    "mpegts": (".ts", ".mts", ".m2ts"), "mpeg": (".mpg", ".mpeg", ".vob"), "asf": (".asf", ".wma", ".wmv"),
    "avi": (".avi",), "flv": (".flv",), "amr": (".amr",), "aiff": (".aif", ".aiff", ".aifc"), "caf": (".caf",),
    "au": (".au", ".snd"), "wv": (".wv",), "ape": (".ape",)}
MEDIA_DEMUXERS = tuple(MEDIA_FORMATS)
# What an upload field lets through by name: it judges by extension, and by mimetypes only for the
# names the host's /etc/mime.types knows (a Space image has none: .flac, .mkv would be refused).
MEDIA_EXTENSIONS = tuple(sorted({ext for exts in MEDIA_FORMATS.values() for ext in exts}))
LOCAL_ONLY = ["-protocol_whitelist", "file,pipe", "-format_whitelist", ",".join(MEDIA_DEMUXERS)]
MONO_AT_ONCE = 60 * 48_000 * 2  # samples decoded in one piece; longer audio is mixed down and resampled in blocks
# libsndfile's frame count of a file whose header leaves its length open (a FLAC written to a pipe)
UNKNOWN_FRAMES = 2**62


class AudioError(ValueError):
    """Audio that cannot be decoded; the message says why."""


class TooLong(AudioError):
    """Audio over a length limit; `seconds` is its length, or None when it is only known to be longer."""

    def __init__(self, seconds: float | None, max_seconds: float):
        self.seconds = seconds
        self.max_seconds = max_seconds
        super().__init__(f"longer than {max_seconds:g} s" if seconds is None else f"{seconds:.1f} s long, "
                         f"over the limit of {max_seconds:g} s")


def load_audio(source: str | Path | bytes, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None,
               timeout: float | None = None) -> np.ndarray:
    """Decode a file (path or bytes) to mono float32 at `sample_rate`. Returns shape (n_samples,).

    With `max_seconds`, longer audio raises TooLong and no more than that is decoded; `timeout`
    bounds an ffmpeg run (seconds).
    """
    data = source if isinstance(source, bytes) else None
    if data is None:
        path = Path(source)
        # the app shows these messages: the file's name, not the server's path (as for ffmpeg's below)
        if not path.is_file():
            raise AudioError(f"no such file: {path.name}")
        if path.stat().st_size == 0:
            raise AudioError(f"empty file: {path.name}")
    try:
        wave = _soundfile_decode(io.BytesIO(data) if data is not None else str(source), sample_rate, max_seconds,
                                 timeout)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        wave = to_mono(_ffmpeg_decode(source, sample_rate, max_seconds, timeout), sample_rate, sample_rate)
    if (header := _header_frames(source)) is not None:
        frames, rate = header
        _check_length(round(len(wave) * rate / sample_rate), frames, rate, exact=True)
    return wave


def _soundfile_decode(source, sample_rate: int, max_seconds: float | None, timeout: float | None) -> np.ndarray:
    """Mono float32 at `sample_rate` through libsndfile. Audio of more than MONO_AT_ONCE samples
    (a long recording, or a small FLAC of many channels at a huge rate) is mixed down and
    resampled in blocks, so memory follows the output's length, within `timeout` seconds."""
    with sf.SoundFile(source) as f:
        known = f.frames < UNKNOWN_FRAMES
        exact = known and (f.format != "MP3" or _exact_mp3_length(source))
        if not exact and shutil.which("ffmpeg"):
            # libsndfile's length of such an MP3 is an estimate, and it reads no further: a VBR
            # file whose first frame has a high rate came out at 5.6 of its 12.9 s
            raise _LengthUnknown
        if max_seconds is not None and known and f.frames > max_seconds * f.samplerate:
            raise TooLong(f.frames / f.samplerate, max_seconds)
        if known and f.frames * f.channels <= MONO_AT_ONCE:
            wave = f.read(dtype="float32", always_2d=True)
            _check_length(len(wave), f.frames, f.samplerate, exact)
            return to_mono(wave, f.samplerate, sample_rate)
        deadline = None if timeout is None else time.monotonic() + timeout
        same_rate = f.samplerate == sample_rate
        stream = None if same_rate else soxr.ResampleStream(f.samplerate, sample_rate, 1, dtype="float32",
                                                            quality="HQ")
        parts, decoded = [], 0
        while len(block := f.read(1 << 16, dtype="float32", always_2d=True)):  # f.blocks pads to the header's length
            if deadline is not None and time.monotonic() > deadline:
                raise AudioError(f"decoding took longer than {timeout:.3g} s")
            decoded += len(block)
            if max_seconds is not None and decoded > max_seconds * f.samplerate:
                raise TooLong(None, max_seconds)
            mono = block.mean(axis=1, dtype=np.float32)
            parts.append(mono if same_rate else stream.resample_chunk(mono))
        _check_length(decoded, f.frames, f.samplerate, exact)
        if not same_rate:
            parts.append(stream.resample_chunk(np.zeros(0, np.float32), last=True))
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


class _LengthUnknown(ValueError):
    """An MP3 whose length libsndfile can only estimate, or a file whose header leaves it open:
    decoded with ffmpeg instead."""


def _check_length(decoded: int, declared: int, sr: int, exact: bool) -> None:
    """Refuse audio that decodes well short (a tenth, and half a second) of the length its header
    counts (`exact`): a file cut short would pair the whole transcript with part of the speech."""
    if exact and decoded < 0.9 * declared and declared - decoded > 0.5 * sr:
        raise AudioError(f"cut short: its header says {declared / sr:.2f} s, it holds {decoded / sr:.2f} s")


def _reader(source):
    """read(offset, n) -> the bytes of a path, bytes or a BytesIO there."""
    def read(offset: int, n: int) -> bytes:
        if isinstance(source, (bytes, io.BytesIO)):
            return bytes(source[offset:offset + n] if isinstance(source, bytes) else
                         source.getbuffer()[offset:offset + n])
        with open(source, "rb") as f:
            f.seek(offset)
            return f.read(n)
    return read


def _header_frames(source) -> tuple[int, int] | None:
    """(frames, sample rate) as counted by a WAV file's `data` chunk (PCM or float) or a FLAC
    file's STREAMINFO; None for other formats and for a length left open (a WAV written to a
    pipe, a FLAC encoder that did not know it). libsndfile counts a WAV's frames from the bytes
    there are and stops at a cut FLAC (ffmpeg then decodes what there is): only these headers
    tell such a file cut short."""
    read = _reader(source)
    head = read(0, 12)
    if head[:4] == b"fLaC":
        info = read(4, 22)  # the first block's header (type 0: STREAMINFO), then its fields
        if len(info) < 22 or info[0] & 0x7F:
            return None
        rate = info[14] << 12 | info[15] << 4 | info[16] >> 4  # 20 bits
        frames = (info[17] & 0x0F) << 32 | int.from_bytes(info[18:22], "big")  # 36 bits
        return (frames, rate) if frames and rate else None
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, block = 12, None
    for _ in range(64):  # the chunks before `data` (fmt, LIST, fact, ...)
        chunk = read(pos, 8)
        if len(chunk) < 8:
            return None
        size = int.from_bytes(chunk[4:], "little")
        if chunk[:4] == b"fmt ":
            fmt = read(pos + 8, 16)
            tag, rate, align = (int.from_bytes(fmt[a:b], "little") for a, b in ((0, 2), (4, 8), (12, 14)))
            if tag not in (1, 3, 0xFFFE) or not rate or not align:  # compressed: no fixed bytes per frame
                return None
            block = align, rate
        elif chunk[:4] == b"data":
            open_ended = size == 0 or size >= 0x7FFF0000  # placeholders of writers that could not seek back
            return None if block is None or open_ended else (size // block[0], block[1])
        pos += 8 + size + (size & 1)
    return None


def _exact_mp3_length(source) -> bool:
    """Whether an MP3 (a path or a BytesIO) opens, after its ID3 tag, with a Xing, Info or VBRI
    frame, which counts its frames: only then is libsndfile's length exact, not estimated from
    the first frame's bitrate (a VBR file without one can read 2.5 times too long)."""
    read = _reader(source)
    head = read(0, 10)
    start = 0
    if head[:3] == b"ID3" and len(head) == 10:  # ID3v2: its size is in four 7-bit bytes
        start = 10 + (head[6] << 21 | head[7] << 14 | head[8] << 7 | head[9])
    frame = read(start, 200)  # the tag sits within the first frame's side information
    return any(tag in frame for tag in (b"Xing", b"Info", b"VBRI"))


def to_mono(wave: np.ndarray, sr: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Downmix (n_samples, n_channels) or (n_samples,) audio of any dtype to mono float32 at `sample_rate`."""
    wave = np.asarray(wave)
    if np.issubdtype(wave.dtype, np.integer):
        wave = wave.astype(np.float32) / np.iinfo(wave.dtype).max
    wave = wave.astype(np.float32, copy=False)
    if wave.ndim == 2:
        wave = wave.mean(axis=1)
    elif wave.ndim != 1:
        raise AudioError(f"audio must have shape (samples,) or (samples, channels), got {wave.shape}")
    if sr != sample_rate and wave.size:
        wave = soxr.resample(wave, sr, sample_rate, quality="HQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(wave)


def _ffmpeg_decode(source: str | Path | bytes, sample_rate: int, max_seconds: float | None = None,
                   timeout: float | None = None) -> np.ndarray:
    """Decode anything ffmpeg reads (video, AAC, ...) to mono float32 PCM at `sample_rate`, shape (n, 1).
    With `max_seconds`, decodes one second more than that at most, to tell whether the audio is longer."""
    if shutil.which("ffmpeg") is None:
        raise AudioError("this format needs ffmpeg, which is not installed (apt-get install ffmpeg)")
    is_bytes = isinstance(source, bytes)
    limit = ["-t", f"{max_seconds + 1:g}"] if max_seconds is not None else []
    cmd = ["ffmpeg", "-nostdin", "-v", "error", *LOCAL_ONLY, "-i", "pipe:0" if is_bytes else str(source),
           *limit, "-vn", "-ac", "1", "-ar", str(sample_rate), "-f", "f32le", "pipe:1"]
    try:
        proc = subprocess.run(cmd, input=source if is_bytes else None, capture_output=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as e:
        raise AudioError(f"decoding took longer than {timeout:.3g} s") from e
    if proc.returncode != 0:
        reason = proc.stderr.decode(errors="replace").strip().splitlines()
        reason = reason[-1] if reason else "ffmpeg failed"
        if "does not contain any stream" in reason:  # ffmpeg's words for an input with nothing to keep after -vn
            raise AudioError("the file has no audio track")
        if not is_bytes:  # the app shows this message: the file's name, not the server's path
            reason = reason.replace(str(source), Path(source).name)
        raise AudioError(f"cannot decode audio: {reason}")
    wave = np.frombuffer(proc.stdout, dtype=np.float32)
    if max_seconds is not None and len(wave) > max_seconds * sample_rate:
        raise TooLong(None, max_seconds)
    return wave.reshape(-1, 1)


def probe_seconds(source: str | Path, timeout: float = 20.0) -> float | None:
    """Duration of a media file from its header, without decoding; None when unknown. An MP3
    without a Xing, Info or VBRI frame has no length to read: libsndfile and ffprobe both
    estimate it from the first frame's bitrate (a 38 s VBR file read 433 s and 425 s)."""
    try:
        info = sf.info(str(source))
        if info.frames >= UNKNOWN_FRAMES:
            return None
        return info.duration if info.format != "MP3" or _exact_mp3_length(str(source)) else None
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        pass
    cmd = ["ffprobe", "-v", "error", *LOCAL_ONLY, "-show_entries", "format=format_name,duration",
           "-of", "default=noprint_wrappers=1", str(source)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        fields = dict(line.partition("=")[::2] for line in proc.stdout.splitlines())
        if fields.get("format_name") == "mp3" and not _exact_mp3_length(str(source)):
            return None
        return float(fields["duration"])
    except (OSError, subprocess.TimeoutExpired, KeyError, ValueError):
        return None


def n_audio_frames(n_samples: int) -> int:
    """Frames of a Whisper input that see any of `n_samples` samples (the rest only see padding)."""
    # Frame t is centred on sample t*HOP_LENGTH and spans N_FFT samples, so it sees sample
    # n_samples - 1 while t*HOP_LENGTH - N_FFT/2 <= n_samples - 1; later frames are all zeros.
    return min(N_FRAMES, (n_samples - 1 + N_FFT // 2) // HOP_LENGTH + 1)


def trimmed_features(feature_extractor, waves: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
    """Whisper log-Mel features of a batch, trimmed to the frames that hold audio.

    Returns, per wave, `(features (n_mels, n_frames), fill)` where `fill` is the value of every
    frame after `n_frames` in the padded 30 s input. Exact: `pad_features(*result)` equals
    `feature_extractor(wave)["input_features"][0]`.
    """
    # The extractor's padded frames hold log10(1e-10) clipped at (max - 8); the max over a
    # zero-padded tail equals the max over the audio frames, so a short padding is enough.
    # Never pad past N_SAMPLES: frames beyond the 30 s window could raise that max.
    padded = [np.pad(w[:N_SAMPLES], (0, min(N_FFT, N_SAMPLES - len(w[:N_SAMPLES])))) for w in waves]
    feats = feature_extractor(padded, sampling_rate=SAMPLE_RATE, padding="longest",
                              return_tensors="np").input_features
    out = []
    for wave, f in zip(waves, feats):
        n = n_audio_frames(min(len(wave), N_SAMPLES))
        trimmed = f[:, :n]
        fill = max(-1.5, float(trimmed.max()) - 2.0)  # (max(log_max - 8, -10) + 4) / 4
        out.append((np.ascontiguousarray(trimmed, dtype=np.float32), fill))
    return out


def pad_features(features: np.ndarray, fill: float, n_frames: int = N_FRAMES) -> np.ndarray:
    """Rebuild the padded Whisper input (n_mels, n_frames) float32 from trimmed (n_mels, n) features."""
    out = np.full((features.shape[0], n_frames), fill, dtype=np.float32)
    n = min(features.shape[1], n_frames)
    out[:, :n] = features[:, :n]
    return out


def is_silent(wave: np.ndarray, threshold: float = 1e-4) -> bool:
    """True for empty audio or audio whose peak stays below `threshold` (digital silence)."""
    return wave.size == 0 or float(np.max(np.abs(wave))) < threshold
