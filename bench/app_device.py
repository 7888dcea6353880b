"""The app's transcription on a device, loaded as `inference_app.py` loads it
(`whisper_ft.transcribe.load_transcriber` with app.device), on a random-weight Whisper of a real
shape: one window, then long-form audio over two windows (the first recording includes the
device's warm-up).

    python bench/app_device.py --size small --device cuda

Random weights decode every window to the cap (448 tokens) and their text is noise: the times
are the longest a window can take, not a speed of speech. Prints a JSON line: the backend the
page would name, the load time, and per recording its seconds and real-time factor.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_e2e import make_model  # noqa: E402
from bench_training import SIZES  # noqa: E402
from whisper_ft.audio import SAMPLE_RATE  # noqa: E402
from whisper_ft.transcribe import app_device, load_transcriber  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", default="auto", help="app.device: auto, cpu, cuda or cuda:N")
    parser.add_argument("--seconds", type=float, default=(5.0, 35.0), nargs=2, metavar=("SHORT", "LONG"),
                        help="lengths of the two recordings (default 5 and 35)")
    parser.add_argument("--work", type=Path, help="folder for the model (default: a temporary one)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        model = make_model((args.work or Path(scratch)) / f"app-{args.size}", args.size)
        device = app_device(args.device)
        start = time.perf_counter()
        transcriber = load_transcriber(str(model), use_ctranslate2=False, temperature_fallback=False, device=device)
        result = {"device": device, "backend": transcriber.backend,
                  "load_seconds": round(time.perf_counter() - start, 2)}
        noise = np.random.default_rng(0).standard_normal(int(max(args.seconds) * SAMPLE_RATE)).astype(np.float32)
        for name, seconds in zip(("short", "long"), args.seconds):
            out = transcriber.transcribe(0.1 * noise[:int(seconds * SAMPLE_RATE)])
            result[name] = {"audio_seconds": out.audio_seconds, "seconds": round(out.elapsed_seconds, 2),
                            "rtf": round(out.rtf, 3), "words": len(out.text.split())}
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
