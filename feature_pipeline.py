"""Stage 1 (CPU): speech sources -> Whisper log-Mel features + token labels under data/features/.

    python feature_pipeline.py                              # the embedded sample, config.yaml
    python feature_pipeline.py --set features.name=cv17 \\
        --set features.sources.0.path=~/cv-corpus-17.0-2024-03-15-sv-SE.tar.gz
    python feature_pipeline.py --num-shards 4 --shard-index 0   # one of four parallel processes

Reruns skip finished shards; the manifest is written once every shard is on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from whisper_ft import cli
from whisper_ft.config import Config, save_config, to_dict
from whisper_ft.features import (MANIFEST, PLAN, PROCESSOR_DIR, Limits, build_manifest, build_shards,
                                 clean_partial, fingerprint, is_done, load_feature_processor, plan_shards,
                                 read_manifest)
from whisper_ft.files import write_atomic
from whisper_ft.model import ModelNotFound
from whisper_ft.sources import EVAL, TRAIN, SourceError, describe, read_source


def parse_args(argv: list[str] | None):
    parser = cli.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--num-shards", type=int, default=1, help="split the work into this many processes")
    parser.add_argument("--shard-index", type=int, default=0, help="which of them this process is (0-based)")
    parser.add_argument("--workers", type=int, help="processes for decoding (default: features.workers; 0 = all cores)")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing store of this name first")
    args = parser.parse_args(argv)
    if not 0 <= args.shard_index < args.num_shards:
        parser.error(f"--shard-index must be in 0..{args.num_shards - 1}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = cli.config_from_args(args)
    fc = cfg.features
    root = Path(fc.data_dir) / "features" / fc.name
    try:
        processor = load_feature_processor(cfg.model.name_or_path, cfg.model.language, cfg.model.task)
        rows = collect_rows(cfg)
    except (ModelNotFound, SourceError, ValueError) as e:
        raise cli.UserError(str(e)) from e
    shards = plan_shards(rows, fc.shard_size)
    settings = store_settings(cfg)
    prepare_store(root, cfg, processor, settings, fingerprint(settings, shards), args.overwrite)

    mine = [s for i, s in enumerate(shards) if i % args.num_shards == args.shard_index]
    todo = [s for s in mine if not is_done(root, s)]
    if not todo and (root / MANIFEST).is_file():
        print(f"{root} is complete already; nothing to do (pass --overwrite to rebuild it)")
        print_summary(root, read_manifest(root))
        return 0
    workers = args.workers if args.workers is not None else fc.workers
    workers = workers or os.cpu_count() or 1
    n_rows = sum(len(s.rows) for s in todo)
    print(f"{root}: {len(shards)} shards ({len(mine) - len(todo)} of this process's {len(mine)} already done), "
          f"{n_rows} clips to encode with {workers} workers", flush=True)
    limits = Limits(fc.min_seconds, fc.max_seconds, fc.max_label_tokens)
    with tqdm(total=n_rows, unit="clip", desc="encoding", dynamic_ncols=True, file=sys.stderr) as bar:
        def progress(n: int, kept: int) -> None:
            bar.update(n)

        for shard, stats in build_shards(root, todo, processor, limits, fc.dtype, workers, fc.batch_size, progress):
            bar.write(f"wrote {shard.split}/{shard.name}: {stats['clips']} of {stats['rows']} clips kept")

    missing = [s for s in shards if not is_done(root, s)]
    if missing:
        print(f"{len(missing)} shards are still to be written by other processes; the last one to finish "
              f"writes {root}/manifest.json (or rerun without --shard-index)")
        return 0
    manifest = build_manifest(root, shards, manifest_header(cfg, processor, settings))
    print_summary(root, manifest)
    return 0


def collect_rows(cfg: Config) -> dict[str, list]:
    """Rows of every configured source, train and eval, in config order."""
    rows: dict[str, list] = {TRAIN: [], EVAL: []}
    for i, src in enumerate(cfg.features.sources):
        try:
            got = read_source(src, Path(cfg.features.data_dir))
        except SourceError as e:
            raise SourceError(f"features.sources.{i} ({src.name}): {e}") from e
        for split in rows:
            rows[split] += got[split]
        print(f"source {src.name} ({src.kind}): {len(got[TRAIN])} train rows, {len(got[EVAL])} eval rows", flush=True)
    if not rows[TRAIN] and not rows[EVAL]:
        raise SourceError("the configured sources hold no rows")
    return rows


def store_settings(cfg: Config) -> dict:
    """The config values that decide the store's content (workers or batch size do not)."""
    fc = to_dict(cfg.features)
    for key in ("workers", "batch_size", "name", "data_dir"):
        fc.pop(key)
    return {"features": fc, "model": to_dict(cfg.model)}


def prepare_store(root: Path, cfg: Config, processor, settings: dict, fp: str, overwrite: bool) -> None:
    """Create the store folder, or check that an existing one was made from the same inputs."""
    plan_path = root / PLAN
    if overwrite and root.exists():
        shutil.rmtree(root)
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        if old["fingerprint"] != fp:
            raise cli.UserError(f"{root} holds features built from other inputs or settings; choose another "
                                f"features.name or pass --overwrite to rebuild it")
        clean_partial(root)
        return
    root.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(str(root / PROCESSOR_DIR))
    save_config(cfg, root / "config.yaml")
    write_atomic(plan_path, json.dumps({"fingerprint": fp, "settings": settings}, indent=2))


def manifest_header(cfg: Config, processor, settings: dict) -> dict:
    fe, tok = processor.feature_extractor, processor.tokenizer
    return {
        "name": cfg.features.name,
        "model": to_dict(cfg.model),
        "sources": [describe(s) for s in cfg.features.sources],
        "feature_extractor": {"n_mels": fe.feature_size, "sampling_rate": fe.sampling_rate,
                              "hop_length": fe.hop_length, "n_frames": fe.nb_max_frames},
        "tokenizer": {"vocab_size": len(tok), "prefix_tokens": list(tok.prefix_tokens)},
        "dtype": cfg.features.dtype,
        "config": settings,
        "processor": PROCESSOR_DIR,
    }


def print_summary(root: Path, manifest: dict) -> None:
    for split, s in manifest["splits"].items():
        dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "none"
        print(f"{split}: {s['clips']} of {s['rows']} clips kept, {s['hours']:.2f} h; dropped: {dropped}")
    print(f"features ready in {root}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
