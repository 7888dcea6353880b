"""Training and evaluation speed: this pipeline's defaults against the HF blog recipe, side by
side in one run on the same random-weight Whisper, on the device given.

    python bench/bench_training.py                              # whisper-tiny-sized, CPU or GPU
    python bench/bench_training.py --size small --device cuda   # the issue's H100 target setting
    python bench/bench_training.py --size small --device cuda --compile

blog:     fp16 on GPU (fp32 on CPU), gradient checkpointing, eager attention, unfused AdamW,
          batch 16, evaluation batch 8, generation max_length 225
pipeline: config.yaml defaults: bf16 (fp16 without bf16, fp32 on CPU), SDPA, no gradient
          checkpointing, fused AdamW on GPU, batch 16, evaluation batch 64, generation capped
          at the longest label + 10%

Prints training samples/s and MFU (model FLOPs of forward + backward over the device's
peak), evaluation clips/s, and pipeline/blog ratios. Random weights never emit <|endoftext|>,
so evaluation is timed twice: "to cap" (every clip generates up to the recipe's cap, the
runaway case the cap exists for) and "same length" (both generate exactly --label-tokens
tokens, which isolates batch size, precision and attention).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from whisper_ft.collator import SpeechCollator  # noqa: E402
from whisper_ft.config import Config  # noqa: E402
from whisper_ft.train import generation_max_length, resolve_precision  # noqa: E402

SIZES = {  # d_model, layers (encoder = decoder), heads, ffn: the released Whisper shapes
    "tiny": (384, 4, 6, 1536), "base": (512, 6, 8, 2048), "small": (768, 12, 12, 3072), "medium": (1024, 24, 16, 4096),
}
PREFIX = [50258, 50273, 50359, 50363]
EOT = 50257
# Dense peak TFLOP/s by GPU name and compute dtype (vendor datasheets, no sparsity).
GPU_PEAK = {"H200": {"bf16": 989, "fp16": 989, "fp32": 495}, "H100": {"bf16": 989, "fp16": 989, "fp32": 495},
            "A100": {"bf16": 312, "fp16": 312, "fp32": 156}, "L40S": {"bf16": 362, "fp16": 362, "fp32": 183},
            "A10": {"bf16": 125, "fp16": 125, "fp32": 62}, "L4": {"bf16": 121, "fp16": 121, "fp32": 60},
            "V100": {"fp16": 125, "fp32": 15.7}, "T4": {"fp16": 65, "fp32": 8.1}}


@dataclass(frozen=True)
class Recipe:
    name: str
    precision: str  # fp32 | fp16 | bf16
    gradient_checkpointing: bool
    attention: str
    fused_adamw: bool
    batch_size: int
    eval_batch_size: int
    max_length: int
    compile: bool = False


def recipes(device: str, rows: list[dict], compile_model: bool) -> list[Recipe]:
    cuda = device == "cuda"
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    cfg = Config()
    defaults = cfg.training
    cap = generation_max_length(cfg, [r["labels"] for r in rows])  # what run_training would cap these labels at
    return [
        Recipe("blog", "fp16" if cuda else "fp32", True, "eager", False, 16, 8, 225),
        Recipe("pipeline", resolve_precision(defaults.precision, cuda, bf16_ok), defaults.gradient_checkpointing,
               "sdpa", cuda, defaults.batch_size, defaults.eval_batch_size, cap, compile_model),
    ]


def build_model(size: str, attention: str, device: str):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    d, layers, heads, ffn = SIZES[size]
    config = WhisperConfig(vocab_size=51865, num_mel_bins=80, d_model=d, encoder_layers=layers, decoder_layers=layers,
                           encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn,
                           decoder_ffn_dim=ffn, pad_token_id=EOT, bos_token_id=EOT, eos_token_id=EOT,
                           decoder_start_token_id=PREFIX[0], attn_implementation=attention)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).to(device)
    gen = model.generation_config  # the fields Whisper's generate needs to force <|sv|><|transcribe|>
    gen.is_multilingual, gen.lang_to_id, gen.task_to_id = True, {"<|sv|>": PREFIX[1]}, {"transcribe": PREFIX[2]}
    gen.no_timestamps_token_id, gen.forced_decoder_ids = PREFIX[3], None
    return model


def examples(n: int, label_tokens: int, seed: int = 0) -> list[dict]:
    """Synthetic store rows: 2-8 s of trimmed features, labels of about `label_tokens` text tokens."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        frames = int(rng.integers(200, 800))
        n_text = max(1, int(rng.normal(label_tokens, label_tokens / 4)))
        rows.append({"input_features": rng.normal(size=(frames, 80)).astype(np.float16), "fill": -1.0,
                     "labels": PREFIX + rng.integers(220, 50000, n_text).tolist() + [EOT]})
    return rows


def forward_flops(config, label_len: float) -> float:
    """Matmul FLOPs of one forward pass for one clip (1500 encoder positions, `label_len` decoder)."""
    d, f, v, e, t = config.d_model, config.encoder_ffn_dim, config.vocab_size, 1500, label_len
    conv = 2 * (config.num_mel_bins * d * 3 * 3000 + d * d * 3 * e)
    enc = config.encoder_layers * (2 * e * (4 * d * d + 2 * d * f) + 4 * e * e * d)
    dec = config.decoder_layers * (2 * t * (4 * d * d + 2 * d * d + 2 * d * f) + 2 * e * 2 * d * d
                                   + 4 * t * t * d + 4 * t * e * d)
    return conv + enc + dec + 2 * t * d * v


def peak_flops(device: str, precision: str, override_tflops: float) -> tuple[float, str]:
    if override_tflops > 0:
        return override_tflops * 1e12, "given"
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, table in GPU_PEAK.items():
            if key in name:
                return table.get(precision, table["fp32"]) * 1e12, f"{name} datasheet"
        return float("nan"), f"{name}: unknown peak, pass --peak-tflops"
    # CPU: cores x clock x 32 fp32 FLOP/cycle (two 256-bit FMA units); an estimate, not a measurement.
    mhz = max((float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("cpu MHz")), default=float("nan"))
    return torch.get_num_threads() * mhz * 1e6 * 32, f"{torch.get_num_threads()} threads x {mhz:.0f} MHz x 32 (estimate)"


def autocast(device: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_train(recipe: Recipe, size: str, device: str, rows: list[dict], steps: int, warmup: int,
                peak_tflops: float = 0.0) -> dict:
    model = build_model(size, recipe.attention, device)
    model.train()
    if recipe.gradient_checkpointing:
        model.activation_checkpointing_enable()
        model.config.use_cache = False
    step_model = torch.compile(model) if recipe.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=recipe.fused_adamw or None)
    scaler = torch.amp.GradScaler(device, enabled=recipe.precision == "fp16")
    collate = SpeechCollator(PREFIX[0])
    batches = [collate(rows[i * recipe.batch_size % len(rows):][:recipe.batch_size]) for i in range(4)]
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in batches[i % len(batches)].items()}
        with autocast(device, recipe.precision):
            loss = step_model(**batch).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    sync(device)
    seconds = time.perf_counter() - t0
    label_len = float(np.mean([len(r["labels"]) - 1 for r in rows]))
    peak, peak_src = peak_flops(device, recipe.precision, peak_tflops)
    samples_s = steps * recipe.batch_size / seconds
    mfu = 3 * forward_flops(model.config, label_len) * samples_s / peak
    del model, opt
    return {"train_samples_per_s": samples_s, "mfu": mfu, "peak": peak_src}


@torch.no_grad()
def bench_eval(recipe: Recipe, size: str, device: str, rows: list[dict], new_tokens: int | None) -> float:
    """Clips/s of batched greedy generation; `new_tokens` fixes the length, else run to the cap."""
    model = build_model(size, recipe.attention, device).eval()
    if recipe.precision != "fp32":
        model = model.to(torch.bfloat16 if recipe.precision == "bf16" else torch.float16)
    collate = SpeechCollator(PREFIX[0])
    gen = {"min_new_tokens": new_tokens, "max_new_tokens": new_tokens} if new_tokens else {"max_length": recipe.max_length}
    dtype = next(model.parameters()).dtype

    def run(subset: list[dict]) -> None:
        for i in range(0, len(subset), recipe.eval_batch_size):
            x = collate(subset[i:i + recipe.eval_batch_size])["input_features"].to(device, dtype)
            model.generate(x, language="sv", task="transcribe", **gen)

    run(rows[:min(len(rows), recipe.eval_batch_size)])  # warm-up: kernels, allocator
    sync(device)
    t0 = time.perf_counter()
    run(rows)
    sync(device)
    return len(rows) / (time.perf_counter() - t0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="tiny", help="Whisper shape with random weights (default tiny)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--steps", type=int, default=10, help="timed training steps per recipe")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    p.add_argument("--eval-clips", type=int, default=64, help="clips generated per evaluation timing")
    p.add_argument("--label-tokens", type=int, default=28, help="mean text tokens per label (Swedish CV: ~28)")
    p.add_argument("--compile", action="store_true", help="torch.compile the pipeline recipe's training model")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (default: datasheet / estimate)")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generate() warns about its default max_length on every call
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rows = examples(max(64, args.eval_clips), args.label_tokens)
    where = torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name()
    print(f"whisper-{args.size} shape, random weights, on {where}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    results = {}
    for r in recipes(args.device, rows[:args.eval_clips], args.compile):
        print(f"{r.name}: {r}", flush=True)
        res = bench_train(r, args.size, args.device, rows, args.steps, args.warmup, args.peak_tflops)
        res["eval_clips_per_s_to_cap"] = bench_eval(r, args.size, args.device, rows[:args.eval_clips], None)
        res["eval_clips_per_s_same_length"] = bench_eval(r, args.size, args.device, rows[:args.eval_clips], args.label_tokens)
        results[r.name] = res
        print(f"  train {res['train_samples_per_s']:.2f} samples/s, MFU {100 * res['mfu']:.1f}% ({res['peak']}); "
              f"eval {res['eval_clips_per_s_to_cap']:.2f} clips/s to cap (max_length {r.max_length}), "
              f"{res['eval_clips_per_s_same_length']:.2f} clips/s at the same length", flush=True)
    b, p = results["blog"], results["pipeline"]
    print(f"pipeline / blog: training {p['train_samples_per_s'] / b['train_samples_per_s']:.2f}x, "
          f"evaluation {p['eval_clips_per_s_to_cap'] / b['eval_clips_per_s_to_cap']:.2f}x to cap, "
          f"{p['eval_clips_per_s_same_length'] / b['eval_clips_per_s_same_length']:.2f}x at the same length")
    if args.json:
        args.json.write_text(json.dumps({"device": where, "size": args.size, "results": results}, indent=1))
    return 0


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "CPU"


if __name__ == "__main__":
    sys.exit(main())
