"""How long the host takes to issue one training step, without a GPU: a Whisper with the layers
and operators of a real size (whisper-small: 12 + 12 layers, 479 parameter tensors) at toy width
(d_model 16, two heads, 8 encoder positions, a 64-token vocabulary), so the arithmetic is
negligible and what is left is the host's own work per step: Python, the module calls, the
dispatcher, autograd, gradient clipping and the fused AdamW.

    python bench/host_step.py [--size small] [--compile] [--stock-layout]

On a GPU the host issues these operators while the GPU runs earlier ones, and each kernel
launch adds a few microseconds on top; the GPU waits whenever the host's time per step is the
longer. So compare these figures with the GPU time a step should take (whisper-small, batch
16: about 55 ms at 35% MFU on an H100/H200). Each variant is timed in rounds, interleaved with
the others, and the median round is printed, with the step's operators and Python calls (the
same from run to run, where this machine's timings are not).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_training import SIZES, pipeline_loss  # noqa: E402
from whisper_ft.collator import IGNORE_INDEX  # noqa: E402
from whisper_ft.layout import use_contiguous_layout  # noqa: E402
from whisper_ft.precision import shift_right, with_causal_mask  # noqa: E402
from whisper_ft.train import compile_layers  # noqa: E402
from whisper_ft.trainer import clip_gradients  # noqa: E402

START, PAD = 2, 1
# "bf16 functional_call": the same weight copy as torch's own API makes it, each weight cast by
# itself and swapped in by torch.func.functional_call, which looks each module up by name
# "bf16 WhisperTrainer": the weight copy's step as the real command takes it, through the
# Trainer (`trainer_step`)
VARIANTS = ("fp32", "bf16 weight copy", "bf16 functional_call", "bf16 autocast", "bf16 WhisperTrainer")


def toy_model(size: str):
    """Whisper with `size`'s layer counts at toy width."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    _, layers, _, _ = SIZES[size]
    config = WhisperConfig(vocab_size=64, num_mel_bins=8, d_model=16, encoder_layers=layers, decoder_layers=layers,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                           max_source_positions=4, max_target_positions=64, pad_token_id=PAD, bos_token_id=PAD,
                           eos_token_id=PAD, decoder_start_token_id=START, attn_implementation="sdpa")
    torch.manual_seed(0)
    return WhisperForConditionalGeneration(config).train()


def training_step(model, optimizer, inputs: dict, variant: str):
    """What the pipeline's bare loop does per step, on the CPU, with the Trainer's clipping."""
    if variant == "bf16 WhisperTrainer":
        return trainer_step(model, inputs)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        if variant == "bf16 functional_call":
            loss = functional_call_loss(model, inputs)
        else:
            loss = pipeline_loss(model, inputs, "cpu", variant.split()[0], weight_copy=variant == "bf16 weight copy")
        loss.backward()
        clip_gradients([p.grad for p in params if p.grad is not None], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def trainer_step(model, inputs: dict):
    """The step `WhisperTrainer` takes in its training loop, on the bf16 weight copy: its
    `training_step`, gradient clipping, optimizer (fused AdamW, as on a GPU) and schedule as
    accelerate prepares them, and `model.zero_grad()`; no data loader, callbacks or logging."""
    import tempfile

    from transformers import Seq2SeqTrainingArguments
    from transformers.utils import logging as hf_logging

    from whisper_ft.trainer import WhisperTrainer

    hf_logging.set_verbosity_error()
    out = tempfile.TemporaryDirectory(prefix="host-step-")  # removed with the step
    args = Seq2SeqTrainingArguments(output_dir=out.name, use_cpu=True, report_to=[],
                                    learning_rate=1e-5, optim="adamw_torch_fused", logging_nan_inf_filter=False)
    trainer = WhisperTrainer(model=model, args=args, weights_dtype=torch.bfloat16)
    trainer.create_optimizer_and_scheduler(num_training_steps=1 << 30)
    wrapped, optimizer, scheduler = trainer.accelerator.prepare(model, trainer.optimizer, trainer.lr_scheduler)
    trainer.current_gradient_accumulation_steps = 1

    def step(out=out) -> None:
        trainer.training_step(wrapped, inputs)
        trainer._clip_grad_norm(wrapped)
        optimizer.step()
        scheduler.step()
        wrapped.zero_grad()
    return step


def functional_call_loss(model, inputs: dict):
    """`whisper_ft.precision.seq2seq_loss` in bf16, the weights cast and swapped in by torch's API."""
    weights = {name: p.to(torch.bfloat16) for name, p in model.named_parameters(remove_duplicate=False)}
    labels = inputs["labels"]
    kwargs = {"input_features": inputs["input_features"].to(torch.bfloat16), "use_cache": False,
              "decoder_input_ids": shift_right(labels, START, PAD),
              "decoder_attention_mask": with_causal_mask(inputs)["decoder_attention_mask"]}
    logits = torch.func.functional_call(model, weights, args=(), kwargs=kwargs, tie_weights=False).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def clipping(model, rounds: int, steps: int) -> dict[str, float]:
    """Host ms of one gradient clipping, median of `rounds` interleaved rounds: torch's
    `clip_grad_norm_` over `model.parameters()`, as the Trainer calls it, and
    `whisper_ft.trainer.clip_gradients` over a list of the gradients, as `WhisperTrainer` does."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.ones_like(p)
    ways = {"torch.nn.utils.clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0),
            "whisper_ft.trainer.clip_gradients": lambda: clip_gradients([p.grad for p in params], 1.0)}
    times = timed_rounds(ways, rounds, steps)
    model.zero_grad(set_to_none=True)
    return {k: statistics.median(v) for k, v in times.items()}


def timed_rounds(ways: dict, rounds: int, steps: int) -> dict[str, list[float]]:
    """Host ms per call of each of `ways` (name -> function), in `rounds` rounds of `steps`
    calls, the ways interleaved within each round."""
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(rounds):
        for k, fn in ways.items():
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            times[k].append(1000 * (time.perf_counter() - t) / steps)
    return times


def python_calls(step) -> int:
    """Python function calls in one step (cProfile's count, C functions called from Python included)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(step)
    return pstats.Stats(prof).total_calls - 1  # not the step itself


def operators(step) -> int:
    """Operators called from Python or autograd in one step, forward and backward (not those
    they call in turn)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="small")
    p.add_argument("--compile", action="store_true", help="compile the layers (training.torch_compile)")
    p.add_argument("--stock-layout", action="store_true",
                   help="transformers' Whisper with its layout copies instead of whisper_ft.layout")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=10, help="steps per round")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    model = toy_model(args.size)
    if not args.stock_layout:  # as `whisper_ft.model.load_model` loads it
        use_contiguous_layout(model)
    if args.compile:
        compile_layers(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    inputs = {"input_features": torch.randn(1, 8, 8), "labels": torch.randint(3, 60, (1, 8))}
    steps = {v: training_step(model, optimizer, inputs, v) for v in VARIANTS}
    for step in steps.values():
        for _ in range(3):  # compilation, allocator, autograd caches
            step()
    rounds = timed_rounds(steps, args.rounds, args.steps)
    print(f"host time per training step, {args.size}'s {2 * SIZES[args.size][1]} layers at toy width"
          f"{', compiled layers' * args.compile}{', transformers layout' * args.stock_layout}:")
    for v in VARIANTS:
        print(f"  {v:20s} {statistics.median(rounds[v]):6.1f} ms  (rounds {min(rounds[v]):.1f}-{max(rounds[v]):.1f}), "
              f"{operators(steps[v])} operators, {python_calls(steps[v])} Python calls")
    ms = clipping(model, args.rounds, args.steps)
    print("gradient clipping alone: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
