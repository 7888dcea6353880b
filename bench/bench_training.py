"""Training and evaluation speed: this pipeline's defaults against the HF blog recipe, side by
side in one run on the same random-weight Whisper, on the device given.

    python bench/bench_training.py                              # whisper-tiny-sized, CPU or GPU
    python bench/bench_training.py --size small --device cuda   # whisper-small on a GPU
    python bench/bench_training.py --size small --device cuda --compile

blog:     fp16 on GPU (fp32 on CPU), gradient checkpointing, SDPA attention and fused AdamW on GPU
          (today's transformers defaults), padded float32 batches from the CPU, batch 16; evaluation
          with `generate`, batch 8, max_length 225
pipeline: config.yaml defaults: bf16 on a bf16 copy of the weights (`whisper_ft.precision`;
          fp16 autocast without bf16, fp32 on CPU), SDPA, no gradient checkpointing, fused
          AdamW on GPU, compact float16 batches padded on the device, batch 16 (--compile:
          compiled layers; "pipeline+autocast": bf16 by autocast instead of the weight copy;
          "pipeline+stock-layout": transformers' Whisper with its layout copies instead of
          `whisper_ft.layout`; both training only); evaluation with `whisper_ft.decoding`
          (static KV cache, CUDA graph on GPU), batch 64, generation capped at the longest
          label + 10%

These are bare loops (no Trainer); `bench/bench_e2e.py` times the real commands. Prints
training samples/s and MFU (model FLOPs of forward + backward over the device's peak), the
time of the first steps (compilation), evaluation clips/s, and pipeline/blog ratios. Random
weights never emit <|endoftext|>, so evaluation is timed twice: "to cap" (every clip generates
up to the recipe's cap, the runaway case the cap exists for) and "same length" (both generate
exactly --label-tokens tokens, which isolates the decoding engine, batch size and precision).
`--agreement N` also decodes N clips with both engines on one model and counts identical outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from whisper_ft.collator import SpeechCollator, expand  # noqa: E402
from whisper_ft.config import Config  # noqa: E402
from whisper_ft.decoding import GreedyDecoder, max_new_tokens, suppressed_tokens  # noqa: E402
from whisper_ft.layout import use_contiguous_layout  # noqa: E402
from whisper_ft.precision import seq2seq_loss, with_causal_mask  # noqa: E402
from whisper_ft.train import compile_layers, generation_max_length, resolve_precision, uses_weight_copy  # noqa: E402

SIZES = {  # d_model, layers (encoder = decoder), heads, ffn: the released Whisper shapes
    "tiny": (384, 4, 6, 1536), "base": (512, 6, 8, 2048), "small": (768, 12, 12, 3072), "medium": (1024, 24, 16, 4096),
}
PREFIX = [50258, 50273, 50359, 50363]
EOT = 50257
TIMESTAMP_BEGIN = 50364  # <|0.00|>
# Dense peak TFLOP/s by GPU name and compute dtype (vendor datasheets, no sparsity); the first key
# found in the device's name counts, so the PCIe and NVL cards come before the SXM ones.
GPU_PEAK = {"H100 PCIe": {"bf16": 756, "fp16": 756, "fp32": 378}, "NVL": {"bf16": 835, "fp16": 835, "fp32": 418},
            "H200": {"bf16": 989, "fp16": 989, "fp32": 495}, "H100": {"bf16": 989, "fp16": 989, "fp32": 495},
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
    compact_batches: bool = False  # float16 frames + lengths, padded on the device
    fast_decoding: bool = False  # whisper_ft.decoding instead of generate
    compile: bool = False
    weight_copy: bool = False  # bf16 on a copy of the weights instead of autocast
    contiguous_layout: bool = False  # encoder and attention without layout copies (whisper_ft.layout)


def recipes(device: str, rows: list[dict], compile_model: bool, precision: str = "") -> list[Recipe]:
    """The blog's recipe and the pipeline's (`precision`: the pipeline's, default the config's)."""
    cuda = device == "cuda"
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    cfg = Config()
    defaults = cfg.training
    cap = generation_max_length(cfg, max(len(r["labels"]) for r in rows))  # what run_training would cap them at
    chosen = resolve_precision(precision or defaults.precision, cuda, bf16_ok)
    copy = uses_weight_copy(chosen, defaults)
    pipeline = Recipe("pipeline", chosen, defaults.gradient_checkpointing, "sdpa", cuda, defaults.batch_size,
                      defaults.eval_batch_size, cap, True, defaults.fast_generation, weight_copy=copy,
                      contiguous_layout=True)
    # the blog's Trainer today: fused AdamW (transformers' default with torch >= 2.8)
    out = [Recipe("blog", "fp16" if cuda else "fp32", True, "sdpa", cuda, 16, 8, 225), pipeline]
    if copy:
        out.append(dataclasses.replace(pipeline, name="pipeline+autocast", weight_copy=False))
    out.append(dataclasses.replace(pipeline, name="pipeline+stock-layout", contiguous_layout=False))
    if compile_model:
        out.append(dataclasses.replace(pipeline, name="pipeline+compile", compile=True))
    return out


def build_model(size: str, attention: str, device: str, contiguous_layout: bool = False):
    """A random-weight Whisper of `size`, as the pipeline loads one with `contiguous_layout`
    (`whisper_ft.layout`), else as transformers builds it."""
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
    # Random weights emit timestamp tokens, after which `generate` seeks into the window and
    # decodes a second segment; a trained model with <|notimestamps|> does not. Suppressed,
    # both engines do plain greedy decoding and can be compared.
    gen.suppress_tokens = list(range(TIMESTAMP_BEGIN, config.vocab_size))
    if contiguous_layout:
        use_contiguous_layout(model)
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
                peak = table.get(precision, table["fp32"])
                return peak * 1e12, f"{name} datasheet, {peak:g} TFLOP/s {precision if precision in table else 'fp32'}"
        return float("nan"), f"{name}: unknown peak, pass --peak-tflops"
    # CPU: cores x clock x 32 fp32 FLOP/cycle (two 256-bit FMA units); an estimate, not a measurement.
    mhz = max((float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("cpu MHz")), default=float("nan"))
    return torch.get_num_threads() * mhz * 1e6 * 32, f"{torch.get_num_threads()} threads x {mhz:.0f} MHz x 32 (estimate)"


def autocast(device: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def pipeline_loss(model, batch: dict, device: str, precision: str, weight_copy: bool):
    """The pipeline's training loss of a batch, as `WhisperTrainer` computes it: on a bf16 copy
    of the weights, or under autocast in `precision` (none for fp32) with the decoder's causal
    mask (no host sync) and no KV cache."""
    if weight_copy:
        config = model.config
        return seq2seq_loss(model, batch, torch.bfloat16, config.decoder_start_token_id, config.pad_token_id)[0]
    with autocast(device, precision):
        return model(**with_causal_mask(batch), use_cache=False).loss


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_train(recipe: Recipe, size: str, device: str, rows: list[dict], steps: int, warmup: int,
                peak_tflops: float = 0.0) -> dict:
    model = build_model(size, recipe.attention, device, recipe.contiguous_layout)
    model.train()
    if recipe.gradient_checkpointing:
        model.activation_checkpointing_enable()
        model.config.use_cache = False
    if recipe.compile:
        compile_layers(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=recipe.fused_adamw or None)
    scaler = torch.amp.GradScaler(device, enabled=recipe.precision == "fp16")
    # the blog's collator pads labels to the longest, the pipeline's to a multiple of 8 tokens
    collate = SpeechCollator(PREFIX[0], label_multiple=1) if recipe.name == "blog" else SpeechCollator(PREFIX[0])
    batches = [collate(rows[i * recipe.batch_size % len(rows):][:recipe.batch_size]) for i in range(4)]
    if not recipe.compact_batches:  # the blog's collator hands over padded float32 inputs
        batches = [expand(b) for b in batches]
    if device == "cuda":
        batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
    start = time.perf_counter()
    t0 = first_steps = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
            first_steps = t0 - start
        batch = expand({k: v.to(device, non_blocking=True) for k, v in batches[i % len(batches)].items()})
        if recipe.name == "blog":
            with autocast(device, recipe.precision):  # as its Trainer runs it: no KV cache
                loss = model(**batch, use_cache=False).loss
        else:
            loss = pipeline_loss(model, batch, device, recipe.precision, recipe.weight_copy)
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
    return {"train_samples_per_s": samples_s, "mfu": mfu, "peak": peak_src, "first_steps_s": first_steps,
            "warmup_steps": warmup}


def precision_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def fast_decoder(model, new_tokens: int, min_tokens: int | None = None, dtype: torch.dtype | None = None):
    """The pipeline's decoder for `decode_batches` (`dtype`: its matmul precision, as the Trainer
    sets it under autocast); built once per timing, so that its caches and CUDA graph are."""
    decoder = GreedyDecoder(model, PREFIX, new_tokens, dtype)
    if min_tokens:  # as min_new_tokens: no <|endoftext|>, every clip runs to the length
        decoder.suppress[EOT] = -float("inf")
    return decoder


def decode_batches(model, rows: list[dict], batch_size: int, device: str, fast: bool, new_tokens: int,
                   min_tokens: int | None = None, dtype: torch.dtype | None = None,
                   decoder: GreedyDecoder | None = None, suppress: list[int] | None = None) -> list[list[int]]:
    """Greedy transcripts (token lists) of `rows`, in batches, with one engine: `fast` (the
    pipeline's `decoder`, else a new one) or `generate` (given `suppress` as its suppress_tokens,
    as the pipeline's evaluation gives it)."""
    collate = SpeechCollator(PREFIX[0])
    if fast and decoder is None:
        decoder = fast_decoder(model, new_tokens, min_tokens, dtype)
    out = []
    for i in range(0, len(rows), batch_size):
        x = expand({k: v.to(device) for k, v in collate(rows[i:i + batch_size]).items()})["input_features"]
        x = x.to(next(model.parameters()).dtype)
        if fast:
            ids = decoder.generate(model.model.encoder(x).last_hidden_state)
        else:
            lengths = {"min_new_tokens": min_tokens} if min_tokens else {}
            if suppress is not None:
                lengths["suppress_tokens"] = suppress
            ids = model.generate(x, language="sv", task="transcribe", max_new_tokens=new_tokens, **lengths)
        out += [[t for t in row if t != EOT] for row in ids.tolist()]
    return out


@torch.no_grad()
def bench_eval(recipe: Recipe, size: str, device: str, rows: list[dict], new_tokens: int | None,
               batch_size: int = 0) -> float:
    """Clips/s of batched greedy generation; `new_tokens` fixes the length, else run to the cap."""
    model = build_model(size, recipe.attention, device, recipe.contiguous_layout).eval()
    model = model.to(precision_dtype(recipe.precision))
    batch_size = batch_size or recipe.eval_batch_size
    cap = max_new_tokens(recipe.max_length, len(PREFIX))  # what generate(max_length=...) allows

    decoder = fast_decoder(model, new_tokens or cap, new_tokens) if recipe.fast_decoding else None

    def run(subset: list[dict]) -> None:
        decode_batches(model, subset, batch_size, device, recipe.fast_decoding, new_tokens or cap, new_tokens,
                       decoder=decoder)

    run(rows[:min(len(rows), batch_size)])  # warm-up: kernels, allocator, graph capture (kept for the timed run)
    sync(device)
    t0 = time.perf_counter()
    run(rows)
    sync(device)
    return len(rows) / (time.perf_counter() - t0)


@torch.no_grad()
def agreement(size: str, device: str, rows: list[dict], precision: str, new_tokens: int) -> tuple[float, float]:
    """Fraction of clips whose greedy transcript from whisper_ft.decoding equals generate's
    (batch 64), and generate's own at batch 16 against batch 64, on one random-weight model in
    `precision` (autocast over float32 weights, as in training)."""
    model = build_model(size, "sdpa", device).eval()
    suppress = suppressed_tokens(model, PREFIX)  # timestamps too, as the evaluation asks of generate
    with autocast(device, precision):
        ours = decode_batches(model, rows, 64, device, True, new_tokens, dtype=precision_dtype(precision))
        ref = decode_batches(model, rows, 64, device, False, new_tokens, suppress=suppress)
        ref16 = decode_batches(model, rows, 16, device, False, new_tokens, suppress=suppress)  # the noise floor
    return float(np.mean([a == b for a, b in zip(ours, ref)])), float(np.mean([a == b for a, b in zip(ref16, ref)]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="tiny", help="Whisper shape with random weights (default tiny)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--steps", type=int, default=10, help="timed training steps per recipe")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    p.add_argument("--eval-clips", type=int, default=64, help="clips generated per evaluation timing")
    p.add_argument("--label-tokens", type=int, default=28, help="mean text tokens per label (Swedish CV: ~28)")
    p.add_argument("--compile", action="store_true", help="also time the pipeline with compiled layers")
    p.add_argument("--eval-batch-sizes", default="", help="extra evaluation batch sizes to time for the pipeline, e.g. 128,256")
    p.add_argument("--agreement", type=int, default=0, help="clips to decode with both engines (fp32 and bf16)")
    p.add_argument("--agreement-only", action="store_true", help="only the --agreement check, no timings")
    p.add_argument("--skip-blog", action="store_true", help="time the pipeline only")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), help="the pipeline's (default: config.yaml's)")
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
    extra_batches = [int(b) for b in args.eval_batch_sizes.split(",") if b.strip()]
    rows = examples(max([64, args.eval_clips, args.agreement, *extra_batches]), args.label_tokens)
    where = torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name()
    print(f"whisper-{args.size} shape, random weights, on {where}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    results: dict = {}
    out = {"device": where, "size": args.size, "torch": torch.__version__, "results": results}
    for r in [] if args.agreement_only else recipes(args.device, rows[:args.eval_clips], args.compile, args.precision or ""):
        if args.skip_blog and r.name == "blog":
            continue
        print(f"{r.name}: {r}", flush=True)
        res = results[r.name] = bench_train(r, args.size, args.device, rows, args.steps, args.warmup, args.peak_tflops)
        print(f"  train {res['train_samples_per_s']:.2f} samples/s, MFU {100 * res['mfu']:.1f}% ({res['peak']}); "
              f"first {args.warmup} steps {res['first_steps_s']:.1f} s", flush=True)
        _save(args.json, out)
        if r.compile or r.name in ("pipeline+autocast", "pipeline+stock-layout"):
            continue  # evaluation uses neither the compiled training layers nor autocast (timed with the pipeline)
        # The blog's generate is slow: time it on fewer clips (clips/s does not depend on the count).
        clips = rows[:args.eval_clips if r.fast_decoding else max(r.eval_batch_size, args.eval_clips // 8)]
        res["eval_clips_per_s_to_cap"] = bench_eval(r, args.size, args.device, clips, None)
        res["eval_clips_per_s_same_length"] = bench_eval(r, args.size, args.device, clips, args.label_tokens)
        print(f"  eval {res['eval_clips_per_s_to_cap']:.2f} clips/s to cap (max_length {r.max_length}), "
              f"{res['eval_clips_per_s_same_length']:.2f} clips/s at the same length ({len(clips)} clips, "
              f"batch {r.eval_batch_size})", flush=True)
        for bs in extra_batches:
            if r.fast_decoding:
                res[f"eval_clips_per_s_same_length_batch{bs}"] = v = bench_eval(
                    r, args.size, args.device, rows[:max(bs, args.eval_clips)], args.label_tokens, bs)
                print(f"  eval batch {bs}: {v:.2f} clips/s at the same length", flush=True)
        _save(args.json, out)
    if "blog" in results:
        b, p = results["blog"], results["pipeline"]
        print(f"pipeline / blog: training {p['train_samples_per_s'] / b['train_samples_per_s']:.2f}x, "
              f"evaluation {p['eval_clips_per_s_to_cap'] / b['eval_clips_per_s_to_cap']:.2f}x to cap, "
              f"{p['eval_clips_per_s_same_length'] / b['eval_clips_per_s_same_length']:.2f}x at the same length")
    if args.agreement:
        for precision in ("fp32", "bf16"):
            if args.device == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
            a, floor = agreement(args.size, args.device, rows[:args.agreement], precision, args.label_tokens)
            out[f"agreement_{precision}"], out[f"agreement_{precision}_generate_batch16_vs_64"] = a, floor
            print(f"identical greedy transcripts ({precision}, random weights, {args.agreement} clips): "
                  f"whisper_ft.decoding vs generate {100 * a:.1f}%; generate batch 16 vs 64 {100 * floor:.1f}%", flush=True)
        _save(args.json, out)
    return 0


def _save(path: Path | None, out: dict) -> None:
    if path:
        path.write_text(json.dumps(out, indent=1))


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "CPU"


if __name__ == "__main__":
    sys.exit(main())
