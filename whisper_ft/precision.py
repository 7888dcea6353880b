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

import contextlib

import torch
import torch.nn.functional as F
from torch._utils import _unflatten_dense_tensors

from whisper_ft.collator import IGNORE_INDEX


def forward(model: torch.nn.Module, dtype: torch.dtype, **inputs):
    """`model(**inputs)` computed on `dtype` copies of its weights; floating-point tensor inputs
    are cast too. Tied weights (Whisper's output projection) stay tied: one copy in every
    place the weight is used."""
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    plan = _plan(model)
    with plan.swapped(plan.cast(dtype)):
        return model(**inputs)


class _Plan:
    """Where `model`'s parameters live and how they are cast, found once per model: a training
    step casts them all every time, and walking whisper-small's module tree for its 479
    parameter tensors and looking each module up by name took about a tenth of the host's time
    per step (cProfile of `bench/host_step.py`'s step at toy width).

    - `groups`: the parameters a layer at a time (`layer_groups`), each once. Each group is cast
      by one foreach copy into one buffer and its gradients back by another, as Megatron-LM
      copies its float32 main weights to the model's: one cast per tensor would launch ~960
      small kernels and build as many autograd nodes per step; grouped, it is 25 copies each way.
      Layers rather than the whole model, so that under DDP a layer's gradients are ready (and
      all-reduced) while the backward pass goes on.
    - `slots`: (module, attribute, parameter index) for each name of each parameter,
      so that the copies go in and the weights come back by assignment, as
      `torch.func.functional_call` does it, without looking each module up by name every time.
    """

    def __init__(self, model: torch.nn.Module):
        index: dict[int, int] = {}
        self.params: list[torch.Tensor] = []
        self.groups: list[list[int]] = []
        for group in layer_groups(model):
            self.groups.append([])
            for _, p in group:
                index[id(p)] = len(self.params)
                self.groups[-1].append(len(self.params))
                self.params.append(p)
        self.slots = []
        for full, p in model.named_parameters(remove_duplicate=False):
            owner, _, name = full.rpartition(".")
            self.slots.append((model.get_submodule(owner), name, index[id(p)]))

    def current(self) -> bool:
        """Whether every parameter is still where the plan found it (none replaced since)."""
        return all(module._parameters.get(name) is self.params[i] for module, name, i in self.slots)

    def cast(self, dtype: torch.dtype) -> list[torch.Tensor | None]:
        """A `dtype` copy of each floating-point parameter (in `params` order; None for the
        others), differentiable where gradients are being recorded and the parameter wants one."""
        out: list[torch.Tensor | None] = [None] * len(self.params)
        training = torch.is_grad_enabled()
        for group in self.groups:
            grad, frozen = [], []
            for i in group:
                p = self.params[i]
                if p.is_floating_point():
                    (grad if training and p.requires_grad else frozen).append(i)
            if grad:
                for i, copy in zip(grad, _Cast.apply(dtype, *[self.params[i] for i in grad])):
                    out[i] = copy
            if frozen:
                with torch.no_grad():
                    for i, copy in zip(frozen, cast_all([self.params[i] for i in frozen], dtype)):
                        out[i] = copy
        return out

    @contextlib.contextmanager
    def swapped(self, copies: list[torch.Tensor | None]):
        """The model with `copies` in place of its parameters (those given), restored on exit."""
        for module, name, i in self.slots:
            if copies[i] is not None:
                module._parameters[name] = copies[i]
        try:
            yield
        finally:
            for module, name, i in self.slots:
                module._parameters[name] = self.params[i]


def _plan(model: torch.nn.Module) -> _Plan:
    """`model`'s plan, kept on it (a copy of the model copies it along), found again when a
    parameter was replaced since (a resized embedding)."""
    plan = model.__dict__.get("_precision_plan")
    if plan is None or not plan.current():
        plan = model.__dict__["_precision_plan"] = _Plan(model)
    return plan


def layer_groups(model: torch.nn.Module) -> list[list[tuple[list[str], torch.Tensor]]]:
    """`model`'s parameters grouped by layer: one group per element of a `layers` list
    (`model.encoder.layers.3.`), one for everything else. Each parameter comes once, with all
    its names: a tied weight has several (Whisper's output projection is its token embedding)."""
    names: dict[int, list[str]] = {}
    groups: dict[str, list] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in names:
            names[id(p)].append(name)
            continue
        names[id(p)] = [name]
        parts = name.split(".")
        at = parts.index("layers") + 2 if "layers" in parts[:-2] else 0
        groups.setdefault(".".join(parts[:at]), []).append((names[id(p)], p))
    return list(groups.values())


def cast_all(tensors, dtypes) -> list[torch.Tensor]:
    """`tensors` cast to `dtypes` (one dtype, or one per tensor) by `torch._foreach_copy_`: on
    a GPU one kernel for the group where the source dtypes and the target dtypes agree. Where
    the target dtype and device are the same for all, the copies are views of one buffer, made
    in one call (not one allocation per tensor)."""
    dtypes = dtypes if isinstance(dtypes, (list, tuple)) else [dtypes] * len(tensors)
    device = tensors[0].device
    if all(d == dtypes[0] for d in dtypes) and all(t.device == device for t in tensors):
        flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtypes[0], device=device)
        out = list(_unflatten_dense_tensors(flat, tensors))
    else:
        out = [torch.empty_like(t, dtype=d) for t, d in zip(tensors, dtypes)]
    torch._foreach_copy_(out, list(tensors))
    return out


class _Cast(torch.autograd.Function):
    """A group of tensors cast to `dtype` as one autograd node; the gradients cast back to the
    tensors' own dtypes. Gradients that never arrive (an unused parameter) stay None."""

    @staticmethod
    def forward(ctx, dtype, *tensors):
        ctx.set_materialize_grads(False)
        ctx.dtypes = [t.dtype for t in tensors]
        return tuple(cast_all(tensors, dtype))

    @staticmethod
    def backward(ctx, *grads):
        given = [i for i, g in enumerate(grads) if g is not None]
        out = [None] * len(grads)
        if given:
            for i, g in zip(given, cast_all([grads[i] for i in given], [ctx.dtypes[i] for i in given])):
                out[i] = g
        return (None, *out)


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
