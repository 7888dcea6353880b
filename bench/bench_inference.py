"""CPU speed and accuracy of the app's transcription paths on the same Swedish speech.

    WHISPER_TEST_MODEL=/path/to/whisper-base python bench/bench_inference.py
    python bench/bench_inference.py --model checkpoints/<run>/best --minutes 3 --threads 2

Speaks a few minutes of Swedish with espeak-ng (sentences from tests/fixtures/sv-sentences.txt),
exports the model to CTranslate2 int8 in a temporary folder, then transcribes the recording with
1. the transformers path (the app's reference: Whisper's sequential long-form decoding, greedy),
2. the app's path (`whisper_ft.transcribe.load_transcriber` with the int8 export: faster-whisper's
   sequential transcription, each window unconditioned on the text before it), greedy and with
   beam 5 (the default, app.beam_size=5),
3. faster-whisper on the same int8 export, with its defaults (sequential, each window conditioned
   on the text before it, beam 5), greedy, and its batched pipeline (beam 5),
and prints each real-time factor, its ratio to faster-whisper's, and the WER against the
spoken text. Model loading is not timed; each path transcribes a short clip first to warm up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from whisper_ft.audio import SAMPLE_RATE, load_audio  # noqa: E402
from whisper_ft.metrics import wer_normalized  # noqa: E402

SENTENCES = ROOT / "tests" / "fixtures" / "sv-sentences.txt"
PAUSE_SECONDS = 0.4


def make_recording(sentences: list[str], seconds: float, work: Path, seed: int = 0) -> tuple[np.ndarray, str]:
    """Sentences spoken by alternating espeak-ng voices until `seconds` of audio; returns
    (mono float32 16 kHz wave, the spoken text)."""
    from whisper_ft.synth import Speaker, require_tools, speak

    require_tools()
    rng = random.Random(seed)
    voices = [Speaker(f"bench-{v}", v, 150, 50, "", "", "") for v in ("sv+m1", "sv+f2", "sv+m3")]
    pause = np.zeros(int(PAUSE_SECONDS * SAMPLE_RATE), np.float32)
    waves, spoken, total = [], [], 0.0
    order = rng.sample(sentences, len(sentences))
    for i, text in enumerate(order):
        if total >= seconds:
            break
        mp3 = work / f"s{i:04d}.mp3"
        speak(text, voices[i % len(voices)], mp3)
        wave = load_audio(mp3)
        waves += [wave, pause]
        spoken.append(text)
        total += (len(wave) + len(pause)) / SAMPLE_RATE
    return np.concatenate(waves), " ".join(spoken)


def link_model(model: Path, work: Path) -> Path:
    """A folder of links to the model's files, so that the export lands in `work`, not beside the model."""
    out = work / "model"
    out.mkdir()
    for f in model.iterdir():
        if f.is_file():
            (out / f.name).symlink_to(f.resolve())
    return out


def timed(name: str, transcribe, wave: np.ndarray, reference: str) -> dict:
    transcribe(wave[: 5 * SAMPLE_RATE])  # warm-up
    start = time.perf_counter()
    text = transcribe(wave)
    elapsed = time.perf_counter() - start
    seconds = len(wave) / SAMPLE_RATE
    row = {"path": name, "seconds": round(elapsed, 2), "rtf": elapsed / seconds,
           "wer": wer_normalized([reference], [text]), "text": text}
    print(f"  {name}: {elapsed:.1f} s, RTF {row['rtf']:.3f}, WER {row['wer']:.3f}", flush=True)
    return row


def run_paths(model: Path, ct2_dir: Path, wave: np.ndarray, reference: str, threads: int) -> list[dict]:
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    from whisper_ft.transcribe import CT2Transcriber, load_transcriber

    rows = []
    # Greedy: transformers' beam search reorders the cross-attention cache at every step, which
    # makes beam 5 over a batch of windows take tens of minutes on two cores.
    reference_path = load_transcriber(str(model), use_ctranslate2=False, beam_size=1)
    rows.append(timed("transformers, long-form (greedy)", lambda w: reference_path.transcribe(w).text, wave, reference))
    del reference_path
    for beam in (1, 5):
        app_path = load_transcriber(str(model), use_ctranslate2=True, beam_size=beam, cpu_threads=threads)
        assert isinstance(app_path, CT2Transcriber), "the app did not pick up the CTranslate2 export"
        rows.append(timed(f"app: CT2 int8 (beam {beam})", lambda w: app_path.transcribe(w).text, wave, reference))
        del app_path
    fw = WhisperModel(str(ct2_dir), device="cpu", compute_type="int8", cpu_threads=threads, local_files_only=True)
    for beam in (5, 1):
        def run(w, beam=beam):
            segments, _ = fw.transcribe(w, language="sv", beam_size=beam)
            return " ".join(s.text.strip() for s in segments)
        rows.append(timed(f"faster-whisper int8 (beam {beam})", run, wave, reference))
    batched = BatchedInferencePipeline(fw)

    def run_batched(w):
        segments, _ = batched.transcribe(w, language="sv", beam_size=5, batch_size=8)
        return " ".join(s.text.strip() for s in segments)
    rows.append(timed("faster-whisper int8 batched (beam 5)", run_batched, wave, reference))
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("WHISPER_TEST_MODEL", ""),
                        help="transformers Whisper folder (default: $WHISPER_TEST_MODEL)")
    parser.add_argument("--minutes", type=float, default=3.0, help="length of the Swedish recording")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and CTranslate2")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    model = Path(args.model)
    if not args.model or not (model / "config.json").is_file():
        print("error: pass --model DIR or set WHISPER_TEST_MODEL to a local Whisper folder", file=sys.stderr)
        return 2

    import torch

    from whisper_ft import ct2

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        work = Path(tmp)
        (work / "speech").mkdir()
        wave, reference = make_recording(SENTENCES.read_text(encoding="utf-8").splitlines(), args.minutes * 60,
                                         work / "speech")
        print(f"{len(wave) / SAMPLE_RATE:.0f} s of Swedish speech; {cpu_name()}, {args.threads} threads", flush=True)
        linked = link_model(model, work)
        start = time.perf_counter()
        ct2_dir = ct2.export(linked)
        print(f"CTranslate2 int8 export: {time.perf_counter() - start:.1f} s", flush=True)
        rows = run_paths(linked, ct2_dir, wave, reference, args.threads)

    base = next(r for r in rows if r["path"] == "faster-whisper int8 (beam 5)")["rtf"]
    ref_wer = rows[0]["wer"]
    print(f"\n{'path':38} {'RTF':>7} {'x faster-whisper b5':>20} {'x transformers':>15} {'WER':>7}")
    for r in rows:
        print(f"{r['path']:38} {r['rtf']:7.3f} {r['rtf'] / base:20.2f} {r['rtf'] / rows[0]['rtf']:15.2f} "
              f"{r['wer']:7.3f}")
    greedy = next(r for r in rows if r["path"] == "faster-whisper int8 (beam 1)")["rtf"]
    for app in rows[1:3]:
        print(f"{app['path']}: {app['rtf'] / base:.2f}x faster-whisper int8 beam 5, {app['rtf'] / greedy:.2f}x "
              f"greedy (target <= 1.25); WER {app['wer']:.3f} vs transformers {ref_wer:.3f} (target: no worse)")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "threads": args.threads,
                                               "audio_seconds": len(wave) / SAMPLE_RATE, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
