"""Rebuild the embedded sample: a small synthetic Swedish Common Voice release in
data/sample/cv-corpus-sample/sv-SE, spoken by espeak-ng with varied voices.

    python scripts/make_sample.py
    python scripts/make_sample.py --out data/synthetic-cv --train 320 --dev 80 --test 160 \
        --speakers 24 --snr 5 25        # a larger, noisier release for experiments (docs/improving.md)

The sentences (--sentences, one per line) are by default data/sample/sv-SE-sentences.txt:
5,518 CC0 sentences of Common Voice's Swedish sentence collection.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from whisper_ft import cli  # noqa: E402
from whisper_ft.files import replace_dir, staging_dir  # noqa: E402
from whisper_ft.synth import SynthError, make_release, require_tools, usable_sentences  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "data" / "sample" / "cv-corpus-sample"
SENTENCES = OUT.parent / "sv-SE-sentences.txt"


def replaceable(out: Path) -> bool:
    """Whether `out` may be deleted and written anew: missing, empty, or an earlier release
    (one `sv-SE` folder with its clips and TSVs, as `make_release` writes it)."""
    if not out.exists():
        return True
    if not out.is_dir():
        return False
    entries = list(out.iterdir())
    release = out / "sv-SE"
    return not entries or (entries == [release] and (release / "clips").is_dir()
                           and (release / "validated.tsv").is_file())


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=cli.summary(__doc__))
    parser.add_argument("--sentences", type=Path, default=SENTENCES,
                        help="text file, one Swedish sentence per line (default: the CC0 sentences beside the sample)")
    parser.add_argument("--out", type=Path, default=OUT,
                        help="folder of the release (replaced once the new one is complete: it must be empty "
                             "or an earlier release)")
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--dev", type=int, default=24)
    parser.add_argument("--test", type=int, default=56)
    parser.add_argument("--seed", type=int, default=2223)
    parser.add_argument("--speakers", type=int, default=11, help="speakers, split between train, dev and test")
    parser.add_argument("--snr", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="add white noise at a signal-to-noise ratio (dB) drawn from this range per clip")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Check every input, build the release beside --out and only then put it in --out's place,
    so that a failure (a missing tool, too few sentences, an interruption) keeps the old one."""
    args = make_parser().parse_args(argv)
    if not args.sentences.is_file():
        raise SynthError(f"--sentences {args.sentences}: no such file")
    if not replaceable(args.out):
        raise SynthError(f"--out {args.out} holds other files than an earlier release: name an empty or new folder")
    counts = {"train": args.train, "dev": args.dev, "test": args.test}
    sentences = args.sentences.read_text(encoding="utf-8").splitlines()
    usable_sentences(sentences, sum(counts.values()))
    require_tools()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(args.out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        make_release(tmp, sentences, counts, seed=args.seed, n_speakers=args.speakers,
                     snr_db=tuple(args.snr) if args.snr else None)
        replace_dir(tmp, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # still there only when the build failed
    root = args.out / "sv-SE"
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"wrote {root}: {sum(counts.values())} clips, {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
