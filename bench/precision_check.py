"""Does training on a bf16 weight copy learn like autocast and like float32? The same real
model, the same batches in the same order and the same optimizer, once per precision; prints
the training loss per step and, after training, the float32 loss of each trained model on
held-out clips.

    python bench/precision_check.py --model ~/.cache/whisper-ft/whisper-base \\
        --features data/features/synthetic-cv [--steps 20] [--batch 4] [--lr 2.5e-5]

fp32:     no mixed precision (the reference)
autocast: bf16 by torch.autocast per operation (the HF Trainer's bf16)
copy:     bf16 on a copy of the float32 weights (`whisper_ft.precision`, the pipeline's bf16)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from whisper_ft.collator import SpeechCollator, expand  # noqa: E402
from whisper_ft.features import load_split  # noqa: E402
from whisper_ft.model import load_model  # noqa: E402
from whisper_ft.precision import seq2seq_loss, with_causal_mask  # noqa: E402

COLUMNS = ["input_features", "fill", "labels"]
MODES = ("fp32", "autocast", "copy")


def batches(root: Path, split: str, n: int, size: int, start_token: int) -> list[dict]:
    ds = load_split(root, split).with_format("numpy", columns=COLUMNS)
    rows = [ds[i] for i in range(min(len(ds), n * size))]
    collate = SpeechCollator(start_token)
    return [expand(collate(rows[i:i + size])) for i in range(0, len(rows), size)]


def loss_of(model, batch: dict, mode: str) -> torch.Tensor:
    if mode == "copy":
        cfg = model.config
        return seq2seq_loss(model, batch, torch.bfloat16, cfg.decoder_start_token_id, cfg.pad_token_id)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        return model(**with_causal_mask(batch), use_cache=False).loss


def train(model_dir: str, train_batches: list[dict], held_out: list[dict], mode: str, lr: float) -> dict:
    torch.manual_seed(0)
    model = load_model(model_dir).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    t0 = time.perf_counter()
    for batch in train_batches:
        loss = loss_of(model, batch, mode)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        held = float(np.mean([model(**b).loss.item() for b in held_out]))
    return {"losses": losses, "held_out_loss": held, "seconds": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a local Whisper checkpoint folder")
    p.add_argument("--features", type=Path, required=True, help="a feature store built with that model")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2.5e-5)
    p.add_argument("--held-out", type=int, default=32, help="validation clips for the float32 loss after training")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    start = load_model(args.model).config.decoder_start_token_id
    train_batches = batches(args.features, "train", args.steps, args.batch, start)
    held_out = batches(args.features, "validation", args.held_out // args.batch, args.batch, start)
    print(f"{args.model}: {len(train_batches)} steps of {args.batch}, lr {args.lr}, "
          f"{sum(len(b['labels']) for b in held_out)} held-out clips, torch {torch.__version__}", flush=True)
    results = {}
    for mode in args.modes.split(","):
        r = results[mode] = train(args.model, train_batches, held_out, mode, args.lr)
        print(f"{mode:9s} losses {' '.join(f'{x:.3f}' for x in r['losses'])}", flush=True)
        print(f"{mode:9s} held-out loss {r['held_out_loss']:.4f}, {r['seconds']:.0f} s of training", flush=True)
    if "fp32" in results:
        ref = np.array(results["fp32"]["losses"])
        for mode, r in results.items():
            diff = np.abs(np.array(r["losses"]) - ref)
            print(f"{mode:9s} vs fp32: mean |training loss difference| {diff.mean():.4f}, max {diff.max():.4f}; "
                  f"held-out loss {r['held_out_loss'] - results['fp32']['held_out_loss']:+.4f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
