"""Stage 1 (CPU): speech sources -> Whisper log-Mel features + token labels under data/features/.

    python feature_pipeline.py                              # the embedded sample, config.yaml
    python feature_pipeline.py --set features.name=cv17 \\
        --set features.sources.0.path=~/cv-corpus-17.0-2024-03-15-sv-SE.tar.gz
    python feature_pipeline.py --num-shards 4 --shard-index 0   # one of four processes or machines

Writes train, validation and test (eval) splits; reruns skip finished shards; the manifest is
written once every shard is on disk. Processes sharing the store, on one machine or several,
claim each shard they write (docs/features.md: what the shared file system must give; the
host name in claims is WHISPER_FT_HOST when set). The store's layout: `whisper_ft.features`.
"""

from __future__ import annotations

import sys

from whisper_ft import cli
from whisper_ft.features import build, summary_lines


def parse_args(argv: list[str] | None):
    parser = cli.base_parser(cli.summary(__doc__))
    parser.add_argument("--num-shards", type=int, default=1, help="split the work into this many processes")
    parser.add_argument("--shard-index", type=int, default=0, help="which of them this process is (0-based)")
    parser.add_argument("--workers", type=int, help="processes for decoding (default: features.workers; 0 = all cores)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an existing store of this name first (refused while a process writes to it)")
    args = parser.parse_args(argv)
    if args.num_shards < 1:
        parser.error(f"--num-shards must be at least 1, got {args.num_shards}")
    if not 0 <= args.shard_index < args.num_shards:
        parser.error(f"--shard-index must be in 0..{args.num_shards - 1}")
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be at least 0 (0 = all cores), got {args.workers}")
    return args


def main(argv: list[str] | None = None) -> int:
    cli.refuse_native_windows("feature_pipeline.py")
    args = parse_args(argv)
    cfg = cli.config_from_args(args)
    result = build(cfg, args.num_shards, args.shard_index, args.workers, args.overwrite,
                   echo=lambda line: print(line, flush=True))
    root = result.store.root
    if result.manifest is None:
        who = ", ".join(f"{n} by {holder}" for holder, n in sorted(result.waiting_on.items()))
        print(f"shards still to be written by other processes: {who}; the last one to finish writes "
              f"{root}/manifest.json")
        return 0
    if not result.encoded_rows:
        print(f"{root} is complete already; nothing to do (pass --overwrite to rebuild it)")
    print(*summary_lines(result.manifest), f"features ready in {root.absolute()}", sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
