"""bf16 on a copy of the weights (`whisper_ft.precision`): the same loss and gradients as the
model's own, float32 gradients on float32 weights, bf16 activations between the layers, far
fewer casts than autocast, compiled layers that do not recompile, and a whole training run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import ROOT
from whisper_ft.collator import SpeechCollator, expand
from whisper_ft.config import load_config
from whisper_ft.features import load_split
from whisper_ft.model import load_model
from whisper_ft.precision import forward, seq2seq_loss, shift_right
from whisper_ft.train import mixed_precision, weights_dtype

START, PAD = 50258, 50257


@pytest.fixture(scope="module")
def batch(features_dir):
    ds = load_split(features_dir, "train").with_format("numpy", columns=["input_features", "fill", "labels"])
    return expand(SpeechCollator(START)([ds[i] for i in range(4)]))


def model_of(tiny_model_dir):
    model = load_model(str(tiny_model_dir)).train()
    model.config.dropout = 0.0
    return model


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_shift_right_starts_with_the_decoder_start_and_reads_ignored_labels_as_padding():
    labels = torch.tensor([[7, 8, 9], [5, -100, -100]])
    assert shift_right(labels, START, PAD).tolist() == [[START, 7, 8], [START, 5, PAD]]


def test_float32_copy_gives_the_models_own_loss_and_gradients(tiny_model_dir, batch):
    model = model_of(tiny_model_dir)
    ref, ref_grads = loss_and_grads(model, lambda: model(**batch).loss)
    ours, grads = loss_and_grads(model, lambda: seq2seq_loss(model, batch, torch.float32, START, PAD)[0])
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_labels_padded_further_give_the_same_loss_and_gradients(tiny_model_dir, batch, dtype):
    """The collator pads labels to a multiple of 8 tokens: the positions after a label are
    ignored by the loss and, the decoder being causal, change nothing before them."""
    model = model_of(tiny_model_dir)
    labels = batch["labels"]
    longer = torch.cat([labels, torch.full((labels.shape[0], 5), -100)], 1)
    ref, ref_grads = loss_and_grads(model, lambda: seq2seq_loss(model, batch, dtype, START, PAD)[0])
    ours, grads = loss_and_grads(model, lambda: seq2seq_loss(model, {**batch, "labels": longer}, dtype, START, PAD)[0])
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5 if dtype == torch.float32 else 1e-2)
    name = "model.decoder.layers.0.fc1.weight"
    assert torch.nn.functional.cosine_similarity(grads[name].flatten(), ref_grads[name].flatten(), dim=0) > 0.999


def test_bf16_copy_trains_the_float32_weights_like_autocast(tiny_model_dir, batch):
    model = model_of(tiny_model_dir)

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**batch).loss

    ref, ref_grads = loss_and_grads(model, autocast)
    ours, grads = loss_and_grads(model, lambda: seq2seq_loss(model, batch, torch.bfloat16, START, PAD)[0])
    assert ours.dtype == torch.float32 and ours.item() == pytest.approx(ref.item(), rel=2e-2)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert grads.keys() == ref_grads.keys()  # every weight gets its gradient, in float32
    assert all(g.dtype == torch.float32 for g in grads.values())
    flat = lambda gs: torch.cat([g.flatten() for g in gs.values()])  # noqa: E731
    assert torch.nn.functional.cosine_similarity(flat(grads), flat(ref_grads), dim=0) > 0.99
    # The output projection is tied to the token embedding: one weight, both gradients.
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight


def test_bf16_copy_keeps_the_residual_stream_in_bf16_with_few_casts(tiny_model_dir, batch):
    from torch.profiler import ProfilerActivity, profile

    model = model_of(tiny_model_dir)
    seen = []
    model.model.encoder.layers[0].register_forward_hook(lambda m, i, out: seen.append(out[0].dtype))

    def activation_casts(fn) -> int:  # casts of (batch, ..., ...) tensors: no weight has 4 rows or 3 dimensions
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fn().backward()
        return sum(1 for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes[0][:1] == [4]
                   and len(e.input_shapes[0]) == 3)

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**batch).loss

    n_autocast = activation_casts(autocast)
    n_copy = activation_casts(lambda: seq2seq_loss(model, batch, torch.bfloat16, START, PAD)[0])
    assert seen == [torch.float32, torch.bfloat16]  # the layer's output: autocast, then the weight copy
    assert n_copy == 3  # the input features to bf16, the logits to float32 for the loss and their gradient back
    assert n_autocast >= 4 * 4  # several per layer (4 layers), forward and backward


def test_weights_are_cast_a_layer_at_a_time_with_the_same_gradients_as_one_cast_each(tiny_model_dir, batch,
                                                                                     monkeypatch):
    """One foreach cast per layer each way instead of one per tensor: the same bits as casting
    each weight on its own with `torch.func.functional_call`; frozen weights are cast without a
    gradient."""
    from torch.profiler import ProfilerActivity, profile

    import whisper_ft.precision
    from whisper_ft.precision import layer_groups

    model = model_of(tiny_model_dir)
    model.model.encoder.conv1.weight.requires_grad_(False)
    groups = layer_groups(model)
    assert len(groups) == model.config.encoder_layers + model.config.decoder_layers + 1  # and the rest
    assert sum(len(g) for g in groups) == sum(1 for p in model.parameters() if p.is_floating_point())

    def loss():
        return seq2seq_loss(model, batch, torch.bfloat16, START, PAD)[0]

    def forward_casts(fn):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss, grads = loss_and_grads(model, fn)
        return loss, grads, [e.name for e in prof.events()]

    ours, grads, names = forward_casts(loss)

    def one_cast_each(m, dtype, **inputs):  # a tied weight cast once, under each of its names
        copies = {id(p): p.to(dtype) for p in m.parameters()}
        weights = {n: copies[id(p)] for n, p in m.named_parameters(remove_duplicate=False)}
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items() if torch.is_tensor(v)}
        return torch.func.functional_call(m, weights, args=(), kwargs={**inputs, "use_cache": False},
                                          tie_weights=False)

    monkeypatch.setattr(whisper_ft.precision, "forward", one_cast_each)
    ref, ref_grads, ref_names = forward_casts(loss)
    assert "aten::_foreach_copy_" not in ref_names
    assert ours.item() == ref.item()
    assert grads.keys() == ref_grads.keys() and "model.encoder.conv1.weight" not in grads
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    # forward: one group cast per layer with trainable weights plus one of the frozen conv1;
    # backward: one per group
    assert names.count("aten::_foreach_copy_") == 2 * len(groups) + 1
    # each group's copies are views of one buffer, not one allocation per tensor
    assert names.count("aten::empty_like") < sum(len(g) for g in groups)  # one a tensor each way before


def test_the_model_is_not_searched_for_its_weights_at_every_step(tiny_model_dir, batch, monkeypatch):
    """Where each weight sits is found once per model: walking the module tree for every
    weight took a tenth of the host's time per step. Its weights are back in place after
    each pass, also after a failed one, and a weight replaced since is used."""
    model = model_of(tiny_model_dir)
    params = dict(model.named_parameters())
    seq2seq_loss(model, batch, torch.bfloat16, START, PAD)[0].backward()
    walks = []
    named_modules = torch.nn.Module.named_modules
    monkeypatch.setattr(torch.nn.Module, "named_modules",
                        lambda self, *a, **k: walks.append(1) or named_modules(self, *a, **k))
    seq2seq_loss(model, batch, torch.bfloat16, START, PAD)[0].backward()
    assert walks == []
    assert dict(model.named_parameters()).items() == params.items()  # the float32 parameters themselves

    with pytest.raises(RuntimeError):
        seq2seq_loss(model, {**batch, "input_features": batch["input_features"][:, :5]}, torch.bfloat16, START, PAD)
    assert all(p is params[n] for n, p in model.named_parameters())

    fc1 = model.model.encoder.layers[0].fc1
    fc1.weight = torch.nn.Parameter(torch.zeros_like(fc1.weight))
    old = params["model.encoder.layers.0.fc1.weight"]
    old.grad = None
    seq2seq_loss(model, batch, torch.bfloat16, START, PAD)[0].backward()
    assert fc1.weight.grad is not None and fc1.weight.grad.dtype == torch.float32 and old.grad is None



def test_trainer_steps_on_the_weight_copy_look_the_model_up_once(tmp_path, features_dir, tiny_model_dir, monkeypatch):
    """accelerate's `unwrap_model` walks the whole module tree; the training steps of a run
    on the weight copy read the model's token ids from the model found at the first."""
    import dataclasses

    from accelerate import Accelerator

    from test_training import overrides
    from whisper_ft.train import load_data, make_trainer, prepare_model, training_arguments
    from whisper_ft.trainer import WhisperTrainer

    cfg = load_config(ROOT / "config.yaml", overrides(features_dir, tiny_model_dir, tmp_path, max_steps=3,
                                                      eval_steps=100, save_steps=100, precision="bf16"))
    data = load_data(cfg)
    model = prepare_model(cfg, data.processor.tokenizer)
    args = training_arguments(cfg, tmp_path / "run", 30, eval_on_start=False, d_model=model.config.d_model)
    args = dataclasses.replace(args, eval_strategy="no", save_strategy="no", report_to=[])
    trainer = make_trainer(model, args, data, None, weights_dtype=torch.bfloat16)
    steps, lookups = [], []
    unwrap, compute_loss = Accelerator.unwrap_model, WhisperTrainer.compute_loss

    def counted_unwrap(self, *a, **k):
        lookups.append(len(steps))
        return unwrap(self, *a, **k)

    def counted_loss(self, *a, **k):
        steps.append(1)
        return compute_loss(self, *a, **k)

    monkeypatch.setattr(Accelerator, "unwrap_model", counted_unwrap)
    monkeypatch.setattr(WhisperTrainer, "compute_loss", counted_loss)
    trainer.train()
    assert len(steps) == 3 and trainer.state.global_step == 3
    assert [n for n in lookups if n > 0] == [1]  # inside the first step's loss only

def test_a_group_cast_gives_float32_gradients_to_the_used_tensors_only():
    from whisper_ft.precision import _Cast

    a, b = torch.randn(3, requires_grad=True), torch.randn(2, 2, requires_grad=True)
    ca, cb = _Cast.apply(torch.bfloat16, a, b)
    assert ca.dtype == cb.dtype == torch.bfloat16 and torch.equal(ca, a.detach().to(torch.bfloat16))
    (ca.float() * 2).sum().backward()
    assert a.grad.dtype == torch.float32 and torch.equal(a.grad, torch.full((3,), 2.0))
    assert b.grad is None


@pytest.fixture
def graphs_only(monkeypatch):
    """Layers compile with the "aot_eager" backend: TorchDynamo captures the same graphs (and
    recompiles for the same reasons) as with inductor, without the minutes of C++ code
    generation a CPU takes. Inductor's own output is checked in
    test_training.py::test_compiled_layers_train_like_eager_ones."""
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *args, **kwargs: compile_module(self, *args, **{**kwargs, "backend": "aot_eager"}))


def test_compiled_layers_run_on_the_copy_without_recompiling(tiny_model_dir, batch, tmp_path, graphs_only):
    """Same loss and gradients as eager; with a decoder deeper than torch.compile's recompile
    limit (8) and labels of changing lengths, a handful of graphs and no new one later (a KV
    cache in the forward pass would give each decoder layer its own graph, then eager mode)."""
    from torch._dynamo.utils import counters

    from whisper_ft.train import compile_layers

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("torch.compile on CPU needs a C compiler (apt-get install gcc)")
    torch._dynamo.reset()
    counters.clear()
    deep = deeper_decoder(tiny_model_dir, tmp_path / "model", layers=10)
    eager, compiled = model_of(deep), model_of(deep)
    compile_layers(compiled)
    ref, ref_grads = loss_and_grads(eager, lambda: seq2seq_loss(eager, batch, torch.bfloat16, START, PAD)[0])
    ours, grads = loss_and_grads(compiled, lambda: seq2seq_loss(compiled, batch, torch.bfloat16, START, PAD)[0])
    for cut in (-1, -2, -3):  # shorter labels
        shorter = {**batch, "labels": batch["labels"][:, :cut]}
        loss_and_grads(compiled, lambda: seq2seq_loss(compiled, shorter, torch.bfloat16, START, PAD)[0])
    graphs = counters["stats"]["unique_graphs"]
    loss_and_grads(compiled, lambda: seq2seq_loss(compiled, {**batch, "labels": batch["labels"][:, :-4]},
                                                  torch.bfloat16, START, PAD)[0])
    # the first encoder layer's contiguity hook, the encoder layers, the decoder layers for any
    # length (compiled so from the start: not first for one length, then again)
    assert counters["stats"]["unique_graphs"] == graphs <= 3
    assert ours.item() == pytest.approx(ref.item(), rel=2e-2)
    name = "model.encoder.layers.0.fc1.weight"
    assert torch.nn.functional.cosine_similarity(grads[name].flatten(), ref_grads[name].flatten(), dim=0) > 0.98


def test_encoder_alone_runs_on_the_copy(tiny_model_dir, batch):
    model = model_of(tiny_model_dir).eval()
    with torch.no_grad():
        ours = forward(model.model.encoder, torch.bfloat16, input_features=batch["input_features"]).last_hidden_state
        ref = model.model.encoder(batch["input_features"]).last_hidden_state
    assert ours.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(ours.float().flatten(), ref.flatten(), dim=0) > 0.99


def test_which_runs_use_the_copy(tmp_path):
    def cfg(**training):
        return load_config(ROOT / "config.yaml", [f"training.{k}={v}" for k, v in training.items()])

    assert weights_dtype(cfg(precision="bf16")) == torch.bfloat16
    assert mixed_precision(cfg(precision="bf16")) == "bf16 weight copy"
    assert weights_dtype(cfg(precision="bf16", autocast="true")) is None
    assert mixed_precision(cfg(precision="bf16", autocast="true")) == "bf16 autocast"
    assert weights_dtype(cfg(precision="bf16", gradient_checkpointing="true")) is None
    assert weights_dtype(cfg(precision="fp32")) is None and mixed_precision(cfg(precision="fp32")) == "fp32"


def test_a_bf16_run_keeps_float32_weights_and_says_how_it_computed(tmp_path, features_dir, tiny_model_dir):
    from safetensors.torch import load_file

    from test_training import events, overrides
    from whisper_ft.train import run_training

    cfg = load_config(ROOT / "config.yaml", overrides(features_dir, tiny_model_dir, tmp_path, precision="bf16",
                                                      eval_before_training="false"))
    summary = run_training(cfg)
    run_dir = tmp_path / "tiny"
    log = events(run_dir)
    assert [e["mixed_precision"] for e in log if e["event"] == "start"] == ["bf16 weight copy"]
    losses = [e["loss"] for e in log if e["event"] == "train"]
    assert len(losses) == 4 and losses[-1] < losses[0]  # learning_rate 1e-3 on a tiny model: the loss falls
    assert summary["wer"] is not None
    for path in (run_dir / "checkpoint-4" / "model.safetensors", run_dir / "best" / "model.safetensors"):
        assert {t.dtype for t in load_file(path).values()} == {torch.float32}
    assert json.loads((run_dir / "metrics.json").read_text())["mixed_precision"] == "bf16 weight copy"
    assert "| precision | bf16 weight copy |" in (run_dir / "README.md").read_text()


def test_a_bf16_lora_run_with_beam_search_evaluates_through_generate(tmp_path, features_dir, tiny_model_dir):
    """LoRA and beam search evaluate with `generate` (under autocast in the copy's dtype), and
    a LoRA model's checkpoints are saved synchronously by the Trainer."""
    from test_training import events, overrides
    from whisper_ft import checkpoints
    from whisper_ft.train import run_training

    cfg = load_config(ROOT / "config.yaml", overrides(
        features_dir, tiny_model_dir, tmp_path, precision="bf16", max_steps=2, eval_steps=2, save_steps=2,
        eval_before_training="false", num_beams=2, **{"lora.enabled": "true", "lora.rank": 4}))
    summary = run_training(cfg)
    run_dir = tmp_path / "tiny"
    assert [e["mixed_precision"] for e in events(run_dir) if e["event"] == "start"] == ["bf16 weight copy"]
    assert summary["wer"] is not None and summary["eval_clips"] > 0
    assert [s for s, _ in checkpoints.checkpoints(run_dir)] == [2]
    assert (run_dir / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert (run_dir / "best" / "model.safetensors").is_file()  # merged


@pytest.mark.parametrize("weight_copy", [True, False])
def test_compiled_layers_stay_compiled_over_label_lengths_and_evaluation(tmp_path, features_dir, tiny_model_dir,
                                                                         weight_copy, graphs_only):
    """A whole compiled run (training steps with labels of many lengths, then evaluations)
    stays within torch.compile's recompile limit, past which layers silently run eager."""
    from torch._dynamo.utils import counters

    from whisper_ft.train import run_training

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("torch.compile on CPU needs a C compiler (apt-get install gcc)")
    from test_training import overrides

    torch._dynamo.reset()
    counters.clear()
    deep = deeper_decoder(tiny_model_dir, tmp_path / "model", layers=10)  # more layers than the limit (8)
    cfg = load_config(ROOT / "config.yaml", overrides(
        features_dir, deep, tmp_path, precision="bf16", autocast=str(not weight_copy).lower(),
        torch_compile="true", max_steps=6, eval_steps=3, save_steps=3, eval_before_training="false",
        export_ctranslate2="false"))
    run_training(cfg)
    # Encoder layers (training, evaluation; the first layer's hook apart, which makes the
    # convolutions' channels-first output contiguous for `whisper_ft.layout`) and decoder layers
    # (training and evaluation, each for any label length): a handful of graphs, not one per
    # decoder layer.
    assert 2 <= counters["stats"]["unique_graphs"] <= 6


def deeper_decoder(model_dir, out, layers: int):
    """The tiny test model with a decoder of `layers` layers (random weights), saved to `out`."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig.from_pretrained(model_dir, decoder_layers=layers))
    model.save_pretrained(out)
    for f in model_dir.iterdir():
        if f.suffix in (".json", ".txt") and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


def test_a_training_step_never_waits_for_the_device(tiny_model_dir, batch):
    """Meta tensors have no data, so anything that reads a value on the host (`.item()`, a
    tensor's truth value: on a GPU, a synchronisation) raises. transformers' own decoder mask
    does that; with the causal mask given, forward and backward run through, on the weight
    copy and under autocast alike."""
    from whisper_ft.precision import with_causal_mask

    model = model_of(tiny_model_dir).to("meta")
    on_meta = {k: v.to("meta") for k, v in batch.items()}
    with pytest.raises(RuntimeError, match="meta tensors"):
        model(**on_meta, use_cache=False)
    seq2seq_loss(model, on_meta, torch.bfloat16, START, PAD)[0].backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**with_causal_mask(on_meta), use_cache=False).loss
    loss.backward()
    assert model.model.encoder.layers[0].fc1.weight.grad.device.type == "meta"
