"""Mixed precision by a low-precision copy of the weights: the whole forward and backward
pass in bf16, the weights, their gradients and the optimizer in float32.

    loss = seq2seq_loss(model, {"input_features": x, "labels": y}, torch.bfloat16)
    loss.backward()                       # float32 gradients on the float32 weights
    encoded = forward(model.model.encoder, torch.bfloat16, input_features=x).last_hidden_state

Why not autocast (the HF Trainer's bf16): it keeps the residual stream and every layer norm in
float32 and casts activations to bf16 in front of each matrix product (q, k and v each cast
the same input) and back after it; on an H200 those casts took a quarter of a whisper-small
training step's kernel time (docs/training.md). Here the weights are cast, once per batch, and
the cast is part of the autograd graph: the gradients arrive in float32 on the weights that the
optimizer, the checkpoints and `best/` keep, and everything between the weights and the loss is
bf16, as in Megatron-LM's bf16 training. The loss is taken in float32 from the bf16 logits, as
under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from whisper_ft.collator import IGNORE_INDEX


def weights_in(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every floating-point parameter of `model` cast to `dtype`, by name (differentiable:
    gradients of the copies reach the parameters in their own dtype)."""
    return {name: p.to(dtype) if p.is_floating_point() else p for name, p in model.named_parameters()}


def forward(model: torch.nn.Module, dtype: torch.dtype, **inputs):
    """`model(**inputs)` computed on `dtype` copies of its weights; floating-point tensor inputs
    are cast too. Tied weights (Whisper's output projection) stay tied."""
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    return torch.func.functional_call(model, weights_in(model, dtype), args=(), kwargs=inputs, tie_weights=True,
                                      strict=False)


def seq2seq_loss(model: torch.nn.Module, inputs: dict, dtype: torch.dtype, decoder_start_token_id: int,
                 pad_token_id: int):
    """(float32 mean cross-entropy over the label tokens, model outputs) of a Whisper batch
    {"input_features" or "encoder_outputs", "labels" (B, T) padded with -100} run in `dtype`.
    The decoder inputs are the labels shifted right behind the decoder-start token, as the
    model builds them itself when given labels. No KV cache: teacher forcing needs none, and
    its per-layer state would make compiled decoder layers recompile for each layer. The
    decoder's causal mask is given (`with_causal_mask`)."""
    labels = inputs["labels"]
    decoder_input_ids = shift_right(labels, decoder_start_token_id, pad_token_id)
    rest = {k: v for k, v in with_causal_mask(inputs).items() if k != "labels"}
    outputs = forward(model, dtype, **rest, decoder_input_ids=decoder_input_ids, use_cache=False)
    logits = outputs.logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    return loss, outputs


def shift_right(labels: torch.Tensor, decoder_start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """(B, T) labels -> (B, T) decoder inputs: the start token, then the labels without their
    last token, with -100 read as padding."""
    out = labels.new_empty(labels.shape)
    out[:, 0] = decoder_start_token_id
    out[:, 1:] = labels[:, :-1]
    return out.masked_fill_(out == IGNORE_INDEX, pad_token_id)


def with_causal_mask(inputs: dict) -> dict:
    """`inputs` with the decoder's causal mask for its labels, (1, 1, T, T) booleans built on
    their device. Without one, transformers checks the decoder positions for packed sequences
    with a tensor's truth value, which waits for the GPU at every forward pass."""
    labels = inputs["labels"]
    n = labels.shape[1]
    mask = torch.ones(n, n, dtype=torch.bool, device=labels.device).tril()
    return {**inputs, "decoder_attention_mask": mask[None, None]}
