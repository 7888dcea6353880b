"""How long a checkpoint save holds up training: the Trainer's own synchronous save against the
pipeline's background save (`whisper_ft.saving`), on a random-weight Whisper of a real shape
with AdamW state, on the device given.

    python bench/bench_saves.py --size small [--device cuda] [--saves 3] [--out DIR]

Prints, per mode, the seconds the training thread spends in each save (what the GPU idles
for) and the seconds until the checkpoint is complete on disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_training import SIZES, build_model  # noqa: E402


def trainer_for(model, out: Path, background: bool):
    from transformers import Seq2SeqTrainingArguments, TrainerState
    from transformers.trainer_callback import ExportableState

    from whisper_ft.trainer import WhisperTrainer

    args = Seq2SeqTrainingArguments(output_dir=str(out), save_total_limit=2, report_to=[],
                                    use_cpu=not torch.cuda.is_available(), optim="adamw_torch")
    trainer = WhisperTrainer(model=model, args=args, background_saves=background)
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    for p in model.parameters():  # one optimizer step, so AdamW holds both moments as in training
        p.grad = torch.randn_like(p) * 1e-3
    trainer.optimizer.step()
    model.zero_grad(set_to_none=True)
    callbacks = [*trainer.callback_handler.callbacks, trainer.control]
    trainer.state = TrainerState(stateful_callbacks=[cb for cb in callbacks if isinstance(cb, ExportableState)])
    return trainer


def time_saves(model, out: Path, background: bool, saves: int, device: str) -> dict:
    trainer = trainer_for(model, out, background)
    held, complete = [], []
    for step in range(1, saves + 1):
        trainer.state.global_step = step * 100
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer._save_checkpoint(trainer.model, trial=None)
        if device == "cuda":
            torch.cuda.synchronize()
        held.append(time.perf_counter() - t0)
        trainer.saver.wait()
        complete.append(time.perf_counter() - t0)
    size = sum(f.stat().st_size for f in (out / f"checkpoint-{saves * 100}").iterdir())
    return {"held_s": held, "complete_s": complete, "checkpoint_bytes": size}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--out", type=Path, help="where to write the checkpoints (default: a temporary folder)")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    model = build_model(args.size, "sdpa", args.device).train()
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    results = {}
    root = Path(tempfile.mkdtemp(dir=args.out))
    try:
        for mode, background in (("synchronous", False), ("background", True)):
            r = results[mode] = time_saves(model, root / mode, background, args.saves, args.device)
            held = " ".join(f"{x:.2f}" for x in r["held_s"])
            done = " ".join(f"{x:.2f}" for x in r["complete_s"])
            print(f"  {mode:11s} training held {held} s per save; on disk after {done} s "
                  f"({r['checkpoint_bytes'] / 1e9:.2f} GB, whisper-{args.size}, {where})", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"device": where, "size": args.size, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
