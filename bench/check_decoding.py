"""Where does whisper_ft.decoding differ from `generate`? Compares, on one random-weight model:
the logits after the prefix (teacher-forced transformers forward vs our prefill), and greedy
transcripts of generate, our eager steps, our CUDA-graph steps and our steps with the math
attention backend.

    python bench/check_decoding.py --size small --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_training import EOT, PREFIX, SIZES, build_model, examples  # noqa: E402
from whisper_ft.collator import SpeechCollator, expand  # noqa: E402
from whisper_ft.decoding import GreedyDecoder, _State  # noqa: E402


def tokens(ids: torch.Tensor) -> list[list[int]]:
    return [[t for t in row if t != EOT] for row in ids.tolist()]


def same(a, b) -> str:
    hits = sum(x == y for x, y in zip(a, b))
    first = next((next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
                  for x, y in zip(a, b) if x != y), None)
    return f"{hits}/{len(a)} identical (first difference of clip 0 at token {first})"


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--tokens", type=int, default=20)
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = build_model(args.size, "sdpa", args.device).eval()
    rows = examples(args.clips, 28)
    x = expand({k: v.to(args.device) for k, v in SpeechCollator(PREFIX[0])(rows).items()})["input_features"]
    enc = model.model.encoder(x).last_hidden_state
    prefix = torch.tensor(PREFIX, device=args.device).expand(len(rows), -1)
    ref_logits = model(encoder_outputs=(enc,), decoder_input_ids=prefix).logits[:, -1].float()
    dec = GreedyDecoder(model, PREFIX, args.tokens, cuda_graph=False)
    dec.state = state = _State.allocate(dec, len(rows), enc.shape[1])
    state.load(dec, enc)
    ours_logits = dec._forward(state, state.tokens[:, :len(PREFIX)], state.positions[:len(PREFIX)]) - dec.suppress
    print(f"prefix logits: max |ours - transformers| = {(ours_logits - ref_logits).abs().max().item():.3g}, "
          f"scale {ref_logits.abs().max().item():.3g}; argmax equal {(ours_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item():.2f}")
    ref = tokens(model.generate(x, language="sv", task="transcribe", max_new_tokens=args.tokens))
    eager = tokens(GreedyDecoder(model, PREFIX, args.tokens, cuda_graph=False).generate(enc))
    print("generate vs ours, eager:", same(ref, eager))
    if args.device == "cuda":
        graph = tokens(GreedyDecoder(model, PREFIX, args.tokens, cuda_graph=True).generate(enc))
        print("ours eager vs ours, CUDA graph:", same(eager, graph))
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            math = tokens(GreedyDecoder(model, PREFIX, args.tokens, cuda_graph=False).generate(enc))
        print("generate vs ours, math attention:", same(ref, math))
    print("clip 0, generate:", ref[0][:12])
    print("clip 0, ours:    ", eager[0][:12])
    return 0


if __name__ == "__main__":
    sys.exit(main())
