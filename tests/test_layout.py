"""Whisper without its layout copies (`whisper_ft.layout`): the same loss and gradients as
transformers' own, fewer copies, and the stock attention wherever a KV cache is used."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from whisper_ft.layout import use_contiguous_layout
from whisper_ft.precision import seq2seq_loss

START, EOT = 50258, 50257


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators run while entered, by name."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def tiny(attention: str = "sdpa"):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=51865,
                           pad_token_id=EOT, decoder_start_token_id=START, attn_implementation=attention)
    return WhisperForConditionalGeneration(config)


def batch():
    torch.manual_seed(1)
    labels = torch.randint(0, 50000, (2, 12))
    labels[1, 9:] = -100
    return {"input_features": torch.randn(2, 80, 3000), "labels": labels}


def loss_and_grads(model, inputs, dtype=None):
    with OpCounter() as counter:
        if dtype is None:  # the model's own forward pass (autocast's path)
            loss = model(**inputs, use_cache=False).loss
        else:  # the weight copy's
            loss, _ = seq2seq_loss(model, inputs, dtype, START, EOT)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, counter.ops


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
def test_same_loss_and_gradients_as_transformers_whisper_with_fewer_copies(dtype):
    stock = tiny().train()
    ours = copy.deepcopy(stock)
    assert use_contiguous_layout(ours) == 7  # 2 encoder, 2 decoder self- and 2 cross-attention layers, the encoder
    inputs = batch()
    loss, grads, ops = loss_and_grads(stock, inputs, dtype)
    loss2, grads2, ops2 = loss_and_grads(ours, inputs, dtype)
    tol = {"atol": 0, "rtol": 0}  # the same kernels on the same numbers
    torch.testing.assert_close(loss2, loss, **tol)
    assert grads2.keys() == grads.keys() and len(grads) > 80
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], **tol, msg=name)
    # transformers copies q, k and v (and their gradients) into the heads-first layout
    assert ops2["aten.clone"] <= ops["aten.clone"] - 2 * 6


class StockCalls:
    """Counts the calls that reach transformers' own `WhisperAttention.forward`, by side."""

    def __enter__(self):
        from transformers.models.whisper.modeling_whisper import WhisperAttention

        self.encoder = self.decoder = 0
        self.stock = WhisperAttention.forward

        def counted(module, *args, **kwargs):
            if module.is_decoder:
                self.decoder += 1
            else:
                self.encoder += 1
            return self.stock(module, *args, **kwargs)

        WhisperAttention.forward = counted
        return self

    def __exit__(self, *exc):
        from transformers.models.whisper.modeling_whisper import WhisperAttention

        WhisperAttention.forward = self.stock


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_training_takes_the_copy_free_path_in_every_attention_layer(dtype):
    """No keyword of the model's own calls sends a layer back to the stock forward pass."""
    model = tiny().train()
    use_contiguous_layout(model)
    with StockCalls() as calls:
        loss_and_grads(model, batch(), dtype)
    assert calls.encoder == calls.decoder == 0


def test_compiled_layers_do_not_break_their_graph_over_label_lengths():
    """Without a decoder mask, the causal flag stays a Python bool when compiled layers see
    changing lengths (dynamic shapes): SDPA refuses a symbolic one, and the graph would break."""
    import shutil

    from torch._dynamo.utils import counters

    from whisper_ft.train import compile_layers

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("torch.compile on CPU needs a C compiler (apt-get install gcc)")
    torch._dynamo.reset()
    counters.clear()
    model = tiny().eval()
    use_contiguous_layout(model)
    compile_layers(model)
    encoded = torch.randn(2, 1500, 64)
    with torch.no_grad():
        for length in (5, 7, 9):
            model.model.decoder(input_ids=torch.randint(0, 50000, (2, length)), encoder_hidden_states=encoded,
                                use_cache=False)
    assert not counters["graph_break"]


def test_the_encoder_residual_stream_is_contiguous():
    """Stock, it stays in the convolutions' channels-first order, and each layer norm copies it
    (inside its kernel, so no operator count shows it)."""
    stock = tiny().train()
    ours = copy.deepcopy(stock)
    use_contiguous_layout(ours)
    x = batch()["input_features"]
    for model, contiguous in ((stock, False), (ours, True)):
        seen = []
        for layer in model.model.encoder.layers:  # registered after the model's own hook: sees what the layer sees
            layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
        model.model.encoder(x)
        assert seen == [contiguous] * 2


def test_other_attention_and_cached_generation_use_the_stock_path():
    eager = tiny("eager").eval()
    ours = copy.deepcopy(eager)
    use_contiguous_layout(ours)
    x = batch()["input_features"][:1]
    with torch.no_grad(), OpCounter() as counter:
        out = ours(input_features=x, decoder_input_ids=torch.tensor([[START, 50273]])).logits
    assert counter.ops["aten._softmax"] > 0  # eager attention, not SDPA

    sdpa = tiny().eval()
    use_contiguous_layout(sdpa)
    with torch.no_grad(), StockCalls() as calls:  # asked for attention weights, every layer goes the stock way
        sdpa(input_features=x, decoder_input_ids=torch.tensor([[START, 50273]]), output_attentions=True)
    assert calls.encoder == 2 and calls.decoder == 4
    torch.testing.assert_close(out, eager(input_features=x, decoder_input_ids=torch.tensor([[START, 50273]])).logits)

    stock = tiny().eval()
    ours = copy.deepcopy(stock)
    use_contiguous_layout(ours)
    assert ours.generation_config.output_hidden_states is False  # generate passes it to the encoder
    kwargs = {"decoder_input_ids": torch.tensor([[START]]), "max_new_tokens": 6, "do_sample": False}
    with torch.no_grad(), StockCalls() as calls:
        tokens = ours.generate(x, **kwargs)
    assert torch.equal(tokens, stock.generate(x, **kwargs))
    assert calls.decoder > 0 and calls.encoder == 0  # the cached decoder goes the stock way, the encoder not


def test_loaded_models_run_without_the_copies(tiny_model_dir):
    import pickle

    from whisper_ft.layout import ProjectionLayoutAttention
    from whisper_ft.model import load_model

    model = load_model(str(tiny_model_dir), attn_implementation="sdpa")
    attention = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    assert attention and all(type(m) is ProjectionLayoutAttention for m in attention)
    assert use_contiguous_layout(model) == 0  # once is enough
    assert type(pickle.loads(pickle.dumps(model)).model.encoder.layers[0].self_attn) is ProjectionLayoutAttention
