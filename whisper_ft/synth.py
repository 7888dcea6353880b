"""Synthetic Swedish speech in Common Voice release format, made with espeak-ng and ffmpeg.

Builds the embedded sample (`scripts/make_sample.py`) and the test fixtures: a
`<out>/sv-SE/` folder with train/dev/test/validated TSVs, `clip_durations.tsv` and
`clips/common_voice_sv-SE_<n>.mp3` (48 kHz mono), speakers varied by voice, rate and pitch,
optionally with background noise at a random signal-to-noise ratio per clip.
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from whisper_ft.errors import UserError

CV_COLUMNS = ("client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes", "age",
              "gender", "accents", "variant", "locale", "segment")
VOICES = tuple(f"sv+m{i}" for i in range(1, 8)) + tuple(f"sv+f{i}" for i in range(1, 5))
ACCENTS = ("Stockholm", "Göteborg", "Skåne", "Norrland", "Finlandssvenska", "")


@dataclass(frozen=True)
class Speaker:
    client_id: str
    voice: str
    rate: int
    pitch: int
    age: str
    gender: str
    accents: str


class SynthError(UserError, RuntimeError):
    """Synthetic speech that cannot be made (a tool missing, too few sentences); the message says what to do."""


def require_tools() -> None:
    missing = [t for t in ("espeak-ng", "ffmpeg") if shutil.which(t) is None]
    if missing:
        raise SynthError(f"synthetic speech needs {' and '.join(missing)} (apt-get install espeak-ng ffmpeg)")


def usable_sentences(sentences: list[str], needed: int, max_words: int = 14) -> list[str]:
    """The sentences of at most `max_words` words, in order; SynthError when there are fewer than
    `needed` (one per clip), checked before anything is written."""
    pool = [s for s in sentences if s.strip() and len(s.split()) <= max_words]
    if needed > len(pool):
        raise SynthError(f"{needed} clips asked for, only {len(pool)} usable sentences (non-empty, at most "
                         f"{max_words} words): give more sentences or ask for fewer clips")
    return pool


def make_speakers(n: int, rng: random.Random) -> list[Speaker]:
    speakers = []
    for i in range(n):
        voice = VOICES[i % len(VOICES)]
        gender = "female_feminine" if "+f" in voice else "male_masculine"
        client = hashlib.sha256(f"speaker-{i}-{voice}".encode()).hexdigest()
        speakers.append(Speaker(client, voice, rng.randint(135, 185), rng.randint(30, 70),
                                rng.choice(["twenties", "thirties", "fourties", "fifties"]), gender,
                                rng.choice(ACCENTS)))
    return speakers


def speak(text: str, speaker: Speaker, mp3: Path, bitrate: str = "48k", snr_db: float | None = None,
          seed: int = 0) -> float:
    """Synthesize `text` into a 48 kHz mono MP3, with white noise at `snr_db` if given;
    returns its duration in seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "x.wav"
        subprocess.run(["espeak-ng", "-v", speaker.voice, "-s", str(speaker.rate), "-p", str(speaker.pitch),
                        "-w", str(wav), text], check=True, capture_output=True)
        seconds = sf.info(str(wav)).duration
        if snr_db is not None:
            add_noise(wav, snr_db, np.random.default_rng(seed))
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(wav), "-ar", "48000", "-ac", "1",
                        "-c:a", "libmp3lame", "-b:a", bitrate, str(mp3)], check=True, capture_output=True)
    return seconds


def add_noise(wav: Path, snr_db: float, rng: np.random.Generator) -> None:
    """Mix white noise into a WAV file in place at `snr_db` dB below the speech's power."""
    audio, rate = sf.read(str(wav), dtype="float32")
    power = float(np.mean(audio ** 2)) or 1e-8
    noise = rng.standard_normal(audio.shape).astype(np.float32) * np.sqrt(power / 10 ** (snr_db / 10))
    sf.write(str(wav), np.clip(audio + noise, -1.0, 1.0), rate)


def make_release(out: Path, sentences: list[str], counts: dict[str, int], seed: int = 0, n_speakers: int = 12,
                 bitrate: str = "48k", max_words: int = 14, jobs: int | None = None,
                 snr_db: tuple[float, float] | None = None) -> Path:
    """Write a Common Voice style release to `out/sv-SE`; returns that folder.

    `counts` maps split name (train, dev, test) to a number of clips. Speakers do not cross
    splits, as in Common Voice. `snr_db` (low, high) adds white noise to every clip at a
    signal-to-noise ratio drawn uniformly from that range.
    """
    require_tools()
    rng = random.Random(seed)
    pool = usable_sentences(sentences, sum(counts.values()), max_words)
    rng.shuffle(pool)
    speakers = make_speakers(n_speakers, rng)
    per_split = _assign_speakers(speakers, list(counts))
    root = out / "sv-SE"
    (root / "clips").mkdir(parents=True, exist_ok=True)
    jobs_list = []
    n = 0
    for split, count in counts.items():
        for i in range(count):
            spk = per_split[split][i % len(per_split[split])]
            snr = rng.uniform(*snr_db) if snr_db else None
            jobs_list.append((split, n, pool[n], spk, snr))
            n += 1
    with ThreadPoolExecutor(jobs or os.cpu_count() or 2) as ex:
        durations = list(ex.map(lambda j: speak(j[2], j[3], root / "clips" / _clip_name(j[1]), bitrate, j[4],
                                                seed=seed * 1_000_003 + j[1]), jobs_list))
    rows_by_split: dict[str, list[dict]] = {s: [] for s in counts}
    for (split, idx, text, spk, _), _ in zip(jobs_list, durations):
        rows_by_split[split].append({
            "client_id": spk.client_id, "path": _clip_name(idx), "sentence_id": hashlib.sha256(text.encode()).hexdigest(),
            "sentence": text, "sentence_domain": "", "up_votes": "2", "down_votes": "0", "age": spk.age,
            "gender": spk.gender, "accents": spk.accents, "variant": "", "locale": "sv-SE", "segment": ""})
    for split, rows in rows_by_split.items():
        write_tsv(root / f"{split}.tsv", rows, CV_COLUMNS)
    write_tsv(root / "validated.tsv", [r for rows in rows_by_split.values() for r in rows], CV_COLUMNS)
    write_tsv(root / "clip_durations.tsv",
              [{"clip": _clip_name(j[1]), "duration[ms]": str(round(d * 1000))} for j, d in zip(jobs_list, durations)],
              ("clip", "duration[ms]"))
    return root


def _assign_speakers(speakers: list[Speaker], splits: list[str]) -> dict[str, list[Speaker]]:
    """Disjoint speaker groups per split (round robin), at least one speaker each."""
    groups: dict[str, list[Speaker]] = {s: [] for s in splits}
    for i, spk in enumerate(speakers):
        groups[splits[i % len(splits)]].append(spk)
    for i, split in enumerate(splits):
        if not groups[split]:
            groups[split] = [speakers[i % len(speakers)]]
    return groups


def _clip_name(n: int) -> str:
    return f"common_voice_sv-SE_{40_000_000 + n}.mp3"


def write_tsv(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, columns, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar=None, quotechar=None,
                           lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
