"""What compiling the layers (`training.torch_compile`) costs at the start of a run, on this
machine: the first training steps of a Whisper with whisper-small's 24 layers at toy width
(`bench/host_step.py`'s model), with labels of a new length at each step as in training, for
decoder layers compiled for any length from the start (the pipeline) against torch.compile's
default (first the length it sees, then any). Each variant runs in a fresh process with
inductor's caches off, so neither reuses the other's compilation.

    python bench/compile_cost.py [--size small] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"any length from the start (pipeline)": True, "torch.compile's default": False}


def first_steps(size: str, steps: int, dynamic_decoder: bool) -> dict:
    """Seconds after each of the first `steps` training steps, and the graphs compiled."""
    import torch
    from torch._dynamo.utils import counters

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from host_step import toy_model, training_step
    from whisper_ft.layout import use_contiguous_layout
    from whisper_ft.train import compile_layers

    torch.set_num_threads(1)
    model = toy_model(size)
    use_contiguous_layout(model)
    compile_layers(model, dynamic_decoder=dynamic_decoder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    start, seconds = time.perf_counter(), []
    for n in range(8, 8 + steps):
        inputs = {"input_features": torch.randn(1, 8, 8), "labels": torch.randint(3, 60, (1, n))}
        training_step(model, optimizer, inputs, "bf16 weight copy")()
        seconds.append(round(time.perf_counter() - start, 2))
    return {"seconds": seconds, "graphs": counters["stats"]["unique_graphs"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--variant", choices=["dynamic", "default"], help=argparse.SUPPRESS)  # one fresh process's part
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(first_steps(args.size, args.steps, args.variant == "dynamic")))
        return 0
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    print(f"first {args.steps} training steps with compiled layers ({args.size}'s layers at toy width, labels of "
          f"{args.steps} lengths):")
    for name, dynamic in VARIANTS.items():
        out = subprocess.run([sys.executable, __file__, "--size", args.size, "--steps", str(args.steps),
                              "--variant", "dynamic" if dynamic else "default"], env=env, capture_output=True,
                             text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {name:38s} {r['seconds'][-1]:6.1f} s, {r['graphs']} graphs (after each step: {r['seconds']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
