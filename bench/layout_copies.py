"""How many activation copies a training step makes, with transformers' own Whisper layout and
with `whisper_ft.layout`: torch.profiler over one step of the pipeline's bare loop (bf16 weight
copy), copies grouped by shape and by the operator that asked for them.

    python bench/layout_copies.py --size small [--batch 1] [--device cpu]

Counts the copies (`aten::copy_`) of tensors of at least --min-elements elements per clip of
the batch (default: an encoder activation, 1500 positions x d_model): the weight casts and the
decoder's small tensors are left out. Runs on a CPU; the counts are the same on a GPU, where
`bench/profile_step.py --stock-layout` times them.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_training import PREFIX, SIZES, build_model, examples, pipeline_loss  # noqa: E402
from whisper_ft.collator import SpeechCollator, expand  # noqa: E402

PLUMBING = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::to", "aten::reshape"}


def copies(size: str, batch: int, device: str, contiguous: bool, min_elements: int) -> Counter:
    """(shape, asked for by) -> count of the large copies in one training step."""
    from torch.profiler import ProfilerActivity, profile

    model = build_model(size, "sdpa", device, contiguous).train()
    inputs = expand({k: v.to(device) for k, v in SpeechCollator(PREFIX[0])(examples(batch, 28)).items()})
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        pipeline_loss(model, inputs, device, "bf16", weight_copy=True).backward()
    out: Counter = Counter()
    for e in prof.events():
        shape = e.input_shapes[0] if e.name == "aten::copy_" and e.input_shapes else None
        if shape and len(shape) >= 3 and math.prod(shape) >= min_elements * batch:
            caller = e.cpu_parent
            while caller is not None and caller.name in PLUMBING:
                caller = caller.cpu_parent
            out[(tuple(shape), caller.name if caller is not None else "the model's code")] += 1
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="small")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--min-elements", type=int, default=0, help="per clip (default: 1500 x d_model)")
    args = p.parse_args(argv)
    min_elements = args.min_elements or 1500 * SIZES[args.size][0]
    print(f"whisper-{args.size} shape, one training step, batch {args.batch}, bf16 weight copy, {args.device}; "
          f"copies of at least {min_elements} elements per clip")
    for contiguous in (False, True):
        found = copies(args.size, args.batch, args.device, contiguous, min_elements)
        print(f"{'whisper_ft.layout' if contiguous else 'transformers layout'}: {sum(found.values())} copies")
        for (shape, caller), n in found.most_common():
            print(f"  {n:4d} x {list(shape)} for {caller}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
