"""Where a training step's GPU time goes: torch.profiler over a few steps of the pipeline's
bare loop (random-weight Whisper, bf16 on a weight copy, compact batches), kernels grouped by
kind; and where the host's time goes (cProfile's hot spots).

    python bench/profile_step.py --size small [--batch 16] [--compile] [--autocast] [--stock-layout]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_training import PREFIX, SIZES, build_model, examples, pipeline_loss  # noqa: E402
from whisper_ft.collator import SpeechCollator, expand  # noqa: E402
from whisper_ft.train import compile_layers  # noqa: E402

KINDS = (("copy/cast", ("copyfunctor", "direct_copy")), ("gemm", ("gemm", "matmul", "cutlass", "sm90_xmma", "nvjet", "cublas")), ("attention", ("flash", "fmha", "attention", "efficient")),
         ("convolution", ("conv", "cudnn", "implicit")), ("optimizer", ("adam", "multi_tensor", "foreach")),
         ("norm", ("layer_norm", "layernorm")), ("loss/softmax", ("softmax", "nll", "cross_entropy", "log_softmax")))


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS if any(key in low for key in keys)), "elementwise/other")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--autocast", action="store_true", help="bf16 by autocast instead of on a bf16 weight copy")
    p.add_argument("--stock-layout", action="store_true",
                   help="transformers' Whisper with its layout copies instead of whisper_ft.layout")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    model = build_model(args.size, "sdpa", "cuda", contiguous_layout=not args.stock_layout).train()
    if args.compile:
        compile_layers(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    batch = SpeechCollator(PREFIX[0])(examples(args.batch, 28))

    def step():
        inputs = expand({k: v.to("cuda", non_blocking=True) for k, v in batch.items()})
        loss = pipeline_loss(model, inputs, "cuda", "bf16", weight_copy=not args.autocast)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(8):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.steps
    print_hotspots(step, args.steps)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    by_kind: dict[str, float] = defaultdict(float)
    total = host = 0.0
    kernels = 0
    for e in prof.key_averages():
        t = e.self_device_time_total
        host += e.self_cpu_time_total  # operators and CUDA runtime calls, each counted once
        if t > 0 and e.self_cpu_time_total == 0:  # kernels only: operators would count their kernels again
            by_kind[kind(e.key)] += t
            total += t
            kernels += e.count
    mode = ("autocast" if args.autocast else "weight copy") + (", stock layout" if args.stock_layout else "")
    busy = total / args.steps / 1e6 / wall
    print(f"GPU kernel time per step: {total / args.steps / 1000:.1f} ms (batch {args.batch}, {args.size}, bf16 {mode}); "
          f"{kernels // args.steps} kernels per step; unprofiled {1000 * wall:.1f} ms per step, with the GPU busy "
          f"{100 * busy:.0f}% of it (less: the host cannot issue the kernels as fast as the GPU runs them)")
    print(f"host time in operators and CUDA calls: {host / args.steps / 1000:.1f} ms per step (profiled, so somewhat "
          f"more than unprofiled)")
    for k, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {k:20s} {t / args.steps / 1000:7.2f} ms  {100 * t / total:5.1f}%")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=70))
    return 0


def print_hotspots(step, steps: int) -> None:
    """The host's hot spots over `steps` more steps (cProfile), to compare with the real
    command's (`bench_e2e.py --hotspot-steps`)."""
    import cProfile

    from bench_e2e import hotspots

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    prof.disable()
    print("host hot spots per step (cProfile):")
    for line in hotspots(prof, steps, 10):
        print(f"  {line}")


if __name__ == "__main__":
    sys.exit(main())
