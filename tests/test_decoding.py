"""The fast greedy decoder gives what `generate` gives: on a tiny random Whisper and the
synthetic Swedish features, in the Trainer's evaluation, and on a real checkpoint (slow)."""

from __future__ import annotations

import pytest
import torch

from whisper_ft.collator import SpeechCollator, expand
from whisper_ft.decoding import GreedyDecoder, max_new_tokens
from whisper_ft.features import load_split

PREFIX = [50258, 50273, 50359, 50363]
EOT = 50257
TIMESTAMP_BEGIN = 50364


def _inputs(features_dir, n: int) -> torch.Tensor:
    ds = load_split(features_dir, "eval").with_format("numpy", columns=["input_features", "fill", "labels"])
    return expand(SpeechCollator(PREFIX[0])([ds[i] for i in range(n)]))["input_features"]


def _text_tokens(ids: torch.Tensor) -> list[list[int]]:
    return [[t for t in row if t != EOT] for row in ids.tolist()]


def _model(path):
    from whisper_ft.model import load_model

    return load_model(str(path)).eval()


@torch.no_grad()
@pytest.mark.parametrize("max_length", [6, 40])
def test_same_tokens_as_generate(tiny_model_dir, features_dir, max_length):
    model = _model(tiny_model_dir)
    x = _inputs(features_dir, 7)
    ref = model.generate(x, max_length=max_length)
    decoder = GreedyDecoder(model, PREFIX, max_new_tokens(max_length, len(PREFIX)))
    ours = decoder.generate(model.model.encoder(x).last_hidden_state)
    assert ours.shape == ref.shape == (7, max_length)
    assert ours.tolist() == ref.tolist()


@torch.no_grad()
def test_scale_embedding_is_ignored_as_the_model_ignores_it(tiny_model_dir, features_dir):
    """transformers' Whisper decoder reads `scale_embedding` into an `embed_scale` it never
    applies; the decoder follows the model, not the flag."""
    model = _model(tiny_model_dir)
    model.config.scale_embedding = True
    x = _inputs(features_dir, 4)
    ours = GreedyDecoder(model, PREFIX, 12).generate(model.model.encoder(x).last_hidden_state)
    assert ours.tolist() == model.generate(x, max_new_tokens=12).tolist()


@torch.no_grad()
def test_smaller_batches_reuse_the_buffers_and_a_larger_one_gets_new_ones(tiny_model_dir, features_dir):
    model = _model(tiny_model_dir)
    encoded = model.model.encoder(_inputs(features_dir, 6)).last_hidden_state
    decoder = GreedyDecoder(model, PREFIX, 12)
    whole = decoder.generate(encoded[:4])
    state = decoder.state
    assert decoder.generate(encoded[:3]).tolist() == whole[:3].tolist() and decoder.state is state
    six = decoder.generate(encoded)
    assert decoder.state is not state and decoder.state.batch == 6 and six[:4].tolist() == whole.tolist()


@torch.no_grad()
def test_begin_suppression_follows_generate(tiny_model_dir, features_dir):
    model = _model(tiny_model_dir)
    x = _inputs(features_dir, 4)
    encoded = model.model.encoder(x).last_hidden_state
    first = GreedyDecoder(model, PREFIX, 8).generate(encoded)[0, 0].item()
    gen = model.generation_config
    gen.begin_suppress_tokens = [first]  # forbid the first choice at the start only
    # Random weights then pick timestamps, after which generate seeks on into the window.
    gen.suppress_tokens = [*gen.suppress_tokens, *range(TIMESTAMP_BEGIN, model.config.vocab_size)]
    ours = GreedyDecoder(model, PREFIX, 8).generate(encoded)
    assert _text_tokens(ours) == _text_tokens(model.generate(x, max_new_tokens=8))
    assert first not in ours[:, 0].tolist()


@torch.no_grad()
def test_end_of_text_follows_generate_and_pads(tiny_model_dir, features_dir):
    model = _model(tiny_model_dir)
    x = _inputs(features_dir, 4)
    encoded = model.model.encoder(x).last_hidden_state
    free = GreedyDecoder(model, PREFIX, 10).generate(encoded)
    later = free[0, -1].item()  # a token the clips choose only after some others
    model.proj_out.weight[EOT] = 2 * model.proj_out.weight[later]  # end-of-text now wins where it would
    ours = GreedyDecoder(model, PREFIX, 10).generate(encoded)
    assert _text_tokens(ours) == _text_tokens(model.generate(x, max_new_tokens=10))
    rows = ours.tolist()
    assert any(0 < row.index(EOT) < len(row) - 1 for row in rows if EOT in row)  # text, then end-of-text ...
    for row in rows:  # ... and padding with end-of-text from there on
        if EOT in row:
            assert set(row[row.index(EOT):]) == {EOT}


@torch.no_grad()
@pytest.mark.parametrize("timestamp", [TIMESTAMP_BEGIN, TIMESTAMP_BEGIN + 192])  # <|0.00|>, <|3.84|>
def test_timestamps_are_suppressed_after_notimestamps_as_generate_is_asked_to(tiny_model_dir, features_dir, timestamp):
    """A model whose best token is a timestamp: generate, left alone, would drop the text after
    two in a row and decode again from there (forever, for <|0.00|>). Both suppress them."""
    from whisper_ft.decoding import suppressed_tokens

    model = _model(tiny_model_dir)
    x = _inputs(features_dir, 3)
    encoded = model.model.encoder(x).last_hidden_state
    first = GreedyDecoder(model, PREFIX, 10).generate(encoded)[0, 0].item()
    model.proj_out.weight[timestamp] = 1.05 * model.proj_out.weight[first]  # the timestamp now wins there
    assert suppressed_tokens(model, PREFIX)[-1] == model.config.vocab_size - 1
    assert suppressed_tokens(model, PREFIX[:-1]) == list(model.generation_config.suppress_tokens)  # timestamps wanted
    ours = GreedyDecoder(model, PREFIX, 10).generate(encoded)
    assert ours.max() < TIMESTAMP_BEGIN and ours[0, 0].item() != timestamp
    ref = model.generate(x, max_new_tokens=10, suppress_tokens=suppressed_tokens(model, PREFIX))
    assert ours.tolist() == ref.tolist()


def test_max_new_tokens_counts_like_generate(tiny_model_dir):
    assert max_new_tokens(40, 4) == 40
    assert max_new_tokens(448, 4) == 444  # the prefix and the new tokens share the 448 positions
    with pytest.raises(ValueError, match="exceed"):
        GreedyDecoder(_model(tiny_model_dir), PREFIX, 445)


@pytest.mark.parametrize("timestamps", [False, True])
def test_trainer_evaluation_matches_generate(tmp_path, tiny_model_dir, features_dir, timestamps):
    """The Trainer's predictions and loss with the fast decoder equal those of `generate`, also
    for a model that prefers timestamp tokens (which both suppress)."""
    from whisper_ft.config import load_config
    from whisper_ft.train import load_data, make_trainer, prepare_model, training_arguments

    from conftest import ROOT
    from test_training import overrides

    cfg = load_config(ROOT / "config.yaml", overrides(features_dir, tiny_model_dir, tmp_path))
    data = load_data(cfg)
    model = prepare_model(cfg, data.processor.tokenizer)
    args = training_arguments(cfg, tmp_path / "run", 30, eval_on_start=False, d_model=model.config.d_model)
    if timestamps:  # a model that picks a timestamp where it picked its commonest token, as diverged weights may
        picked = make_trainer(model, args, data, data.test_model, fast_generation=True).predict(data.test_model)
        common = torch.as_tensor(picked.predictions).flatten().bincount().argmax().item()
        with torch.no_grad():
            model.proj_out.weight[TIMESTAMP_BEGIN + 192] = 1.05 * model.proj_out.weight[common]  # <|3.84|>
    out = {}
    for fast in (True, False):
        trainer = make_trainer(model, args, data, data.test_model, fast_generation=fast)
        out[fast] = trainer.predict(data.test_model)
    assert _text_tokens(torch.as_tensor(out[True].predictions)) == _text_tokens(
        torch.as_tensor(out[False].predictions[:, :out[True].predictions.shape[1]]))
    assert out[True].metrics["test_wer"] == out[False].metrics["test_wer"]
    assert out[True].metrics["test_loss"] == pytest.approx(out[False].metrics["test_loss"], rel=1e-5)


@pytest.mark.slow
@torch.no_grad()
def test_real_checkpoint_transcribes_identically(real_model_dir, features_dir):
    model = _model(real_model_dir)
    x = _inputs(features_dir, 10)
    ref = model.generate(x, language="sv", task="transcribe", max_length=60)
    ours = GreedyDecoder(model, PREFIX, 60).generate(model.model.encoder(x).last_hidden_state)
    assert _text_tokens(ours) == _text_tokens(ref)


def test_evaluation_loss_counts_each_label_token_once(tmp_path, tiny_model_dir, features_dir):
    """The evaluation loss is the mean over every label token of the split, whatever the batch
    size and the decoding path (the Trainer's own is a mean of batch means, so its last,
    smaller batch weighs as much as a full one)."""
    import torch.nn.functional as F

    from whisper_ft.collator import IGNORE_INDEX, SpeechCollator, expand
    from whisper_ft.config import load_config
    from whisper_ft.train import load_data, make_trainer, prepare_model, training_arguments

    from conftest import ROOT
    from test_training import overrides

    cfg = load_config(ROOT / "config.yaml", overrides(features_dir, tiny_model_dir, tmp_path))
    data = load_data(cfg)
    model = prepare_model(cfg, data.processor.tokenizer)
    clips = expand(SpeechCollator(model.config.decoder_start_token_id)(list(data.test_model)))
    with torch.no_grad():
        logits = model(input_features=clips["input_features"], labels=clips["labels"]).logits
    labels = clips["labels"]
    expected = (F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum")
                / (labels != IGNORE_INDEX).sum()).item()
    assert len(data.test_model) % 3 and len(data.test_model) % 4  # uneven last batches
    for batch, fast in ((3, True), (4, True), (3, False)):
        args = training_arguments(cfg, tmp_path / "run", 30, eval_on_start=False, d_model=model.config.d_model)
        args.per_device_eval_batch_size = batch
        loss = make_trainer(model, args, data, data.test_model, fast_generation=fast).predict(data.test_model)
        assert loss.metrics["test_loss"] == pytest.approx(expected, rel=1e-5), (batch, fast)
