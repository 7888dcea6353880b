"""Feature step benchmark: the Hugging Face blog recipe against this pipeline, same clips, same cores.

    pip install -r bench/requirements.txt      # torchcodec, which only the blog recipe needs
    python bench/bench_features.py             # the embedded sample (240 MP3 clips, 48 kHz)
    python bench/bench_features.py --copies 4 --release /data/cv-corpus-17.0/sv-SE --limit 2000

(a) blog: "Fine-Tune Whisper For Multilingual ASR with Transformers" - `Audio(sampling_rate=16000)`
    cast, `.map(prepare_dataset, num_proc=cores)` with the feature extractor's padded float32
    30 s input and the tokenizer's labels, then `save_to_disk`.
(b) pipeline: `python feature_pipeline.py` on the same clips with all cores (float16, trimmed).

Each runs in a fresh process and is timed end to end (imports and model loading included),
so the figures are what a user waits for. Prints clips/s, bytes per clip on disk and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from whisper_ft.sources import read_cv_tsv  # noqa: E402
from whisper_ft.synth import CV_COLUMNS, write_tsv  # noqa: E402

SPLITS = ("train", "dev", "test")


def make_release(src: Path, out: Path, copies: int, limit: int) -> tuple[Path, int]:
    """A Common Voice folder holding `copies` copies (hard links) of the first `limit` clips of `src`."""
    dest = out / "sv-SE"
    (dest / "clips").mkdir(parents=True)
    n = 0
    for split in SPLITS:
        rows = []
        for r in read_cv_tsv(src / f"{split}.tsv"):
            if limit and n >= limit * copies:
                break
            for c in range(copies):
                name = f"copy{c}_{r['path']}"
                os.link(src / "clips" / r["path"], dest / "clips" / name)
                rows.append({k: r.get(k, "") for k in CV_COLUMNS} | {"path": name})
                n += 1
        write_tsv(dest / f"{split}.tsv", rows, CV_COLUMNS)
    return dest, n


def run_blog(release: Path, processor: str, out: Path, workers: int) -> None:
    """The blog's feature step, as written there (Common Voice read from the local TSVs)."""
    from datasets import Audio, Dataset, concatenate_datasets
    from transformers import WhisperFeatureExtractor, WhisperTokenizer

    feature_extractor = WhisperFeatureExtractor.from_pretrained(processor)
    tokenizer = WhisperTokenizer.from_pretrained(processor, language="Swedish", task="transcribe")

    def prepare_dataset(batch):
        audio = batch["audio"]
        batch["input_features"] = feature_extractor(audio["array"], sampling_rate=audio["sampling_rate"]).input_features[0]
        batch["labels"] = tokenizer(batch["sentence"]).input_ids
        return batch

    parts = []
    for split in SPLITS:
        rows = read_cv_tsv(release / f"{split}.tsv")
        parts.append(Dataset.from_dict({"audio": [str(release / "clips" / r["path"]) for r in rows],
                                        "sentence": [r["sentence"] for r in rows]}))
    common_voice = concatenate_datasets(parts).cast_column("audio", Audio(sampling_rate=16000))
    common_voice = common_voice.map(prepare_dataset, remove_columns=common_voice.column_names, num_proc=workers)
    common_voice.save_to_disk(str(out))


def run_pipeline(release: Path, processor: str, data_dir: Path, workers: int) -> None:
    cmd = [sys.executable, str(ROOT / "feature_pipeline.py"), "--config", str(ROOT / "config.yaml"),
           "--workers", str(workers), "--set", f"model.name_or_path={processor}",
           "--set", f"features.data_dir={data_dir}", "--set", "features.name=bench",
           "--set", f"features.sources.0.path={release}", "--set", "features.sources.0.name=bench",
           "--set", "features.min_seconds=0.0"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def timed(args: list[str]) -> float:
    """Run this script in a fresh process for one method; returns its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, *args], check=True)
    return time.perf_counter() - start


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def clips_in_store(root: Path) -> int:
    manifest = json.loads((root / "manifest.json").read_text())
    return sum(s["clips"] for s in manifest["splits"].values())


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--release", default=str(ROOT / "data/sample/cv-corpus-sample/sv-SE"), help="Common Voice folder")
    p.add_argument("--processor", default=str(ROOT / "tests/fixtures/whisper-processor"),
                   help="Whisper model or processor folder (80 mel bins, as whisper-small)")
    p.add_argument("--copies", type=int, default=2, help="use every clip this many times")
    p.add_argument("--limit", type=int, default=0, help="at most this many source clips (0 = all)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes for both methods")
    p.add_argument("--only", choices=("blog", "pipeline"), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:  # a child process: one method only
        work = Path(args.work)
        if args.only == "blog":
            run_blog(work / "release" / "sv-SE", args.processor, work / "blog", args.workers)
        else:
            run_pipeline(work / "release" / "sv-SE", args.processor, work / "pipeline", args.workers)
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench-features-"))
    try:
        release, n = make_release(Path(args.release), work / "release", args.copies, args.limit)
        child = ["--processor", args.processor, "--workers", str(args.workers), "--work", str(work)]
        print(f"{n} clips, {args.workers} workers, CPU: {cpu_model()} ({os.cpu_count()} cores)", flush=True)
        t_pipe = timed(["--only", "pipeline", *child])
        t_blog = timed(["--only", "blog", *child])
        store = work / "pipeline" / "features" / "bench"
        kept = clips_in_store(store)
        b_blog, b_pipe = du(work / "blog") / n, du(store) / kept
        r_blog, r_pipe = n / t_blog, kept / t_pipe
        print(f"blog recipe: {n} clips in {t_blog:.1f} s = {r_blog:.1f} clips/s, {b_blog / 1e3:.1f} kB per clip")
        print(f"pipeline:    {kept} clips in {t_pipe:.1f} s = {r_pipe:.1f} clips/s, {b_pipe / 1e3:.1f} kB per clip")
        print(f"speed: {r_pipe / r_blog:.2f}x the clips/s (target >= 3x); "
              f"size: 1/{b_blog / b_pipe:.1f} of the bytes per clip (target <= 1/8)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
