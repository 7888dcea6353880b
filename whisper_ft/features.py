"""Feature store: utterances -> trimmed Whisper log-Mel features + token labels on disk.

Layout of `data/features/<name>/`:

    processor/                      tokenizer + feature extractor (later stages need no hub)
    plan.json                       fingerprint of the inputs and the shard list
    config.yaml                     resolved config that produced the store
    train/shard-00000-of-00004/     HF datasets Arrow folders (memory-mapped when read),
    eval/shard-00000-of-00001/      each with stats.json; renamed into place when complete
    manifest.json                   written last: sources, counts, hours, drops by reason

A shard is the unit of work and of resumption: a rerun skips finished shards, a killed run
leaves only temporary folders behind, and `num_shards`/`shard_index` split the shard list
across processes or machines.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from whisper_ft.audio import SAMPLE_RATE, AudioError, load_audio, pad_features, trimmed_features
from whisper_ft.files import write_atomic
from whisper_ft.sources import EVAL, TRAIN, ArrowAudio, Row
from whisper_ft.text import tidy_sentence

FORMAT_VERSION = 2  # 2: the last frame that sees audio is always kept
MANIFEST = "manifest.json"
PLAN = "plan.json"
PROCESSOR_DIR = "processor"
STATS = "stats.json"
SPLITS = (TRAIN, EVAL)
DROP_REASONS = ("missing_file", "empty_file", "undecodable", "empty_sentence", "too_short", "too_long",
                "labels_too_long")


class FeaturesError(ValueError):
    """A feature store that is missing, incomplete or built for something else."""


@dataclass(frozen=True)
class Limits:
    """What an utterance must satisfy to be kept."""

    min_seconds: float = 0.5
    max_seconds: float = 30.0
    max_label_tokens: int = 448


@dataclass(frozen=True)
class Shard:
    split: str
    index: int
    count: int
    rows: tuple[Row, ...]

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"

    def path(self, root: Path) -> Path:
        return root / self.split / self.name


# --------------------------------------------------------------------------- encoding


def encode_batch(rows: Iterable[Row], feature_extractor, tokenizer, limits: Limits) -> tuple[list[dict], Counter]:
    """Decode, filter, featurize and tokenize rows. Returns (examples, drops by reason).

    Never raises for one bad row: it is counted under its reason instead.
    """
    drops: Counter = Counter()
    kept: list[tuple[Row, str, list[int], np.ndarray]] = []
    for row in rows:
        sentence = tidy_sentence(row.sentence)
        if not sentence:
            drops["empty_sentence"] += 1
            continue
        labels = tokenizer(sentence).input_ids
        if len(labels) > limits.max_label_tokens:
            drops["labels_too_long"] += 1
            continue
        reason, wave = _decode(row)
        if reason is None:
            seconds = len(wave) / SAMPLE_RATE
            reason = "too_long" if seconds > limits.max_seconds else "too_short" if seconds < limits.min_seconds else None
        if reason:
            drops[reason] += 1
            continue
        kept.append((row, sentence, labels, wave))
    feats = trimmed_features(feature_extractor, [k[3] for k in kept]) if kept else []
    examples = [
        {"id": row.id, "source": row.source, "speaker": row.speaker, "sentence": sentence,
         "gender": row.meta.get("gender", ""), "accents": row.meta.get("accents", ""),
         "duration": len(wave) / SAMPLE_RATE, "input_features": f.T, "fill": fill, "labels": labels}
        for (row, sentence, labels, wave), (f, fill) in zip(kept, feats)
    ]
    return examples, drops


def _decode(row: Row) -> tuple[str | None, np.ndarray | None]:
    audio = row.audio.read() if isinstance(row.audio, ArrowAudio) else row.audio
    if isinstance(audio, str):
        if not audio or not os.path.isfile(audio):
            return "missing_file", None
        if os.path.getsize(audio) == 0:
            return "empty_file", None
    elif not audio:
        return "empty_file", None
    try:
        wave = load_audio(audio)
    except (AudioError, OSError, ValueError, RuntimeError):
        return "undecodable", None
    if wave.size == 0 or not np.isfinite(wave).all():
        return "undecodable", None
    return None, wave


# --------------------------------------------------------------------------- shards on disk


def arrow_features(n_mels: int, dtype: str):
    from datasets import Array2D, Features, List, Value

    return Features({
        "id": Value("string"), "source": Value("string"), "speaker": Value("string"),
        "sentence": Value("string"), "gender": Value("string"), "accents": Value("string"),
        "duration": Value("float32"),
        "input_features": Array2D(shape=(None, n_mels), dtype=dtype),  # (frames, mels): frames vary
        "fill": Value("float32"),
        "labels": List(Value("int32")),
    })


def write_shard(path: Path, examples: list[dict], drops: Counter, n_rows: int, n_mels: int, dtype: str) -> dict:
    """Write one shard folder atomically (temporary name, then rename) and return its stats."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()  # the pipeline shows one bar of its own
    schema = arrow_features(n_mels, dtype)
    columns = {name: [ex[name] for ex in examples] for name in schema}
    columns["input_features"] = [np.asarray(x, dtype=dtype) for x in columns["input_features"]]
    ds = Dataset.from_dict(columns, features=schema)
    stats = {"rows": n_rows, "clips": len(examples), "seconds": float(sum(ex["duration"] for ex in examples)),
             "by_source": dict(Counter(ex["source"] for ex in examples)), "dropped": dict(drops)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(str(tmp))
    (tmp / STATS).write_text(json.dumps(stats, indent=1))
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished the same shard first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return stats


def plan_shards(rows: dict[str, list[Row]], shard_size: int) -> list[Shard]:
    """Split each split's rows, in order, into shards of at most `shard_size` rows."""
    shards = []
    for split in SPLITS:
        items = rows.get(split, [])
        count = max(1, -(-len(items) // shard_size))
        shards += [Shard(split, i, count, tuple(items[i * shard_size:(i + 1) * shard_size])) for i in range(count)]
    return shards


def fingerprint(settings: dict, shards: list[Shard]) -> str:
    """Hash of everything that decides the content of the store."""
    h = hashlib.sha256(json.dumps({"format_version": FORMAT_VERSION, **settings}, sort_keys=True).encode())
    for s in shards:
        h.update(f"{s.split}/{s.name}:{len(s.rows)}:".encode())
        for r in s.rows:
            h.update(f"{r.source}|{r.id}|{r.sentence}\n".encode())
    return h.hexdigest()[:16]


def is_done(root: Path, shard: Shard) -> bool:
    return (shard.path(root) / STATS).is_file()


def clean_partial(root: Path) -> None:
    """Remove temporary shards and manifests whose writing process is gone (a killed run)."""
    shards = (t for split in SPLITS for t in (root / split).glob(".shard-*.tmp-*"))
    for tmp in [*root.glob(f".{MANIFEST}.tmp-*"), *shards]:
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


# --------------------------------------------------------------------------- manifest and reading


def build_manifest(root: Path, shards: list[Shard], header: dict) -> dict:
    """Aggregate shard stats into the manifest, write it (atomically, last) and return it."""
    splits: dict[str, dict] = {}
    for split in SPLITS:
        parts = [s for s in shards if s.split == split]
        stats = [json.loads((s.path(root) / STATS).read_text()) for s in parts]
        dropped: Counter = Counter()
        by_source: Counter = Counter()
        for st in stats:
            dropped.update(st["dropped"])
            by_source.update(st["by_source"])
        splits[split] = {
            "rows": sum(st["rows"] for st in stats), "clips": sum(st["clips"] for st in stats),
            "hours": round(sum(st["seconds"] for st in stats) / 3600, 4),
            "by_source": dict(by_source), "dropped": {r: dropped[r] for r in DROP_REASONS if dropped[r]},
            "shards": [f"{split}/{s.name}" for s in parts],
        }
    manifest = {**header, "format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "splits": splits}
    write_atomic(root / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False))
    return manifest


def read_manifest(root: str | Path) -> dict:
    """The manifest of a complete feature store, or a FeaturesError saying what to run."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise FeaturesError(f"no finished features in {root} (no {MANIFEST}): run python feature_pipeline.py "
                            "with the same config first")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FeaturesError(f"{root} was written by another version of the feature format "
                            f"({manifest.get('format_version')} != {FORMAT_VERSION}): rerun python feature_pipeline.py")
    return manifest


def load_split(root: str | Path, split: str):
    """A memory-mapped `datasets.Dataset` of one split (all its shards, in order)."""
    from datasets import Dataset, concatenate_datasets, load_from_disk

    root = Path(root)
    manifest = read_manifest(root)
    if split not in manifest["splits"]:
        raise FeaturesError(f"{root} has no split {split!r} (has {', '.join(manifest['splits'])})")
    # A shard whose rows were all dropped holds no Arrow file, which load_from_disk cannot read.
    names = [n for n in manifest["splits"][split]["shards"] if json.loads((root / n / STATS).read_text())["clips"]]
    parts = [load_from_disk(str(root / name)) for name in names]
    if not parts:
        schema = arrow_features(manifest["feature_extractor"]["n_mels"], manifest["dtype"])
        return Dataset.from_dict({name: [] for name in schema}, features=schema)
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def input_features(example: dict, n_frames: int = 3000) -> np.ndarray:
    """The padded Whisper input (n_mels, n_frames) float32 of a stored example."""
    return pad_features(np.asarray(example["input_features"], dtype=np.float32).T, float(example["fill"]), n_frames)


def check_compatible(manifest: dict, model_config, tokenizer) -> None:
    """Refuse features built for another model family, mel bin count or tokenizer."""
    fx = manifest["feature_extractor"]
    tk = manifest["tokenizer"]
    rerun = ("rebuild them for this model: python feature_pipeline.py --set model.name_or_path=<the model>, "
             "or train the model the features were built for")
    if fx["n_mels"] != model_config.num_mel_bins:
        raise FeaturesError(f"features have {fx['n_mels']} mel bins but the model expects "
                            f"{model_config.num_mel_bins} ({manifest['model']['name_or_path']}): {rerun}")
    if tk["vocab_size"] != len(tokenizer):
        raise FeaturesError(f"features were tokenized with a vocabulary of {tk['vocab_size']} tokens, the model's "
                            f"tokenizer has {len(tokenizer)}: {rerun}")
    if list(tk["prefix_tokens"]) != list(tokenizer.prefix_tokens):
        raise FeaturesError(f"features carry the prefix tokens {tk['prefix_tokens']}, the tokenizer makes "
                            f"{list(tokenizer.prefix_tokens)} (another language or task): {rerun}")


def iter_batches(rows: tuple[Row, ...], batch_size: int) -> Iterator[tuple[Row, ...]]:
    for i in range(0, len(rows), batch_size):
        yield rows[i:i + batch_size]


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Processor:
    """What `WhisperProcessor` holds, loaded without it: importing transformers' processing
    module costs several seconds per start, which is most of the run on a small dataset."""

    feature_extractor: Any
    tokenizer: Any

    def save_pretrained(self, path: str | Path) -> None:
        """Write a folder that `WhisperProcessor.from_pretrained` (and `model.load_processor`) reads."""
        self.feature_extractor.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))


def load_feature_processor(name_or_path: str, language: str = "sv", task: str = "transcribe") -> Processor:
    """Feature extractor and tokenizer (<|sv|><|transcribe|><|notimestamps|> prefix) of a Whisper model."""
    from transformers import WhisperFeatureExtractor, WhisperTokenizer

    from whisper_ft.model import ModelNotFound, first_line, resolve, set_language

    where = resolve(name_or_path)
    try:
        processor = Processor(WhisperFeatureExtractor.from_pretrained(where), WhisperTokenizer.from_pretrained(where))
    except OSError as e:
        raise ModelNotFound(f"cannot load a Whisper processor from {name_or_path}: {first_line(e)}") from e
    set_language(processor.tokenizer, language, task)
    return processor


_WORKER: dict = {}  # per worker process: the feature extractor, tokenizer and limits


def _init_worker(processor: Processor, limits: Limits) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already
    _WORKER.update(fe=processor.feature_extractor, tok=processor.tokenizer, limits=limits)


def _encode_in_worker(rows: tuple[Row, ...]) -> tuple[list[dict], Counter]:
    return encode_batch(rows, _WORKER["fe"], _WORKER["tok"], _WORKER["limits"])


def build_shards(root: Path, todo: list[Shard], processor: Processor, limits: Limits, dtype: str, workers: int,
                 batch_size: int, progress=None) -> Iterator[tuple[Shard, dict]]:
    """Encode and write the shards in `todo`, yielding (shard, stats) as each one lands on disk.

    Batches of every shard go through one process pool in order, so all cores stay busy even
    when there are fewer shards than cores. Workers are forked with the processor already
    loaded. `progress(n_rows, n_kept)` is called per batch.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(shard, batch) for shard in todo for batch in iter_batches(shard.rows, batch_size)]
    init_args = (processor, limits)
    n_mels = processor.feature_extractor.feature_size
    if workers <= 1:
        _init_worker(*init_args)
        results = map(_encode_in_worker, (batch for _, batch in jobs))
        pool = None
    else:
        # An executor, unlike multiprocessing.Pool, fails loudly when a worker dies or cannot start.
        pool = ProcessPoolExecutor(workers, multiprocessing.get_context("fork"), _init_worker, init_args)
        results = pool.map(_encode_in_worker, (batch for _, batch in jobs))
    try:
        pending: dict[tuple[str, int], tuple[list[dict], Counter, list[int]]] = {}
        for (shard, batch), (examples, drops) in zip(jobs, results):
            key = (shard.split, shard.index)
            acc = pending.setdefault(key, ([], Counter(), [0]))
            acc[0].extend(examples)
            acc[1].update(drops)
            acc[2][0] += len(batch)
            if progress:
                progress(len(batch), len(examples))
            if acc[2][0] == len(shard.rows):
                examples_all, drops_all, _ = pending.pop(key)
                shard.path(root).parent.mkdir(parents=True, exist_ok=True)
                yield shard, write_shard(shard.path(root), examples_all, drops_all, len(shard.rows), n_mels, dtype)
        for shard in todo:  # shards with no rows at all
            if not shard.rows:
                shard.path(root).parent.mkdir(parents=True, exist_ok=True)
                yield shard, write_shard(shard.path(root), [], Counter(), 0, n_mels, dtype)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
