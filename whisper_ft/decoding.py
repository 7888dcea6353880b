"""Fast batched greedy decoding for Whisper evaluation: a static KV cache and, on a GPU, one
CUDA graph per decoding step.

    decoder = GreedyDecoder(model, prefix=[50258, 50273, 50359, 50363], max_new_tokens=40)
    encoded = model.model.encoder(input_features).last_hidden_state       # (B, 1500, d_model)
    tokens = decoder.generate(encoded)                                     # (B, 40) int64

Why not `model.generate`: it spends most of each step in Python (logits processors, cache
objects, mask building), about 80 ms per token at batch 64 on an H200, so evaluation took
longer than training. Here a step is a fixed sequence of tensor operations on preallocated
buffers (no host synchronisation), which a CUDA graph replays with one launch. It computes
what greedy `generate` computes for Whisper's short-form transcription: the forced prefix,
`suppress_tokens` at every step, `begin_suppress_tokens` at the first generated token,
end-of-text padding after a clip finishes, the same cap on new tokens. After a prefix ending
in <|notimestamps|> both suppress the timestamp tokens too (`suppressed_tokens`, which the
evaluation also gives `generate`): two of them in a row make `generate` drop the text after
them and decode the clip again from that time, even without timestamps, and <|0.00|><|0.00|>
never ends. In float32 its tokens are generate's; in bfloat16 the two round at other places
(the encoder runs on a bfloat16 copy of the weights here, under autocast in generate) and a
few clips' transcripts differ.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from whisper_ft.config import MAX_TARGET_POSITIONS

log = logging.getLogger("whisper_ft.decoding")

CHECK_EVERY = 8  # steps between checks whether every clip has finished (each check waits for the GPU)


def max_new_tokens(max_length: int, n_prefix: int, max_positions: int = MAX_TARGET_POSITIONS) -> int:
    """New tokens that `generate(max_length=...)` allows Whisper: the prefix does not count
    against `max_length`, but the whole sequence must fit the decoder's positions."""
    return max(1, min(max_length + n_prefix, max_positions) - n_prefix)


def suppressed_tokens(model, prefix: list[int]) -> list[int]:
    """The tokens greedy decoding after `prefix` never picks: the generation config's
    `suppress_tokens`, and every timestamp token when the prefix ends in <|notimestamps|>."""
    gen = model.generation_config
    tokens = list(gen.suppress_tokens or [])
    no_timestamps = getattr(gen, "no_timestamps_token_id", None)
    if no_timestamps is not None and prefix and prefix[-1] == no_timestamps:
        tokens += range(no_timestamps + 1, model.config.vocab_size)
    return tokens


class GreedyDecoder:
    """Greedy decoding of a `WhisperForConditionalGeneration` from encoder outputs.

    The decoder weights are copied once, in `dtype` (default: the model's), so build one
    decoder per evaluation: later changes to the model are not seen. Smaller batches than the
    first are padded to its size, so a CUDA graph captured once serves them all.
    """

    def __init__(self, model, prefix: list[int], max_new_tokens: int, dtype: torch.dtype | None = None,
                 cuda_graph: bool | None = None):
        cfg = model.config
        gen = model.generation_config
        dec = model.model.decoder
        self.device = dec.embed_tokens.weight.device
        # As under autocast: matrix products in `dtype`; embeddings, norms and the residual
        # stream in the parameters' own precision.
        self.master = dec.embed_tokens.weight.dtype
        self.dtype = dtype or self.master
        self.prefix = list(prefix)
        self.eot = gen.eos_token_id if isinstance(gen.eos_token_id, int) else gen.eos_token_id[0]
        self.pad = gen.pad_token_id if gen.pad_token_id is not None else self.eot
        self.length = len(self.prefix) + max_new_tokens
        if self.length > cfg.max_target_positions:
            raise ValueError(f"{len(self.prefix)} prefix + {max_new_tokens} new tokens exceed the decoder's "
                             f"{cfg.max_target_positions} positions")
        self.heads = cfg.decoder_attention_heads
        self.scale = (cfg.d_model // self.heads) ** -0.5
        self.w = _decoder_weights(model, self.dtype)
        self.n_prefix = len(self.prefix)
        self.suppress = self._bias(suppressed_tokens(model, self.prefix))
        self.begin_suppress = self._bias(gen.begin_suppress_tokens or [])
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.state: _State | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def _bias(self, tokens: list[int]) -> torch.Tensor:
        bias = torch.zeros(self.w["embed"].shape[0], device=self.device)
        bias[list(tokens)] = -math.inf
        return bias

    @torch.no_grad()
    def generate(self, encoded: torch.Tensor) -> torch.Tensor:
        """(B, source positions, d_model) encoder outputs -> (B, max_new_tokens) int64 ids: the
        generated tokens, end-of-text, then padding (what `generate` returns, without the prefix)."""
        n = encoded.shape[0]
        if self.state is None or n > self.state.batch or encoded.shape[1] != self.state.source:
            self.state = _State.allocate(self, n, encoded.shape[1])
            self.graph = None
        state = self.state
        state.load(self, encoded.to(self.dtype))
        self._prefill(state)
        if self.cuda_graph and self.graph is None:
            self.graph = self._capture(state)
        for i in range(self.length - 1 - self.n_prefix):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step(state)
            if (i + 1) % CHECK_EVERY == 0 and bool(state.finished[:n].all()):
                break
        return state.tokens[:n, self.n_prefix:].clone()

    def _capture(self, state: _State) -> torch.cuda.CUDAGraph | None:
        """Record one decoding step as a CUDA graph, or None (eager steps) where capture fails.
        The state is left as it was before."""
        saved = [t.clone() for t in (state.tokens, state.finished, state.pos, state.k, state.v)]
        graph = torch.cuda.CUDAGraph()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the graph: library handles, workspaces
                    self._step(state)
            torch.cuda.current_stream().wait_stream(side)
            # thread_local: data-loader threads may use CUDA while this thread captures
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._step(state)
        except RuntimeError as e:  # an op or driver that cannot be captured: decode step by step
            log.warning("CUDA graph capture failed (%s); decoding without it", str(e).splitlines()[0])
            graph = None
        for buf, old in zip((state.tokens, state.finished, state.pos, state.k, state.v), saved):
            buf.copy_(old)
        return graph

    def _prefill(self, s: _State) -> None:
        """Run the whole prefix in one pass, as `generate` does, and write the first new token."""
        positions = s.positions[:self.n_prefix]
        logits = self._forward(s, s.tokens[:, :self.n_prefix], positions)
        s.pos.fill_(self.n_prefix)
        self._emit(s, logits + self.begin_suppress)  # begin_suppress_tokens: first generated token only

    def _step(self, s: _State) -> None:
        """Feed the token at position `pos` to every clip, write the next one at `pos + 1`."""
        logits = self._forward(s, s.tokens.gather(1, s.pos.expand(s.batch, 1)), s.pos)
        s.pos.add_(1)
        self._emit(s, logits)

    def _forward(self, s: _State, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T) at positions `pos` (T,) -> float32 logits (B, vocab) of the last one;
        their keys and values go into the cache."""
        w, h = self.w, self.heads
        # unscaled whatever `scale_embedding` says: transformers' Whisper decoder never applies its embed_scale
        x = F.embedding(tok, w["embed"]) + w["positions"].index_select(0, pos)
        visible = (s.positions.view(1, -1) <= pos.view(-1, 1)).view(1, 1, len(pos), -1)  # causal, over the cache
        for i, layer in enumerate(w["layers"]):
            y = self._norm(x, layer["ln1"])
            q = _heads(F.linear(y, *layer["q"]) * self.scale, h)
            s.k[i].index_copy_(2, pos, _heads(F.linear(y, layer["k"][0]), h))
            s.v[i].index_copy_(2, pos, _heads(F.linear(y, *layer["v"]), h))
            a = F.scaled_dot_product_attention(q, s.k[i], s.v[i], attn_mask=visible, scale=1.0)
            x = x + F.linear(_merge(a), *layer["o"])
            y = self._norm(x, layer["ln2"])
            q = _heads(F.linear(y, *layer["xq"]) * self.scale, h)
            a = F.scaled_dot_product_attention(q, s.xk[i], s.xv[i], scale=1.0)
            x = x + F.linear(_merge(a), *layer["xo"])
            y = self._norm(x, layer["ln3"])
            x = x + F.linear(F.gelu(F.linear(y, *layer["fc1"])), *layer["fc2"])
        return F.linear(self._norm(x[:, -1:], w["ln"])[:, 0], w["out"]).float() + self.suppress

    def _emit(self, s: _State, logits: torch.Tensor) -> None:
        """Write the greedy token at `pos` (padding for clips that have finished)."""
        best = torch.where(s.finished, self.pad, logits.argmax(-1))
        s.tokens.scatter_(1, s.pos.expand(s.batch, 1), best.unsqueeze(1))
        s.finished |= best == self.eot

    def _norm(self, x: torch.Tensor, weights: tuple) -> torch.Tensor:
        """LayerNorm in the parameters' precision, output in the matmul precision."""
        return F.layer_norm(x, x.shape[-1:], *weights).to(self.dtype)


class _State:
    """Preallocated buffers of one decoding run; the CUDA graph reads and writes these in place."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    @classmethod
    def allocate(cls, dec: GreedyDecoder, batch: int, source: int) -> _State:
        layers = len(dec.w["layers"])
        d = dec.w["embed"].shape[1]
        hd = d // dec.heads
        kw = {"device": dec.device, "dtype": dec.dtype}
        return cls(
            batch=batch, source=source,
            tokens=torch.full((batch, dec.length), dec.pad, dtype=torch.long, device=dec.device),
            finished=torch.zeros(batch, dtype=torch.bool, device=dec.device),
            pos=torch.zeros(1, dtype=torch.long, device=dec.device),
            positions=torch.arange(dec.length, device=dec.device),
            prefix=torch.tensor(dec.prefix, dtype=torch.long, device=dec.device),
            k=torch.zeros(layers, batch, dec.heads, dec.length, hd, **kw),
            v=torch.zeros(layers, batch, dec.heads, dec.length, hd, **kw),
            xk=torch.zeros(layers, batch, dec.heads, source, hd, **kw),
            xv=torch.zeros(layers, batch, dec.heads, source, hd, **kw),
        )

    def load(self, dec: GreedyDecoder, encoded: torch.Tensor) -> None:
        """Start a new batch: cross-attention keys/values of `encoded`, the prefix, nothing finished."""
        n = encoded.shape[0]
        h = dec.heads
        for i, layer in enumerate(dec.w["layers"]):
            self.xk[i, :n] = _heads(F.linear(encoded, layer["xk"][0]), h)
            self.xv[i, :n] = _heads(F.linear(encoded, *layer["xv"]), h)
        self.xk[:, n:] = 0
        self.xv[:, n:] = 0
        self.tokens.fill_(dec.pad)
        self.tokens[:, :len(dec.prefix)] = self.prefix
        self.finished.zero_()
        self.pos.zero_()


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, d) -> (B, heads, T, d / heads)"""
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, hd) -> (B, T, heads * hd)"""
    b, h, t, hd = x.shape
    return x.transpose(1, 2).reshape(b, t, h * hd)


def _decoder_weights(model, dtype: torch.dtype) -> dict:
    """The decoder's parameters as plain (weight, bias) tensors: linear layers in `dtype`,
    layer norms and embeddings as they are."""
    def lin(m):
        return (m.weight.detach().to(dtype), None if m.bias is None else m.bias.detach().to(dtype))

    def norm(m):
        return (m.weight.detach(), m.bias.detach())

    dec = model.model.decoder
    layers = [{
        "ln1": norm(layer.self_attn_layer_norm), "q": lin(layer.self_attn.q_proj), "k": lin(layer.self_attn.k_proj),
        "v": lin(layer.self_attn.v_proj), "o": lin(layer.self_attn.out_proj),
        "ln2": norm(layer.encoder_attn_layer_norm), "xq": lin(layer.encoder_attn.q_proj),
        "xk": lin(layer.encoder_attn.k_proj), "xv": lin(layer.encoder_attn.v_proj),
        "xo": lin(layer.encoder_attn.out_proj),
        "ln3": norm(layer.final_layer_norm), "fc1": lin(layer.fc1), "fc2": lin(layer.fc2),
    } for layer in dec.layers]
    return {"embed": dec.embed_tokens.weight.detach(), "positions": dec.embed_positions.weight.detach(),
            "layers": layers, "ln": norm(dec.layer_norm), "out": model.proj_out.weight.detach().to(dtype)}
