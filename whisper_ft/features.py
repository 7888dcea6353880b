"""Feature store: utterances -> trimmed Whisper log-Mel features + token labels on disk.

    store = FeatureStore.of(cfg)                 # data/features/<features.name>/
    build(cfg)                                   # stage 1 (python feature_pipeline.py)
    store.load("train"), store.load("validation"), store.load("eval")   # stage 2

Layout of `data/features/<name>/`:

    processor/                      tokenizer + feature extractor (later stages need no hub)
    plan.json                       fingerprint of the inputs and the shard list
    config.yaml                     resolved config that produced the store
    train/shard-00000-of-00004/     HF datasets Arrow folders (memory-mapped when read),
    validation/shard-00000-of-00001/  each with stats.json; renamed into place when complete
    eval/shard-00000-of-00001/
    manifest.json                   written last: sources, counts, hours, drops by reason,
                                    overlap between training and held-out rows

Three roles, kept apart: `train` is learned from, `validation` picks checkpoints and
settings, `eval` (the test split) is only reported. Training rows that share a clip or a
sentence with held-out rows stop the build (or are dropped: `features.on_overlap`).

A shard is the unit of work and of resumption: a rerun skips finished shards, a killed run
leaves only temporary folders behind, and `num_shards`/`shard_index` split the shard list
across processes or machines. A process writes a shard only while it holds the shard's claim
(`<split>/.shard-...claim`, `whisper_ft.claims`), so processes sharing the folder, on one
machine or several, never remove or overwrite each other's work in progress.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from whisper_ft.audio import SAMPLE_RATE, AudioError, TooLong, load_audio, pad_features, trimmed_features
from whisper_ft.claims import ClaimSet, gone_here, live_claims, owner_tag, read_holder
from whisper_ft.config import check_folder, first_change, flat, save_config, to_dict, whisper_code
from whisper_ft.errors import UserError, first_line
from whisper_ft.files import create_atomic, fsync_tree, replace_dir, staging_dir, write_atomic
from whisper_ft.sources import EVAL, TRAIN, VALIDATION, ArrowAudio, Row, SourceError, describe, read_source
from whisper_ft.text import normalize, tidy_sentence

FORMAT_VERSION = 3  # 2: the last frame that sees audio is always kept; 3: an age column
READABLE_VERSIONS = (2, 3)  # a version-2 store lacks only the age column, which readers treat as optional
MANIFEST = "manifest.json"
PLAN = "plan.json"
CONFIG = "config.yaml"
PROCESSOR_DIR = "processor"
STATS = "stats.json"
STATS_KEYS = ("rows", "clips", "seconds", "by_source", "dropped")
SPLITS = (TRAIN, VALIDATION, EVAL)
ROLE = {TRAIN: "training", VALIDATION: "validation", EVAL: "test"}
KEEP_AUDIO = "keep_audio"  # Row.meta flag: store this test clip's 16 kHz audio as well
DROP_REASONS = ("missing_file", "empty_file", "undecodable", "empty_sentence", "too_short", "too_long",
                "labels_too_long")

MISSING_SHARE = 0.5  # more of a source split's files missing than this: a release not (fully) copied


class FeaturesError(UserError, ValueError):
    """A feature store that is missing, incomplete or built for something else."""


@dataclass(frozen=True)
class Limits:
    """What an utterance must satisfy to be kept (`features.min_seconds`, `max_seconds`,
    `max_label_tokens`)."""

    min_seconds: float
    max_seconds: float
    max_label_tokens: int


def claim_file(folder: Path, name: str) -> Path:
    """The claim whose holder alone may write `folder/name` (`whisper_ft.claims`)."""
    return folder / f".{name}.claim"


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

    def claim(self, root: Path) -> Path:
        return claim_file(root / self.split, self.name)


# --------------------------------------------------------------------------- encoding


def label_ids(tokenizer, sentence: str, leading_space: bool = True) -> list[int]:
    """Token ids of a label: the prefix (<|startoftranscript|><|sv|><|transcribe|><|notimestamps|>),
    the sentence after a space, as Whisper writes the first word (" Jag" is one token, "Jag" is
    "J" + "ag"; bench/label_space.py), then <|endoftext|>. Text that reads as a special token
    ("<|en|>") is text there: the label is the sentence as written."""
    return tokenizer((" " if leading_space else "") + sentence, split_special_tokens=True).input_ids


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
        labels = label_ids(tokenizer, sentence)
        if len(labels) > limits.max_label_tokens:
            drops["labels_too_long"] += 1
            continue
        reason, wave = _decode(row, limits.max_seconds)
        if reason is None:
            seconds = len(wave) / SAMPLE_RATE
            reason = "too_long" if seconds > limits.max_seconds else "too_short" if seconds < limits.min_seconds else None
        if reason:
            drops[reason] += 1
            continue
        kept.append((row, sentence, labels, wave))
    feats = trimmed_features(feature_extractor, [k[3] for k in kept]) if kept else []
    examples = []
    for (row, sentence, labels, wave), (f, fill) in zip(kept, feats):
        example = {"id": row.id, "source": row.source, "speaker": row.speaker, "sentence": sentence,
                   "gender": row.meta.get("gender", ""), "accents": row.meta.get("accents", ""),
                   "age": row.meta.get("age", ""),
                   "duration": len(wave) / SAMPLE_RATE, "input_features": f.T, "fill": fill, "labels": labels}
        if row.split == EVAL:  # test shards carry an audio column, empty unless the clip is kept for scoring
            example["audio"] = pcm16(wave) if row.meta.get(KEEP_AUDIO) else np.zeros(0, np.int16)
        examples.append(example)
    return examples, drops


def pcm16(wave: np.ndarray) -> np.ndarray:
    """float audio in [-1, 1] -> int16 samples (a quarter of float32's bytes, inaudible loss)."""
    return np.round(np.clip(wave, -1.0, 1.0) * 32767).astype(np.int16)


def mark_served_clips(rows: list[Row], n: int) -> list[Row]:
    """Mark `n` test rows, spread evenly over the split, whose audio is stored too (the served
    model is scored on them after training: `whisper_ft.served`)."""
    if n <= 0 or not rows:
        return rows
    m = min(n, len(rows))
    chosen = {i * len(rows) // m for i in range(m)}
    return [replace(r, meta={**r.meta, KEEP_AUDIO: True}) if i in chosen else r for i, r in enumerate(rows)]


def _decode(row: Row, max_seconds: float) -> tuple[str | None, np.ndarray | None]:
    """(drop reason or None, 16 kHz mono audio); audio longer than `max_seconds` is not decoded
    past it (a long-form recording in a dataset would otherwise be held whole in memory)."""
    audio = row.audio.read() if isinstance(row.audio, ArrowAudio) else row.audio
    if isinstance(audio, str):
        if not audio or not os.path.isfile(audio):
            return "missing_file", None
        if os.path.getsize(audio) == 0:
            return "empty_file", None
    elif not audio:
        return "empty_file", None
    try:
        wave = load_audio(audio, max_seconds=max_seconds)
    except TooLong:
        return "too_long", None
    except (AudioError, OSError, ValueError, RuntimeError):
        return "undecodable", None
    if wave.size == 0 or not np.isfinite(wave).all():
        return "undecodable", None
    return None, wave


def check_clips_present(rows: dict[str, list[Row]]) -> None:
    """Refuse (FeaturesError) a source split more than `MISSING_SHARE` of whose audio files do
    not exist: a release whose clips/ folder is absent or still being copied. Encoded, its rows
    would be dropped one by one as missing_file and the store marked complete, and finishing the
    copy would not rebuild it (the plan lists clips, not whether their files exist). A few
    missing files are dropped and counted as usual. Audio held in bytes or Arrow files is not
    checked."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in (r for split in SPLITS for r in rows.get(split, [])):
        if isinstance(r.audio, str):
            groups.setdefault((r.source, r.id.split("/", 1)[0]), []).append(r.audio)
    for (source, split), paths in groups.items():
        missing = [p for p in paths if not (p and os.path.isfile(p))]
        if len(missing) > MISSING_SHARE * len(paths):
            folder = os.path.dirname(missing[0]) or "(no file name)"
            raise FeaturesError(f"source {source}: {len(missing)} of the {len(paths)} audio files of split {split!r} "
                                f"are missing (looked in {folder}): finish copying the release, or point the "
                                "source at the folder that holds them, and rerun")


# --------------------------------------------------------------------------- shards on disk


def arrow_features(n_mels: int, dtype: str, audio: bool = False):
    """The shard schema; test shards (`audio`) add the int16 16 kHz audio of the served-scoring
    clips (empty for the others)."""
    from datasets import Array2D, Features, List, Value

    return Features({
        "id": Value("string"), "source": Value("string"), "speaker": Value("string"),
        "sentence": Value("string"), "gender": Value("string"), "accents": Value("string"),
        "age": Value("string"), "duration": Value("float32"),
        "input_features": Array2D(shape=(None, n_mels), dtype=dtype),  # (frames, mels): frames vary
        "fill": Value("float32"),
        "labels": List(Value("int32")),
        **({"audio": List(Value("int16"))} if audio else {}),
    })


def write_shard(path: Path, examples: list[dict], drops: Counter, n_rows: int, n_mels: int, dtype: str,
                audio: bool = False, confirm=lambda: None) -> dict:
    """Write one shard folder atomically (temporary name, then rename) and return its stats.
    `confirm()` runs just before the rename and raises to abandon the shard (its claim was lost)."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()  # the pipeline shows one bar of its own
    schema = arrow_features(n_mels, dtype, audio)
    columns = {name: [ex[name] for ex in examples] for name in schema}
    columns["input_features"] = [np.asarray(x, dtype=dtype) for x in columns["input_features"]]
    ds = Dataset.from_dict(columns, features=schema)
    stats = {"rows": n_rows, "clips": len(examples), "seconds": float(sum(ex["duration"] for ex in examples)),
             "by_source": dict(Counter(ex["source"] for ex in examples)), "dropped": dict(drops)}
    tmp = path.with_name(f".{path.name}.tmp-{owner_tag()}")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(str(tmp))
    (tmp / STATS).write_text(json.dumps(stats, indent=1))
    fsync_tree(tmp)  # on the disk before its name: a power loss never leaves a complete-looking empty shard
    try:
        confirm()
        if path.is_dir() and shard_stats(path) is None:  # a damaged shard (is_done): the claim's holder replaces it
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError:
        if shard_stats(path) is None:
            raise
        # another process finished the same shard first: keep theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # still there only if it was not renamed into place
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


def shard_stats(path: Path, keys: tuple[str, ...] = STATS_KEYS) -> dict | None:
    """A shard folder's stats.json, or None where it is missing, does not parse or lacks one of
    `keys` (emptied, cut short, edited by hand): such a shard counts as unfinished, so a rerun
    rebuilds it."""
    try:
        stats = json.loads((path / STATS).read_text())
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) and all(k in stats for k in keys) else None


def read_stats(root: Path, name: str, keys: tuple[str, ...] = STATS_KEYS) -> dict:
    """The stats of the finished shard `root/name` (`split/shard-...`), or a FeaturesError naming it."""
    stats = shard_stats(root / name, keys)
    if stats is None:
        raise FeaturesError(f"{root / name} is damaged or missing (no readable {STATS}): rerun python "
                            "feature_pipeline.py with the same config, which rebuilds only that shard")
    return stats


def is_done(root: Path, shard: Shard) -> bool:
    return shard_stats(shard.path(root)) is not None


def clean_partial(root: Path, stale_seconds: float) -> None:
    """Remove temporary shards whose writer no longer holds the shard's claim (killed, or taken
    over); a shard in progress elsewhere, on this machine or another, is left alone, and so is
    one whose claim cannot be read yet (being created) until that claim goes stale. Likewise
    the temporary processor folder, plan and config of a process on this machine that is gone."""
    for split in SPLITS:
        for tmp in (root / split).glob(".shard-*.tmp-*"):
            name, writer = tmp.name[1:].split(".tmp-", 1)
            holder = read_holder(claim_file(root / split, name))
            if holder is None or holder.is_stale(stale_seconds) or (holder.token and holder.tag != writer):
                shutil.rmtree(tmp, ignore_errors=True)
    for tmp in [*root.glob(f".{PROCESSOR_DIR}.tmp-*"), *root.glob(f".{PLAN}.tmp-*"),
                *root.glob(f".{CONFIG}.tmp-*")]:
        if not gone_here(tmp.name.split(".tmp-", 1)[1]):
            continue  # a live writer's, or another machine's
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def claim_shards(root: Path, shards: list[Shard], claims: ClaimSet) -> list[Shard]:
    """The unfinished shards among `shards` whose claims this process now holds; those held by
    a running process, here or on another machine, are left to it."""
    taken = []
    for shard in shards:
        if is_done(root, shard):
            continue
        shard.claim(root).parent.mkdir(parents=True, exist_ok=True)
        if not claims.take(shard.claim(root)):
            continue
        if is_done(root, shard):  # finished by the previous holder just before it let go
            claims.release(shard.claim(root))
        else:
            taken.append(shard)
    return taken


def unfinished(root: Path, shards: list[Shard], num_shards: int, stale_seconds: float) -> Counter:
    """Shards not on disk yet, counted by who is to write them: the running process that holds
    a shard's claim (`host pid N`), else the `--shard-index` the shard belongs to."""
    who: Counter = Counter()
    for i, shard in enumerate(shards):
        if not is_done(root, shard):
            holder = read_holder(shard.claim(root))
            running = holder is not None and not holder.is_stale(stale_seconds)
            who[holder.who if running else f"--shard-index {i % num_shards} (not running)"] += 1
    return who


# --------------------------------------------------------------------------- manifest and reading


def build_manifest(root: Path, shards: list[Shard], header: dict) -> dict:
    """Aggregate shard stats into the manifest, write it (atomically, last) and return it."""
    splits: dict[str, dict] = {}
    for split in SPLITS:
        parts = [s for s in shards if s.split == split]
        stats = [read_stats(root, f"{split}/{s.name}") for s in parts]
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


def write_manifest_once(root: Path, shards: list[Shard], header: dict, claims: ClaimSet,
                        check_unchanged=lambda: None) -> dict:
    """The manifest, written under its claim by one of the processes that find every shard on
    disk; the others wait for it (a stalled writer's claim goes stale and is taken over).
    `check_unchanged()` runs under the claim and raises when the store was rebuilt meanwhile
    (another process's --overwrite), so that no manifest describes another build's shards."""
    claim = claim_file(root, MANIFEST)
    while not claims.take(claim):
        time.sleep(0.2)
    try:
        check_unchanged()
        if (root / MANIFEST).is_file():
            return read_manifest(root)
        for tmp in root.glob(f".{MANIFEST}.tmp-*"):  # a killed writer's: only the claim's holder writes one
            tmp.unlink(missing_ok=True)
        return build_manifest(root, shards, header)
    finally:
        claims.release(claim)


def read_manifest(root: str | Path, key: str = "features.name") -> dict:
    """The manifest of a complete feature store, or a FeaturesError saying what to run (`key`:
    the config key that names the store)."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file() and key != "features.name":  # the same config would build features.name, not this one
        raise FeaturesError(f"{key}: no finished features in {root} (no {MANIFEST}): build them first with "
                            f"python feature_pipeline.py --set features.name={root.name}")
    if not path.is_file():
        raise FeaturesError(f"no finished features in {root} (no {MANIFEST}): run python feature_pipeline.py "
                            "with the same config first")
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict):  # written whole (write_atomic): cut short or edited since
        raise FeaturesError(f"{path} is damaged (it does not parse): delete it and rerun python feature_pipeline.py "
                            "with the config that built the store, which writes it again from the finished shards")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise FeaturesError(f"{root} was written by another version of the feature format "
                            f"(version {manifest.get('format_version')}; this code reads versions "
                            f"{' and '.join(map(str, READABLE_VERSIONS))}): rerun python feature_pipeline.py")
    return manifest


def load_split(root: str | Path, split: str):
    """A memory-mapped `datasets.Dataset` of one split (all its shards, in order)."""
    from datasets import Dataset, concatenate_datasets

    root = Path(root)
    manifest = read_manifest(root)
    if split not in manifest["splits"]:
        raise FeaturesError(f"{root} has no split {split!r} (has {', '.join(manifest['splits'])})")
    # A shard whose rows were all dropped holds no Arrow file, which load_from_disk cannot read.
    names = [n for n in manifest["splits"][split]["shards"] if read_stats(root, n, ("clips",))["clips"]]
    parts = [load_shard(root, name) for name in names]
    if not parts:
        schema = arrow_features(manifest["feature_extractor"]["n_mels"], manifest["dtype"], split == EVAL)
        return Dataset.from_dict({name: [] for name in schema}, features=schema)
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def load_shard(root: Path, name: str):
    """One finished shard, memory-mapped, or a FeaturesError naming it when its files cannot be read
    (an Arrow file cut short or deleted), which mapping it finds at once without reading the rows."""
    from datasets import load_from_disk

    try:
        return load_from_disk(str(root / name))
    except (OSError, ValueError) as e:  # pyarrow's ArrowIOError is an OSError, ArrowInvalid a ValueError
        if getattr(e, "errno", None) not in (None, errno.ENOENT):  # the machine's (no access...), not the shard's
            raise
        raise FeaturesError(f"{root / name} is damaged ({first_line(e)}): delete that folder and rerun python "
                            "feature_pipeline.py with the same config, which rebuilds only that shard") from e


def input_features(example: dict, n_frames: int = 3000) -> np.ndarray:
    """The padded Whisper input (n_mels, n_frames) float32 of a stored example."""
    return pad_features(np.asarray(example["input_features"], dtype=np.float32).T, float(example["fill"]), n_frames)


def check_compatible(manifest: dict, model_config, tokenizer) -> None:
    """Refuse features built for another model family, mel bin count, tokenizer, language or task."""
    fx = manifest["feature_extractor"]
    tk = manifest["tokenizer"]
    rerun = rebuild_hint(manifest, ["model.name_or_path=<the model>"],
                         f"train the model they were built for ({manifest['model']['name_or_path']})")
    if fx["n_mels"] != model_config.num_mel_bins:
        raise FeaturesError(f"features have {fx['n_mels']} mel bins but the model expects "
                            f"{model_config.num_mel_bins}: {rerun}")
    if tk["vocab_size"] != len(tokenizer):
        raise FeaturesError(f"features were tokenized with a vocabulary of {tk['vocab_size']} tokens, the model's "
                            f"tokenizer has {len(tokenizer)}: {rerun}")
    if list(tk["prefix_tokens"]) != list(tokenizer.prefix_tokens):
        built = manifest["model"]
        keys = [k for k in ("language", "task") if built[k] != getattr(tokenizer, k)] or ["language", "task"]
        ours = [f"model.{k}={getattr(tokenizer, k)}" for k in keys]
        theirs = " and ".join(f"model.{k}={built[k]}" for k in keys)
        raise FeaturesError(f"features {manifest['name']} carry the prefix tokens {tk['prefix_tokens']} ({theirs}), "
                            f"the tokenizer makes {list(tokenizer.prefix_tokens)} ({' and '.join(ours)}): "
                            + rebuild_hint(manifest, ours, f"train with {theirs}"))


def rebuild_hint(manifest: dict, sets: list[str], other_way: str) -> str:
    """What to run when a store does not fit the model: build a store under a new name (the same
    features.name is refused, its store being made with other settings), or `other_way`."""
    new = " ".join(f"--set {s}" for s in sets)
    return (f"build matching features with python feature_pipeline.py {new} --set features.name=NEW_NAME and train "
            f"with --set features.name=NEW_NAME (or, without a new name, pass --overwrite to replace {manifest['name']}), "
            f"or {other_way}")


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

    from whisper_ft.model import ModelNotFound, resolve, set_language

    where = resolve(name_or_path)
    try:
        processor = Processor(WhisperFeatureExtractor.from_pretrained(where), WhisperTokenizer.from_pretrained(where))
    except OSError as e:
        raise ModelNotFound(f"cannot load a Whisper processor from {name_or_path}: {first_line(e)}") from e
    set_language(processor.tokenizer, language, task)
    return processor


# Set once in each worker process by the pool's initializer (`_init_worker`), so that the
# processor is sent to a worker once, not with every batch: the feature extractor, tokenizer, limits.
_WORKER: dict = {}


def _init_worker(processor: Processor, limits: Limits) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already
    _WORKER.update(fe=processor.feature_extractor, tok=processor.tokenizer, limits=limits)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """Ask the kernel to kill this process when the thread that forked it ends (Linux; other
    systems skip it), so that decoding workers do not live on, each holding a processor and
    a batch, after the pipeline is killed (`kill -9`, an out-of-memory kill) with no chance to
    stop them. A parent that died before the request took effect is caught by `parent`, the
    process id the worker was forked from, no longer being its parent."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _init_pool_worker(processor: Processor, limits: Limits, parent: int) -> None:
    import signal

    die_with_parent(parent)
    # Ctrl-C reaches the whole process group: the pipeline says it in one line and its workers
    # end with it, instead of each printing a KeyboardInterrupt traceback first
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(processor, limits)


# How decoding workers start: fork on Linux, where they share the processor already loaded and
# `die_with_parent` works; elsewhere the platform's default (spawn on macOS, where a forked child
# may crash in Accelerate and other system libraries), which sends each worker the processor.
POOL_START_METHOD = "fork" if sys.platform.startswith("linux") else None


class WorkerDied(UserError):
    """A decoding worker ended in the middle of the work (killed when out of memory, a crash)."""


def decoding_pool(workers: int, processor: Processor, limits: Limits):
    """A pool of `workers` decoding processes, started with the processor (`POOL_START_METHOD`),
    that end with the thread that uses it (`die_with_parent`). An executor, unlike
    multiprocessing.Pool, fails loudly when a worker dies or cannot start."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, multiprocessing.get_context(POOL_START_METHOD), _init_pool_worker,
                               (processor, limits, os.getpid()))


def _encode_in_worker(rows: tuple[Row, ...]) -> tuple[list[dict], Counter]:
    return encode_batch(rows, _WORKER["fe"], _WORKER["tok"], _WORKER["limits"])


def commit_shard(root: Path, shard: Shard, examples: list[dict], drops: Counter, n_mels: int, dtype: str,
                 claims: ClaimSet) -> dict:
    """Write an encoded shard if this process still holds its claim, then release the claim."""
    shard.path(root).parent.mkdir(parents=True, exist_ok=True)
    stats = write_shard(shard.path(root), examples, drops, len(shard.rows), n_mels, dtype, shard.split == EVAL,
                        confirm=partial(claims.confirm, shard.claim(root)))
    claims.release(shard.claim(root))
    return stats


def build_shards(root: Path, todo: list[Shard], processor: Processor, limits: Limits, dtype: str, workers: int,
                 batch_size: int, claims: ClaimSet, progress=None) -> Iterator[tuple[Shard, dict]]:
    """Encode and write the shards in `todo`, whose claims `claims` holds, yielding (shard, stats)
    as each one lands on disk.

    Batches of every shard go through one process pool in order, so all cores stay busy even
    when there are fewer shards than cores. Workers get the processor once and are killed with
    this process (`decoding_pool`); a worker that dies stops the build (`WorkerDied`), and the
    shards written by then stay for a rerun. `progress(n_rows, n_kept)` is called per batch.
    """
    from concurrent.futures.process import BrokenProcessPool

    jobs = [(shard, batch) for shard in todo for batch in iter_batches(shard.rows, batch_size)]
    n_mels = processor.feature_extractor.feature_size
    pool = None
    try:
        if workers <= 1:
            _init_worker(processor, limits)
            results = map(_encode_in_worker, (batch for _, batch in jobs))
        else:
            pool = decoding_pool(workers, processor, limits)
            results = pool.map(_encode_in_worker, (batch for _, batch in jobs))
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
                yield shard, commit_shard(root, shard, examples_all, drops_all, n_mels, dtype, claims)
        for shard in todo:  # shards with no rows at all
            if not shard.rows:
                yield shard, commit_shard(root, shard, [], Counter(), n_mels, dtype, claims)
    except BrokenProcessPool as e:
        raise WorkerDied("a decoding worker died (for example killed when out of memory; any error it printed is "
                         "above): the shards written so far are kept, and a rerun of the same command goes on from "
                         f"them; try fewer workers than {workers} (--workers N, or features.workers)") from e
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


# --------------------------------------------------------------------------- leakage between splits


# a Common Voice clip's file name, the same in every release and whatever its source is called
CV_CLIP = re.compile(r"common_voice_[A-Za-z]{2,3}(?:-[A-Za-z0-9]+)*_\d+\.mp3")


def clip_key(row: Row) -> str | None:
    """What identifies a row's recording: its file, or a hash of its bytes. A Common Voice clip
    is its file's name, the same in every release (two releases mixed, or one release under two
    source names, hold the same recording in two folders), and so is a stored row (no audio)
    with such a name. Audio embedded in Arrow files (hashing it would read the whole dataset)
    is identified by its source, speaker and normalized sentence, when it names a speaker; else
    None, and it is compared by sentence only; so is a row whose path names no file."""
    if isinstance(row.audio, str):
        name = os.path.basename(row.audio)
        if CV_CLIP.fullmatch(name):
            return name
        return os.path.realpath(row.audio) if name else None
    if isinstance(row.audio, bytes):
        return hashlib.sha1(row.audio).hexdigest()
    if row.audio is None and CV_CLIP.fullmatch(name := row.id.rpartition("/")[2]):
        return name
    if row.speaker and normalize(row.sentence):
        return f"{row.source}, speaker {row.speaker}: {normalize(row.sentence)}"
    return None


@dataclass(frozen=True)
class Overlap:
    """Rows of split `of` (training, or validation) against a split held out from them: how
    many held-out rows share a clip or a (normalized) sentence with `of`, how many held-out
    speakers also speak in `of`, and which rows of `of` are involved, by (source, source split)."""

    split: str
    rows: int
    clips: int
    sentences: int
    speakers: int
    involved: frozenset
    by_origin: dict
    of: str = TRAIN

    def as_dict(self) -> dict:
        return {"rows": self.rows, "clips": self.clips, "sentences": self.sentences, "speakers": self.speakers,
                f"{ROLE[self.of]}_rows": len(self.involved)}

    def refusal(self) -> str:
        """The one-line reason to refuse this overlap, with what to do."""
        shared = " and ".join(f"{n:,} {word}{'s' * (n != 1)}" for n, word in ((self.clips, "clip"),
                                                                            (self.sentences, "sentence")) if n)
        origins = ", ".join(f"{k}: {v:,} rows" for k, v in sorted(self.by_origin.items(), key=lambda kv: -kv[1]))
        remedy = ("take those splits out of train_splits" if self.of == TRAIN else
                  "carve validation from splits without test clips (validation_from, validation_splits)")
        return (f"the {ROLE[self.of]} data shares {shared} with the {self.rows:,} {ROLE[self.split]} clips "
                f"({origins}): {remedy}, or set features.on_overlap=drop to drop the {len(self.involved):,} "
                f"{ROLE[self.of]} rows involved")


def _row_key(row: Row) -> tuple[str, str]:
    return row.source, row.id


def find_overlap(rows: list[Row], held: list[Row], split: str, of: str = TRAIN) -> Overlap:
    """What `rows` (of split `of`) share with the held-out rows `held` (of split `split`)."""
    clips = {k: r for r in held if (k := clip_key(r))}
    sentences = {normalize(r.sentence) for r in held} - {""}
    speakers = {r.speaker for r in held if r.speaker}
    shared_clips: set[str] = set()
    shared_sentences: set[str] = set()
    involved: set[tuple[str, str]] = set()
    origin: Counter = Counter()
    for r in rows:
        clip, sentence = clip_key(r), normalize(r.sentence)
        hit = False
        if clip in clips:
            shared_clips.add(clip)
            hit = True
        if sentence in sentences:
            shared_sentences.add(sentence)
            hit = True
        if hit:
            involved.add(_row_key(r))
            origin[f"{r.source} `{r.id.split('/', 1)[0]}`"] += 1
    their_speakers = {r.speaker for r in rows if r.speaker}
    return Overlap(split, len(held), sum(1 for k in clips if k in shared_clips),
                   sum(1 for r in held if normalize(r.sentence) in shared_sentences),
                   len(speakers & their_speakers), frozenset(involved), dict(origin), of)


def stored_rows(ds, split: str) -> list[Row]:
    """The rows of a stored split (a `datasets.Dataset` of a store), read from their id, source,
    speaker and sentence columns only, for `find_overlap` across stores. Shards keep no audio
    path, so `clip_key` identifies a clip by its Common Voice name (two stores may call one
    release by two source names), else as it does audio embedded in Arrow files: by source,
    speaker and normalized sentence."""
    cols = ds.select_columns(["id", "source", "speaker", "sentence"]).to_dict()
    return [Row(source, split, id_, None, sentence, speaker)
            for id_, source, speaker, sentence in zip(cols["id"], cols["source"], cols["speaker"], cols["sentence"])]


# held-out pairs: the rows of the first split must share nothing with the second's
LEAKAGE_PAIRS = ((TRAIN, VALIDATION), (TRAIN, EVAL), (VALIDATION, EVAL))
VALIDATION_VS_TEST = "validation_vs_test"  # the manifest's key for the last pair


def check_leakage(rows: dict[str, list[Row]], policy: str = "refuse") -> tuple[dict[str, list[Row]], dict]:
    """Training rows that share a clip or a sentence with validation or test rows, and
    validation rows that share one with test rows: `refuse` (FeaturesError with the counts)
    where a clip is shared, a configuration mistake such as training on validated.tsv, and
    drop the rows that share only a sentence (a sentence recorded again, or read in another
    corpus); `drop` every such row; or `keep` them. Speaker overlap is only reported, that of
    the rows kept. A recording a split lists twice (a clip of train.tsv and validated.tsv,
    both training splits) is kept once. Returns the rows and the manifest's `overlap` record."""
    rows, repeated = drop_repeated_clips(rows)
    found = [find_overlap(rows[of], rows[split], split, of) for of, split in LEAKAGE_PAIRS
             if rows.get(of) and rows.get(split)]
    involved = {of: frozenset().union(*(o.involved for o in found if o.of == of)) for of in (TRAIN, VALIDATION)}
    report = {(o.split if o.of == TRAIN else VALIDATION_VS_TEST): o.as_dict() for o in found}
    report.update({f"repeated_{ROLE[split]}_rows": n for split, n in repeated.items()})
    if policy == "refuse" and any(o.clips for o in found):
        worst = max((o for o in found if o.clips), key=lambda o: (o.of == TRAIN, o.clips + o.sentences))
        raise FeaturesError(worst.refusal())
    rows = dict(rows)
    for of in (TRAIN, VALIDATION):
        dropped = involved[of] if policy in ("refuse", "drop") else frozenset()
        if dropped:
            rows[of] = [r for r in rows[of] if _row_key(r) not in dropped]
        report[f"dropped_{ROLE[of]}_rows"] = len(dropped)
        report[f"kept_overlapping_{ROLE[of]}_rows"] = len(involved[of]) - len(dropped)
    for o in found:  # the speakers the stored splits share, after the drops
        speakers = [{r.speaker for r in rows[split] if r.speaker} for split in (o.of, o.split)]
        report[o.split if o.of == TRAIN else VALIDATION_VS_TEST]["speakers"] = len(speakers[0] & speakers[1])
    return rows, report


def drop_repeated_clips(rows: dict[str, list[Row]]) -> tuple[dict[str, list[Row]], dict[str, int]]:
    """Each split's rows without those whose recording (`clip_key`) it already holds, and how many
    each split lost: a clip twice in training would count twice in its loss and its hours."""
    out, repeated = {}, {}
    for split, split_rows in rows.items():
        seen: set[str] = set()
        kept = []
        for r in split_rows:
            key = clip_key(r)
            if key in seen:
                continue
            if key is not None:
                seen.add(key)
            kept.append(r)
        out[split], repeated[split] = kept, len(split_rows) - len(kept)
    return out, repeated


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class FeatureStore:
    """One store folder (layout in the module docstring): where it is, what it holds, how to
    read it. `build` writes it."""

    root: Path
    key: str = "features.name"  # the config key that names it, for the messages

    @classmethod
    def of(cls, cfg) -> FeatureStore:
        """The store `features.name` under `features.data_dir`."""
        return cls(Path(cfg.features.data_dir) / "features" / cfg.features.name)

    @classmethod
    def held_out_of(cls, cfg) -> FeatureStore:
        """The store of the validation and test splits: `training.eval_features`, else `features.name`."""
        name = cfg.training.eval_features
        return cls(Path(cfg.features.data_dir) / "features" / name, "training.eval_features") if name else cls.of(cfg)

    @property
    def name(self) -> str:
        return self.root.name

    def manifest(self) -> dict:
        return read_manifest(self.root, self.key)

    def identity(self) -> dict:
        """{"name", "fingerprint", "clips"} of the finished store: the fingerprint changes when the
        store is rebuilt from other inputs or settings under the same name (`--overwrite`), so a
        run resumed on it can tell. It hashes the plan's fingerprint (stores without a readable
        plan: none) and the manifest's splits; `clips` is per split, for the messages."""
        manifest = self.manifest()
        plan_path = self.root / PLAN
        try:
            plan = json.loads(plan_path.read_text()).get("fingerprint") if plan_path.is_file() else None
        except ValueError:
            plan = None
        splits = manifest["splits"]
        h = hashlib.sha256(json.dumps({"plan": plan, "splits": splits}, sort_keys=True).encode())
        return {"name": self.name, "fingerprint": h.hexdigest()[:16],
                "clips": {split: splits[split].get("clips", 0) for split in SPLITS if split in splits}}

    def has(self, split: str) -> bool:
        """Whether the finished store holds clips of `split` (older stores have no validation)."""
        return self.manifest()["splits"].get(split, {}).get("clips", 0) > 0

    def load(self, split: str):
        return load_split(self.root, split)

    def processor(self, language: str, task: str):
        """The WhisperProcessor the store was built with, set to `language`/`task`."""
        from whisper_ft.model import load_processor

        return load_processor(str(self.root / self.manifest()["processor"]), language, task)

    def check_model(self, model_config, tokenizer) -> None:
        """Refuse a model of another family, mel bin count, vocabulary or language."""
        manifest = self.manifest()
        check_compatible(manifest, model_config, tokenizer)
        vocab = manifest["tokenizer"]["vocab_size"]
        if vocab != model_config.vocab_size:
            raise FeaturesError(f"features were tokenized with a vocabulary of {vocab} tokens but the model has "
                                f"{model_config.vocab_size} (another Whisper family): "
                                + rebuild_hint(manifest, ["model.name_or_path=<the model>"],
                                               f"train the model they were built for ({manifest['model']['name_or_path']})"))

    def prepare(self, cfg, processor: Processor, settings: dict, fp: str, overwrite: bool) -> None:
        """Create the folder, or check that an existing one was made from the same inputs.

        Of processes starting a new store at once, the first to create its plan decides what
        the store holds and writes its processor and config (over any left by a process killed
        before it wrote a plan); the others go on when their plan is the same, writing the
        processor only if it is still missing, and stop (FeaturesError) when it is not, before
        writing anything into the store."""
        stale_seconds = cfg.features.claim_stale_seconds
        if overwrite and self.root.exists():
            self.remove(stale_seconds)
        plan_path = self.root / PLAN
        started = False
        if not plan_path.is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            started = create_atomic(plan_path, json.dumps({"fingerprint": fp, "settings": settings}, indent=2),
                                    owner_tag())
        plan = read_plan(plan_path)
        if plan["fingerprint"] != fp:
            raise FeaturesError(f"{self.root} holds features built {how_built(plan, settings)}; choose another "
                                "features.name or pass --overwrite to rebuild it")
        clean_partial(self.root, stale_seconds)
        final = self.root / PROCESSOR_DIR
        if started or not final.is_dir():
            tmp = staging_dir(final, owner_tag())
            shutil.rmtree(tmp, ignore_errors=True)
            processor.save_pretrained(str(tmp))
            if started:
                replace_dir(tmp, final)
            else:
                fsync_tree(tmp)
                try:
                    os.rename(tmp, final)
                except OSError:  # another process of the same plan wrote it first
                    shutil.rmtree(tmp, ignore_errors=True)
        if started or not (self.root / CONFIG).is_file():
            save_config(cfg, self.root / CONFIG, owner_tag())

    def remove(self, stale_seconds: float) -> None:
        """Delete the store (--overwrite); refused while a running process, here or on another
        machine, holds a claim in it. Renamed aside first, so that a process starting meanwhile
        finds no store rather than part of one."""
        claims = [*self.root.glob("*/.shard-*.claim"), claim_file(self.root, MANIFEST)]
        live = live_claims(claims, stale_seconds)
        if live:
            holders = ", ".join(sorted({h.who for h in live.values()}))
            raise FeaturesError(f"--overwrite refused: {self.root} is still being written by {holders}; let them "
                                "finish or stop them, then rerun")
        aside = self.root.with_name(f".{self.name}.removing-{owner_tag()}")
        try:
            os.rename(self.root, aside)
        except FileNotFoundError:  # another process removed it first
            return
        shutil.rmtree(aside)

    def is_complete(self, fp: str) -> bool:
        """Whether the store is finished (it has a manifest) and was planned from the inputs `fp`."""
        plan = self.root / PLAN
        return (self.root / MANIFEST).is_file() and plan.is_file() and read_plan(plan)["fingerprint"] == fp

    def check_unchanged(self, fp: str) -> None:
        """Refuse to write shards planned for a store that another process removed or rebuilt
        (--overwrite) after this one's `prepare`."""
        plan = self.root / PLAN
        if not plan.is_file() or read_plan(plan)["fingerprint"] != fp:
            raise removed_meanwhile(self.root)


def removed_meanwhile(root: Path) -> FeaturesError:
    return FeaturesError(f"{root} was removed or rebuilt by another process (--overwrite) while this one was "
                         "starting: rerun")


def read_plan(path: Path, patience: float = 5.0) -> dict:
    """A store's plan.json. Where the file system has no hard links, a plan is created and then
    written (`create_atomic`), so an empty one is waited for a moment; one that stays empty was
    left by a process killed while starting the store. One gone since it was seen was removed by
    another process's --overwrite (`removed_meanwhile`)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise removed_meanwhile(path.parent) from None
        except ValueError:
            if time.monotonic() > deadline:
                raise FeaturesError(f"{path} is empty or cut short: a process was killed while starting this store; "
                                    "pass --overwrite to rebuild it") from None
            time.sleep(0.05)


@dataclass(frozen=True)
class BuildResult:
    store: FeatureStore
    manifest: dict | None  # None while other processes still have shards to write
    waiting_on: dict[str, int]  # shards still to write, by who is to write them (`unfinished`)
    encoded_rows: int


def build(cfg, num_shards: int = 1, shard_index: int = 0, workers: int | None = None, overwrite: bool = False,
          echo=print) -> BuildResult:
    """Stage 1: read the sources, check for leakage, encode this process's shards (skipping
    finished ones and those a running peer holds) and, once every shard is on disk, write the
    manifest. `echo` gets one line per event; a progress bar shows the encoding."""
    fc = cfg.features
    check_folder(fc.data_dir, "features.data_dir")
    store = FeatureStore.of(cfg)
    processor = load_feature_processor(cfg.model.name_or_path, cfg.model.language, cfg.model.task)
    rows = collect_rows(cfg, echo)
    rows, overlap = check_leakage(rows, fc.on_overlap)
    rows[EVAL] = mark_served_clips(rows[EVAL], fc.served_clips)
    for role in ROLE.values():
        if overlap.get(f"repeated_{role}_rows"):
            echo(f"dropped {overlap[f'repeated_{role}_rows']} {role} rows whose clip another of its rows already "
                 "holds (listed in two of its splits): each clip is kept once")
    for role, held_out in (("training", "validation or test"), ("validation", "test")):
        if overlap[f"dropped_{role}_rows"]:
            shared = "a sentence" if fc.on_overlap == "refuse" else "a clip or a sentence"
            echo(f"dropped {overlap[f'dropped_{role}_rows']} {role} rows that share {shared} with {held_out} rows "
                 f"(features.on_overlap={fc.on_overlap})")
        if overlap[f"kept_overlapping_{role}_rows"]:
            echo(f"warning: {overlap[f'kept_overlapping_{role}_rows']} {role} rows share a clip or a sentence with "
                 f"{held_out} rows (features.on_overlap=keep): the {held_out} scores are not held-out scores")
    shards = plan_shards(rows, fc.shard_size)
    settings = store_settings(cfg)
    fp = fingerprint(settings, shards) if overwrite else planned_fingerprint(store.root / PLAN, settings, shards)
    if overwrite or not store.is_complete(fp):
        check_clips_present(rows)  # before the store is begun: a rerun after the copy builds it
    store.prepare(cfg, processor, settings, fp, overwrite)
    mine = [s for i, s in enumerate(shards) if i % num_shards == shard_index]
    with ClaimSet(fc.claim_stale_seconds, "features.claim_stale_seconds") as claims:
        todo = claim_shards(store.root, mine, claims)
        store.check_unchanged(fp)
        n_rows = sum(len(s.rows) for s in todo)
        if todo:
            workers = workers if workers is not None else fc.workers
            workers = workers or os.cpu_count() or 1
            done = sum(1 for s in mine if is_done(store.root, s))
            for s in todo:  # shards are renamed into place whole: one there but unfinished was damaged
                if s.path(store.root).is_dir():
                    echo(f"rebuilding {s.split}/{s.name}: its {STATS} is missing or damaged")
            echo(f"{store.root.absolute()}: {len(shards)} shards ({done} of this process's {len(mine)} already done, "
                 f"{len(mine) - len(todo) - done} held by other processes), {n_rows} clips to encode with {workers} "
                 "workers")
            encode_shards(store.root, todo, processor, fc, workers, claims)
        elif (store.root / MANIFEST).is_file():
            return BuildResult(store, store.manifest(), {}, 0)
        waiting = unfinished(store.root, shards, num_shards, fc.claim_stale_seconds)
        if waiting:
            return BuildResult(store, None, dict(waiting), n_rows)
        header = {**manifest_header(cfg, processor, settings), "overlap": overlap}
        return BuildResult(store, write_manifest_once(store.root, shards, header, claims,
                                                      partial(store.check_unchanged, fp)), {}, n_rows)


def summary_lines(manifest: dict) -> list[str]:
    """What a finished store holds, for the command's last lines: clips kept and dropped per
    split, and the speakers the held-out splits share with the data before them."""
    lines = []
    for split, s in manifest["splits"].items():
        dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "none"
        lines.append(f"{split}: {s['clips']} of {s['rows']} clips kept, {s['hours']:.2f} h; dropped: {dropped}")
    for key, o in manifest.get("overlap", {}).items():
        if isinstance(o, dict) and o["speakers"]:  # a pair's record; the others are row counts
            held, of = ("test", "validation") if key == VALIDATION_VS_TEST else (ROLE[key], "training")
            lines.append(f"note: {o['speakers']} {held} speakers also speak in the {of} data")
    return lines


def encode_shards(root: Path, todo: list[Shard], processor: Processor, fc, workers: int, claims: ClaimSet) -> None:
    """Encode and write the claimed shards `todo` behind a progress bar, one line per shard."""
    from tqdm import tqdm

    limits = Limits(fc.min_seconds, fc.max_seconds, fc.max_label_tokens)
    n_rows = sum(len(s.rows) for s in todo)
    with tqdm(total=n_rows, unit="clip", desc="encoding", dynamic_ncols=True, file=sys.stderr) as bar:
        for shard, stats in build_shards(root, todo, processor, limits, fc.dtype, workers, fc.batch_size, claims,
                                         lambda n, _kept: bar.update(n)):
            bar.write(f"wrote {shard.split}/{shard.name}: {stats['clips']} of {stats['rows']} clips kept")


def collect_rows(cfg, echo=print) -> dict[str, list[Row]]:
    """Rows of every configured source, per store split, in config order."""
    rows: dict[str, list[Row]] = {split: [] for split in SPLITS}
    for i, src in enumerate(cfg.features.sources):
        try:
            got = read_source(src, Path(cfg.features.data_dir), cfg.features.claim_stale_seconds)
        except SourceError as e:
            raise SourceError(f"features.sources.{i} ({src.name}): {e}") from e
        for split in rows:
            rows[split] += got.get(split, [])
        echo(f"source {src.name} ({src.kind}): {len(got[TRAIN])} train rows, {len(got[VALIDATION])} validation rows, "
             f"{len(got[EVAL])} test rows")
        for locale in sorted({r.meta["locale"] for split in got.values() for r in split if r.meta.get("locale")}):
            if (code := whisper_code(locale)) is not None and code != cfg.model.language:
                echo(f"warning: source {src.name} is Common Voice {locale} (Whisper's {code!r}), but model.language is "
                     f"{cfg.model.language!r}: its labels say <|{cfg.model.language}|>. For {code} speech set "
                     f"--set model.language={code} for both stages")
        if got[TRAIN] and not got[VALIDATION]:
            if src.validation_splits:
                why = f"its validation_splits {list(src.validation_splits)} hold no rows"
            elif src.validation_from == "all" or src.validation_from in src.train_splits:
                why = (f"carving validation_fraction {src.validation_fraction:g} of {src.validation_from!r} gave no "
                       "rows: too few rows, or speakers with more clips than that")
            else:
                why = (f"validation_splits is empty and validation_from {src.validation_from!r} names none of its "
                       f"train_splits {list(src.train_splits)}")
            echo(f"note: source {src.name} gives no validation rows ({why})")
    if not any(rows.values()):
        raise SourceError("the configured sources hold no rows")
    return rows


def store_settings(cfg) -> dict:
    """The config values that decide the store's content (workers or batch size do not)."""
    fc = to_dict(cfg.features)
    for key in ("workers", "batch_size", "name", "data_dir", "claim_stale_seconds"):
        fc.pop(key)
    return normal_settings({"features": fc, "model": to_dict(cfg.model)})


def normal_settings(settings: dict) -> dict:
    """`settings` with the source paths and the model's path spelled one way (`os.path.normpath`:
    no trailing slash, which tab completion adds), so that one input is one store. Not made
    absolute: stores planned with relative paths keep their fingerprint."""
    def normal(path: str) -> str:
        return os.path.normpath(path) if path and "://" not in path else path  # a URL's "//" is not a path's

    fc, model = settings["features"], settings["model"]
    return {"features": {**fc, "sources": [{**src, "path": normal(src["path"])} for src in fc["sources"]]},
            "model": {**model, "name_or_path": normal(model["name_or_path"])}}


def planned_fingerprint(plan_path: Path, settings: dict, shards: list[Shard]) -> str:
    """`fingerprint(settings, shards)`, or that of an existing plan made from these rows with the same
    settings spelled otherwise (a store planned before paths were normalised, with a trailing slash),
    which stays this run's store."""
    fp = fingerprint(settings, shards)
    plan = read_plan(plan_path) if plan_path.is_file() else {"fingerprint": fp}
    same = planned_settings(plan) == settings
    return plan["fingerprint"] if same and fingerprint(plan["settings"], shards) == plan["fingerprint"] else fp


def planned_settings(plan: dict) -> dict | None:
    """A plan's settings, normalised (`normal_settings`); None where it holds none of this layout."""
    try:
        return normal_settings(plan["settings"])
    except (KeyError, TypeError):
        return None


def how_built(plan: dict, settings: dict) -> str:
    """What made the store of `plan` other than this run's `settings`: the first setting that
    differs, for the refusal (a plan without settings: that it differs)."""
    theirs = planned_settings(plan)
    if theirs is None:
        return "from other inputs or settings"
    change = first_change(flat(theirs, lists=True), flat(settings, lists=True))
    if change is None:
        return "from the same settings but other rows (a source's files changed) or an older feature format"
    key, *values = change
    before, now = (v if isinstance(v, str) and v else json.dumps(v) for v in values)
    return f"with {key} {before}, this run has {now}"


def manifest_header(cfg, processor: Processor, settings: dict) -> dict:
    fe, tok = processor.feature_extractor, processor.tokenizer
    return {
        "name": cfg.features.name,
        "model": to_dict(cfg.model),
        "sources": [describe(s) for s in cfg.features.sources],
        "feature_extractor": {"n_mels": fe.feature_size, "sampling_rate": fe.sampling_rate,
                              "hop_length": fe.hop_length, "n_frames": fe.nb_max_frames},
        "tokenizer": {"vocab_size": len(tok), "prefix_tokens": list(tok.prefix_tokens)},
        "labels": {"leading_space": True},  # label_ids; stores without this key have none
        "dtype": cfg.features.dtype,
        "config": settings,
        "processor": PROCESSOR_DIR,
    }
