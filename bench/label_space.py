"""Labels with and without Whisper's leading space, scored by a model before any fine-tuning.

Whisper writes the first word of a transcript with a leading space (" Jag", one token); the HF
blog recipe tokenizes the bare sentence ("Jag": "J" + "ag"). This scores both label forms of
the same clips with teacher forcing: the mean loss per label token, the loss of the first text
token, and text tokens per clip. Lower means closer to what the model already writes.

    python bench/label_space.py --model ~/.cache/whisper-ft/whisper-base --features data/features/synthetic-cv
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from whisper_ft.collator import SpeechCollator, expand  # noqa: E402
from whisper_ft.features import FeatureStore, label_ids  # noqa: E402
from whisper_ft.model import load_model, load_processor  # noqa: E402

PREFIX_TOKENS = 3  # <|sv|><|transcribe|><|notimestamps|> after the start token the collator drops


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Whisper checkpoint folder or hub id")
    p.add_argument("--features", type=Path, required=True, help="a feature store folder (its validation split)")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    return p.parse_args(argv)


@torch.no_grad()
def score(model, rows: list[dict], tokenizer, leading_space: bool, batch_size: int) -> dict:
    collate = SpeechCollator(model.config.decoder_start_token_id)
    losses, first, lengths = [], [], []
    for i in range(0, len(rows), batch_size):
        chunk = [{**r, "labels": label_ids(tokenizer, r["sentence"], leading_space)} for r in rows[i:i + batch_size]]
        batch = expand(collate(chunk))
        logits = model(input_features=batch["input_features"], labels=batch["labels"]).logits
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100,
                                                reduction="none")
        for row_nll, labels in zip(nll, batch["labels"]):
            n = int((labels != -100).sum())
            losses.append(float(row_nll[:n].mean()))
            first.append(float(row_nll[PREFIX_TOKENS]))
            lengths.append(n - PREFIX_TOKENS - 1)  # without the prefix and <|endoftext|>
    return {"loss": statistics.mean(losses), "first_token_nll": statistics.mean(first),
            "text_tokens": statistics.mean(lengths)}


def main(argv=None) -> int:
    args = parse_args(argv)
    store = FeatureStore(args.features)
    split = "validation" if store.has("validation") else "eval"
    ds = store.load(split).with_format("numpy")
    rows = [ds[i] for i in range(min(args.clips, len(ds)))]
    model = load_model(args.model).eval()
    tokenizer = load_processor(args.model).tokenizer
    print(f"{args.model}, {len(rows)} {split} clips of {args.features.name}, teacher-forced, float32:")
    for leading_space in (False, True):
        r = score(model, rows, tokenizer, leading_space, args.batch_size)
        print(f"  labels {'with' if leading_space else 'without'} the leading space: loss {r['loss']:.3f} per token, "
              f"first text token {r['first_token_nll']:.2f}, {r['text_tokens']:.1f} text tokens per clip")
    return 0


if __name__ == "__main__":
    sys.exit(main())
