"""Whisper without its layout copies, for training and the loss: the same values, less memory
traffic.

    from whisper_ft.layout import use_contiguous_layout
    use_contiguous_layout(model)      # in place; `whisper_ft.model.load_model` does it

Two places where transformers' Whisper moves activations around for nothing:
- **The encoder's residual stream.** The convolutions' output is permuted to (batch,
  positions, channels) as a view, so the whole residual stream runs in channels-first memory
  order, and every layer norm copies its input to contiguous order first, forward and
  backward: 50 copies per whisper-small training step, and every residual addition mixes two
  memory orders. One copy at the first layer puts the stream in order.
- **Attention.** `WhisperAttention` copies q, k and v into heads-first order before SDPA and
  the output back after it, and the backward pass copies gradients back: 72 copies of
  encoder-sized tensors per whisper-small training step, counting the decoder's cross-attention
  keys and values (`bench/layout_copies.py`). SDPA takes the projections as views with the
  heads split off, and on a GPU cuDNN's and flash attention work in that layout and write
  their output and gradients in it (`ProjectionLayoutAttention`). Calls that the stock module
  handles differently go to it unchanged: a KV cache (`generate`), attention weights asked
  for, an attention other than SDPA, a keyword other than those the layers only pass on.

An encoder activation of whisper-small at batch 16 is 37 MB in bf16.
`tests/test_layout.py` checks the same loss and gradients as the stock model, with fewer copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.whisper.modeling_whisper import WhisperAttention, WhisperEncoder


def use_contiguous_layout(model: torch.nn.Module) -> int:
    """Give `model` (a Whisper, or a module holding one) the copy-free layouts, in place: every
    `WhisperAttention` becomes a `ProjectionLayoutAttention` and every Whisper encoder makes its
    residual stream contiguous at its first layer. The same parameters and names, so
    checkpoints and the optimizer see no change. Returns the number of modules changed (0 the
    second time)."""
    n = 0
    for module in model.modules():
        if type(module) is WhisperAttention:
            module.__class__ = ProjectionLayoutAttention
            n += 1
        elif isinstance(module, WhisperEncoder) and len(module.layers) and not getattr(module, _ORDERED, False):
            module.layers[0].register_forward_pre_hook(_contiguous_input)
            setattr(module, _ORDERED, True)
            n += 1
    return n


_ORDERED = "_contiguous_residual_stream"
# keywords the layers pass on that only the model reads (`generate` passes output_hidden_states
# to the encoder; the encoder passes use_cache on): no reason for the stock path
_PASSED_ON = frozenset({"use_cache", "output_hidden_states", "return_dict"})


def _contiguous_input(layer, args):
    """Forward pre-hook: the layer's hidden states (its first argument) in contiguous memory order."""
    if args and torch.is_tensor(args[0]):
        return (args[0].contiguous(), *args[1:])
    return None


class ProjectionLayoutAttention(WhisperAttention):
    """`WhisperAttention` whose forward pass without a cache keeps q, k and v as views of their
    projections and reads the output back in the same layout."""

    def forward(self, hidden_states: torch.Tensor, key_value_states: torch.Tensor | None = None,
                past_key_values=None, attention_mask: torch.Tensor | None = None, output_attentions: bool = False,
                **kwargs):
        extra = [k for k, v in kwargs.items() if v is not None and k not in _PASSED_ON]
        if (past_key_values is not None or output_attentions or extra or self.config is None
                or self.config._attn_implementation != "sdpa"):
            return super().forward(hidden_states, key_value_states, past_key_values, attention_mask,
                                   output_attentions, **kwargs)
        batch, length = hidden_states.shape[:2]
        source = hidden_states if key_value_states is None else key_value_states
        heads = lambda x: x.view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        # scaled before the product, as the stock module does (and so SDPA's scale is 1)
        q = heads(self.q_proj(hidden_states) * self.scaling)
        k, v = heads(self.k_proj(source)), heads(self.v_proj(source))
        # transformers' SDPA rule: causal only where no mask is given and more than one position
        # is queried; the length first, so that under torch.compile with dynamic shapes `causal`
        # is a Python bool (the last operand), not a symbolic one SDPA refuses
        causal = length > 1 and attention_mask is None and self.is_causal
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=1.0, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, self.embed_dim)), None
