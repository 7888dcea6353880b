"""Gradient clipping in the training step: the same norm and the same clipped gradients as
torch's `clip_grad_norm_`, without its per-tensor host work, and the Trainer's steps unchanged
by it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import ROOT
from test_training import overrides
from whisper_ft.trainer import WhisperTrainer, clip_gradients


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_gradients_is_torchs_clip_grad_norm(max_norm):
    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(shape, generator=gen) for shape in [(7, 3), (5,), (2, 2, 2)]]
    ref = [g.clone() for g in ours]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in ref]
    for p, g in zip(params, ref):
        p.grad = g
    expected = torch.nn.utils.clip_grad_norm_(params, max_norm)
    assert clip_gradients(ours, max_norm).item() == pytest.approx(expected.item(), rel=1e-6)
    for g, r in zip(ours, ref):
        torch.testing.assert_close(g, r)
    assert (expected > max_norm) == (max_norm == 0.5)  # the first case clips, the second does not


def test_trainer_steps_are_the_same_with_torchs_clipping(tmp_path, features_dir, tiny_model_dir, monkeypatch):
    """Three steps with a clipping norm small enough to clip every step: the same logged
    gradient norms and the same weights as with the Trainer's own clipping."""
    from transformers import Seq2SeqTrainer

    from whisper_ft.config import load_config
    from whisper_ft.train import load_data, make_trainer, prepare_model, training_arguments

    cfg = load_config(ROOT / "config.yaml", overrides(features_dir, tiny_model_dir, tmp_path, max_steps=3,
                                                      eval_steps=100, save_steps=100))
    data = load_data(cfg)

    def train(run: str) -> tuple[list[float], dict]:
        model = prepare_model(cfg, data.processor.tokenizer)
        args = training_arguments(cfg, tmp_path / run, 30, eval_on_start=False, d_model=model.config.d_model)
        args = dataclasses.replace(args, eval_strategy="no", save_strategy="no", report_to=[], max_grad_norm=1e-3)
        trainer = make_trainer(model, args, data, None)
        trainer.train()
        norms = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
        return norms, {n: p.detach().clone() for n, p in model.named_parameters()}

    calls = []
    monkeypatch.setattr("whisper_ft.trainer.clip_gradients", lambda *a: calls.append(1) or clip_gradients(*a))
    norms, weights = train("ours")
    assert len(calls) == len(norms) == 3 and all(n > 1e-3 for n in norms)
    monkeypatch.setattr(WhisperTrainer, "_clip_grad_norm", Seq2SeqTrainer._clip_grad_norm)
    ref_norms, ref_weights = train("torch")
    assert len(calls) == 3
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    for name, w in ref_weights.items():
        torch.testing.assert_close(weights[name], w, rtol=1e-5, atol=1e-7)
