"""Slow: fine-tune a real Whisper checkpoint (WHISPER_TEST_MODEL) briefly on a few synthetic
Swedish clips and show the evaluation WER falling. The evaluation clips are the training
clips, so a few steps of overfitting must beat the zero-shot baseline."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, run_cli
from whisper_ft.config import load_config
from whisper_ft.train import run_training

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def overfit_features(tmp_path_factory, cv_release, real_model_dir):
    """Features of 4 training clips, the same 4 clips as the evaluation split."""
    work = tmp_path_factory.mktemp("overfit")
    proc = run_cli("feature_pipeline.py", "--config", str(ROOT / "config.yaml"),
                   "--set", f"model.name_or_path={real_model_dir}", "--set", f"features.data_dir={work}",
                   "--set", "features.name=overfit", "--set", f"features.sources.0.path={cv_release}",
                   "--set", "features.sources.0.train_splits=[train]", "--set", "features.sources.0.eval_splits=[train]",
                   "--set", "features.sources.0.limit=4", "--set", "features.on_overlap=keep", "--workers", "1", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


def test_real_model_wer_falls(tmp_path, overfit_features, real_model_dir):
    sets = {"max_steps": 4, "eval_steps": 2, "save_steps": 4, "logging_steps": 1, "batch_size": 4,
            "eval_batch_size": 4, "learning_rate": 1e-4, "warmup_steps": 0, "dataloader_workers": 0,
            "freeze_encoder": "true", "output_dir": str(tmp_path), "run_name": "real"}
    cfg = load_config(ROOT / "config.yaml", [f"model.name_or_path={real_model_dir}",
                                             f"features.data_dir={overfit_features}", "features.name=overfit",
                                             *(f"training.{k}={v}" for k, v in sets.items())])
    summary = run_training(cfg)
    evals = [json.loads(line) for line in (tmp_path / "real" / "metrics.jsonl").read_text().splitlines()]
    wers = {e["step"]: e["wer"] for e in evals if e["event"] == "eval" and e["purpose"] == "selection"}
    print("WER by step:", wers)
    assert set(wers) == {0, 2, 4}
    assert summary["wer"] < wers[0] and summary["best_wer"] < wers[0]
    assert summary["wer_normalized"] < summary["baseline"]["wer_normalized"]
