"""Training pipeline on a tiny random Whisper and the synthetic Swedish features: evaluation
rounds, checkpoints, the best export, resumption after a kill, multi-process DDP, errors."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import shutil
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli
from whisper_ft import checkpoints
from whisper_ft.cli import run as cli_run
from whisper_ft.config import load_config
from whisper_ft.errors import TrainingError
from whisper_ft.train import auto_learning_rate, generation_max_length, resolve_precision, samples_seen, schedule

PREFIX = [50258, 50273, 50359, 50363]  # <|startoftranscript|><|sv|><|transcribe|><|notimestamps|>


def overrides(features_dir: Path, model_dir: Path, out: Path, **training) -> list[str]:
    """--set values for a tiny, fast run on the fixture features."""
    base = {"max_steps": 4, "eval_steps": 2, "save_steps": 2, "logging_steps": 1, "batch_size": 4,
            "eval_batch_size": 10, "learning_rate": 1e-3, "warmup_steps": 0, "dataloader_workers": 0,
            "score_served": "false", "output_dir": str(out), "run_name": "tiny"}
    base.update(training)
    return [f"model.name_or_path={model_dir}", f"features.data_dir={features_dir.parent.parent}",
            f"features.name={features_dir.name}", *(f"training.{k}={v}" for k, v in base.items())]


def cli_args(sets: list[str]) -> list[str]:
    return ["--config", str(ROOT / "config.yaml"), *(a for s in sets for a in ("--set", s))]


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- a whole run in-process


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, features_dir, tiny_model_dir):
    from transformers import TrainerCallback

    from whisper_ft.train import run_training

    class Seen(TrainerCallback):
        steps: list[int] = []

        def on_evaluate(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    out = tmp_path_factory.mktemp("runs")
    # the app's decoding of the served model, once a window: the random model loops at every temperature
    sets = [*overrides(features_dir, tiny_model_dir, out, average_checkpoints=2, score_served="true"),
            "app.temperature_fallback=false"]
    cfg = load_config(ROOT / "config.yaml", sets)
    seen = Seen()
    summary = run_training(cfg, callbacks=[seen])
    return out / "tiny", summary, seen.steps


def test_run_evaluates_before_and_during_training(tiny_run):
    from whisper_ft.metrics import scores

    run_dir, summary, seen = tiny_run
    assert seen == [0, 2, 4]  # extra callbacks see every periodic check
    evals = [e for e in events(run_dir) if e["event"] == "eval"]
    # the test split before training, validation checks during it, the test split on best/ at the end
    assert [(e["split"], e["purpose"], e["step"], e.get("final", False)) for e in evals] == [
        ("test", "report", 0, False), ("validation", "selection", 0, False), ("validation", "selection", 2, False),
        ("validation", "selection", 4, False), ("test", "report", summary["best_step"], True)]
    for e in evals:
        assert e["eval_clips"] == (10 if e["split"] == "test" else 3)
        assert 0 <= e["cer"] and 0 <= e["wer"] and 0 <= e["wer_normalized"]
        assert e["loss"] is not None and math.isfinite(e["loss"]) and e["loss"] > 0  # the checks' loss curve
    # the final test event scores best/'s transcripts as predictions.jsonl keeps them, each metric its own
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    recomputed = scores([r["reference"] for r in rows], [r["prediction"] for r in rows])
    assert {k: evals[-1][k] for k in ("wer", "wer_normalized", "cer")} == pytest.approx(
        {k: recomputed[k] for k in ("wer", "wer_normalized", "cer")})
    train = [e for e in events(run_dir) if e["event"] == "train"]
    assert [e["step"] for e in train] == [1, 2, 3, 4] and all(e["loss"] > 0 for e in train)
    assert train[-1]["loss"] < train[0]["loss"]
    # the rate each step trained at, as the run's scheduler set it (the plot reads it from here)
    assert [e["learning_rate"] for e in train] == pytest.approx(scheduled_rates(run_dir, summary, len(train)))
    assert all(e["learning_rate"] > 0 for e in train)


def scheduled_rates(run_dir: Path, summary: dict, steps: int) -> list[float]:
    """The learning rate of each of the first `steps` optimizer steps of the run's schedule (its
    config.yaml's lr_scheduler, the summary's peak rate and warm-up), from transformers' own scheduler."""
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=summary["learning_rate"])
    scheduler = get_scheduler(load_config(run_dir / "config.yaml").training.lr_scheduler, optimizer,
                              num_warmup_steps=summary["warmup_steps"], num_training_steps=summary["schedule_steps"])
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("steps, clips, batch, accumulation, processes, seen", [
    (4, 27, 4, 1, 1, 16),  # within the first epoch
    (3, 27, 64, 2, 1, 81),  # each step one short epoch of all 27
    (5, 27, 5, 2, 1, 47),  # 3 steps an epoch, the last of 7 clips
    (3, 27, 2, 1, 2, 12),  # two processes, 7 batches each (the last filled up)
    (10, 27, 2, 1, 2, 40),  # an epoch (2 x 7 x 2) and 3 steps
    (2, 10, 4, 1, 2, 16),  # 3 batches over 2 processes: 2 each, all full
    (1, 27, 64, 1, 2, 128),  # one batch each, filled up with repeats
])
def test_samples_seen_counts_the_short_last_batch_of_each_epoch(steps, clips, batch, accumulation, processes, seen):
    assert samples_seen(steps, clips, batch, accumulation, processes) == seen


@pytest.mark.parametrize("clips, batch, processes", [(10, 4, 1), (10, 4, 2), (27, 5, 3), (27, 64, 2)])
def test_samples_seen_is_what_accelerate_deals_the_processes_in_an_epoch(clips, batch, processes):
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader, RandomSampler

    dealt = [[len(b) for b in prepare_data_loader(DataLoader(list(range(clips)), batch_size=batch,
                                                             sampler=RandomSampler(range(clips))),
                                                  num_processes=processes, process_index=rank, put_on_device=False)]
             for rank in range(processes)]
    assert samples_seen(len(dealt[0]), clips, batch, 1, processes) == sum(map(sum, dealt))


def test_run_writes_checkpoints_reports_and_summary(tiny_run, features_dir):
    from whisper_ft.features import EVAL, load_split

    run_dir, summary, _ = tiny_run
    assert [s for s, _ in checkpoints.checkpoints(run_dir)] == [2, 4]
    for name in ("metrics.json", "config.yaml", "README.md", "training_curves.png", "predictions.jsonl"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "runs").glob("*/events.out.tfevents.*"))
    assert summary["steps"] == summary["schedule_steps"] == 4 and summary["samples_seen"] == 16
    assert summary["best_step"] in (2, 4) and summary["best_wer"] is not None
    assert summary["eval_clips"] == 10 and summary["baseline"]["step"] == 0
    assert summary["baseline"]["split"] == "test" and summary["baseline"]["eval_clips"] == 10
    assert summary["selection_split"] == "validation" and summary["selection_baseline"]["eval_clips"] == 3
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert best["split"] == "validation" and best["wer"] == summary["best_wer"]
    # best.json's scores are those its check (or the average it chose) logged in metrics.jsonl
    [logged] = [e for e in events(run_dir) if e["step"] == best["step"] and e.get("split") == "validation" and
                e["event"] == ("average" if best.get("averaged_steps") else "eval")]
    keys = ("wer", "wer_normalized", "cer", "eval_clips")
    assert {k: best[k] for k in keys} == {k: logged[k] for k in keys}
    assert json.loads((run_dir / "metrics.json").read_text())["best_step"] == summary["best_step"]
    card = (run_dir / "README.md").read_text()
    assert "zero-shot (step 0)" in card and "learning_rate | 0.001" in card
    assert "Test split, 10 clips" in card and "chosen on the validation split" in card
    # the model the app serves is scored too: its int8 export through the app's transcriber
    served = summary["served"]
    assert served["backend"] == "ctranslate2" and served["clips"] == 10 and served["temperature_fallback"] is False
    assert served["short_form"]["clips"] == 10 and served["transformers_same_clips"]["clips"] == 10
    assert served["long_form"]["pieces"] == 1 and 20 < served["long_form"]["seconds"] < 180
    assert served["long_form"]["clips"] == 10  # the clips joined into the piece
    assert json.loads((run_dir / "metrics.json").read_text())["served"] == served
    assert "## The served model" in card and "long form (1 piece, " in card and "no temperature fallback" in card
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and set(rows[0]) == {"id", "source", "speaker", "gender", "accents", "age", "reference",
                                                "prediction"}
    assert all(r["reference"] for r in rows)
    test = load_split(features_dir, EVAL)  # each clip's reference is its sentence as the store keeps it
    assert {(r["source"], r["id"]): r["reference"] for r in rows} == dict(
        zip(zip(test["source"], test["id"]), test["sentence"]))
    groups = json.loads((run_dir / "wer_breakdown.json").read_text())
    assert sum(g["clips"] for g in groups["speaker"]) == 10 and groups["source"][0]["source"] == "sample"
    for key in ("gender", "age", "accents"):  # the synthetic release records them, like Common Voice
        assert sum(g["clips"] for g in groups[key]) == 10
        assert {g[key] for g in groups[key]} <= {r[key] or "unknown" for r in rows}
    assert {g["gender"] for g in groups["gender"]} <= {"male_masculine", "female_feminine"}
    assert "## Who it fails" in card and "### By speaker" in card and "### By age" in card
    # the app's fast CPU path is exported beside the best model, newer than its weights
    from whisper_ft.ct2 import find_export

    assert find_export(run_dir / "best") == run_dir / "best" / "ct2"


def test_run_averages_the_last_checks_and_keeps_the_winner(tiny_run):
    run_dir, summary, _ = tiny_run
    avg = summary["averaging"]
    assert (avg["mode"], avg["n"], avg["steps"]) == ("last", 2, [2, 4])
    assert sorted(p.name for p in (run_dir / "averaging").iterdir()) == ["candidates.json", "step-2.safetensors",
                                                                        "step-4.safetensors"]
    [event] = [e for e in events(run_dir) if e["event"] == "average"]
    assert event["split"] == "validation" and event["averaged_steps"] == [2, 4] and event["eval_clips"] == 3
    checks = {e["step"]: e["wer"] for e in events(run_dir) if e["event"] == "eval" and e["purpose"] == "selection"}
    assert avg["single_wer"] == min(checks[2], checks[4]) and avg["wer"] == event["wer"]
    assert avg["chosen"] == (avg["wer"] < avg["single_wer"])
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert best.get("averaged_steps") == ([2, 4] if avg["chosen"] else None)
    assert best["wer"] == min(avg["wer"], avg["single_wer"]) == summary["best_wer"]
    assert "Checkpoint averaging" in (run_dir / "README.md").read_text()


def test_the_encoders_position_table_stays_fixed(tiny_run, tiny_model_dir):
    """Whisper's sinusoidal encoder positions are not trained (transformers 5 loads them trainable)."""
    from safetensors.torch import load_file

    run_dir, *_ = tiny_run
    key = "model.encoder.embed_positions.weight"
    trained, base = load_file(run_dir / "best" / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert (trained[key] == base[key]).all()
    assert not (trained["model.decoder.embed_positions.weight"] == base["model.decoder.embed_positions.weight"]).all()


def test_best_export_loads_alone_and_generates_swedish_prefix(tiny_run, features_dir):
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from whisper_ft.collator import SpeechCollator, expand
    from whisper_ft.features import load_split

    best = tiny_run[0] / "best"
    assert not list(best.parent.glob(".best.*"))  # no temporary folders left behind
    model = WhisperForConditionalGeneration.from_pretrained(best).eval()
    processor = WhisperProcessor.from_pretrained(best)
    assert model.generation_config.language == "sv" and model.generation_config.task == "transcribe"
    assert model.generation_config.forced_decoder_ids is None and getattr(model.config, "forced_decoder_ids", None) is None
    assert json.loads((best / "best.json").read_text())["step"] == tiny_run[1]["best_step"]
    row = load_split(features_dir, "eval").with_format("numpy", columns=["input_features", "fill", "labels"])[0]
    x = expand(SpeechCollator(50258)([row]))["input_features"]
    prompts = []

    def capture(batch_id, input_ids):  # sees the decoder prompt before the first generated token
        prompts.append(input_ids.tolist())
        return list(range(model.config.vocab_size))

    with torch.no_grad():
        model.generate(x, max_new_tokens=3, prefix_allowed_tokens_fn=capture)
    assert prompts[0] == PREFIX
    assert processor.tokenizer.convert_tokens_to_ids("<|sv|>") == PREFIX[1]


def file_modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()}


def umask_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def test_best_export_is_readable_like_any_new_file(tmp_path, tiny_model_dir):
    """safetensors writes its weights 0600: best/, which the app serves and a push uploads,
    would be unreadable to anyone else beside its 0644 config."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir)
    best = checkpoints.export_best(model, WhisperProcessor.from_pretrained(tiny_model_dir), tmp_path, {"step": 1})
    modes = file_modes(best)
    assert "model.safetensors" in modes and set(modes.values()) == {umask_mode()}, modes


# --------------------------------------------------------------------------- resumption after a kill


def test_killed_run_resumes_at_its_last_checkpoint(tmp_path, features_dir, tiny_model_dir):
    sets = overrides(features_dir, tiny_model_dir, tmp_path, max_steps=30, save_steps=3, eval_steps=30,
                     eval_before_training="false", eval_batch_size=10)
    cmd = [sys.executable, str(ROOT / "training_pipeline.py"), *cli_args(sets)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "tiny"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while checkpoints.latest_checkpoint(run_dir) is None and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    killed_at = checkpoints.checkpoints(run_dir)[-1][0]
    assert 3 <= killed_at < 30

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = checkpoints.checkpoints(run_dir)[-1][0]
    log = [e for e in events(run_dir)]
    starts = [i for i, e in enumerate(log) if e["event"] == "start"]
    assert len(starts) == 2
    second = log[starts[1]]
    assert second["step"] >= killed_at and second["resumed_from"] == f"checkpoint-{second['step']}"
    after = [e["step"] for e in log[starts[1]:] if e["event"] == "train"]
    assert after[0] == second["step"] + 1 and after[-1] == 30  # continues, does not start over
    assert resumed == 30
    assert json.loads((run_dir / "checkpoint-30" / "trainer_state.json").read_text())["global_step"] == 30
    assert f"resuming from {run_dir / ('checkpoint-' + str(second['step']))} at step {second['step']}" in again.stderr

    fresh = subprocess.run([*cmd, "--fresh", "--set", "training.max_steps=2", "--set", "training.save_steps=2"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert [s for s, _ in checkpoints.checkpoints(run_dir)] == [2]
    assert [e["event"] for e in events(run_dir)].count("start") == 1


def _wait_for_training(proc, run_dir: Path, steps: int = 3, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if (run_dir / "metrics.jsonl").is_file() and sum(e["event"] == "train" for e in events(run_dir)) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"no training steps logged (exit {proc.poll()})")


def test_a_run_that_fails_in_training_gives_back_the_signal_handlers(tmp_path, features_dir, tiny_model_dir):
    """A sweep goes on to its next trial (a notebook to its next cell) after a failed run: Ctrl-C
    and SIGTERM must then act as they did before it, not as a request to that run to save."""
    from transformers import TrainerCallback

    from whisper_ft.train import run_training

    class OutOfMemoryAtStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise RuntimeError("CUDA out of memory")

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    cfg = load_config(ROOT / "config.yaml", overrides(features_dir, tiny_model_dir, tmp_path,
                                                      eval_before_training="false", export_ctranslate2="false"))
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        run_training(cfg, callbacks=[OutOfMemoryAtStep2()])
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_signal_at_a_check_step_saves_before_the_check(tmp_path, features_dir, tiny_model_dir):
    """A SIGTERM during a step that ends in a check: the checkpoint is written before the check
    (a whole validation pass, which may outlast the grace period), then the check runs."""
    from transformers import TrainerCallback

    from whisper_ft.errors import Stopped
    from whisper_ft.train import run_training

    class TermDuringStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                signal.raise_signal(signal.SIGTERM)

    cfg = load_config(ROOT / "config.yaml", overrides(features_dir, tiny_model_dir, tmp_path, max_steps=6,
                                                      eval_steps=2, save_steps=3, eval_before_training="false",
                                                      export_ctranslate2="false"))
    with pytest.raises(Stopped, match="stopped by SIGTERM after step 2"):
        run_training(cfg, callbacks=[TermDuringStep2()])
    run_dir = tmp_path / "tiny"
    assert [(e["event"], e["step"]) for e in events(run_dir) if e["event"] in ("checkpoint", "eval")] == [
        ("checkpoint", 2), ("eval", 2)]
    assert [s for s, _ in checkpoints.checkpoints(run_dir)] == [2] and checkpoints.read_best(run_dir)["step"] == 2


@pytest.mark.parametrize("killed_in_export", [True, False], ids=["killed-writing-best", "stopped-cleanly"])
def test_a_better_check_after_a_signal_at_its_step_stays_best_on_resume(tmp_path, features_dir, tiny_model_dir,
                                                                       monkeypatch, killed_in_export):
    """SIGTERM during the step of a best check: its checkpoint is saved before the check, with the
    Trainer's state of before it. Killed while it writes that check's best/, the rerun exports
    it from there; either way rotation keeps its checkpoint, not the older best's."""
    from transformers import TrainerCallback

    from whisper_ft import train
    from whisper_ft import trainer as whisper_trainer
    from whisper_ft.errors import Stopped

    scores = iter([0.9, 0.5, 0.95, 0.96, 0.97, 0.98, 0.99])  # checks at 2, 4 (best), 6, 8, 10; test
    monkeypatch.setattr(train, "compute_metrics", lambda tokenizer, pred: {
        "wer": (w := next(scores)), "wer_normalized": w / 2, "cer": w / 4, "clips": len(pred.label_ids)})

    class TermDuringStep4(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:
                signal.raise_signal(signal.SIGTERM)

    real_export = checkpoints.export_best

    def killed_writing(model, processor, run_dir, info):
        if info["step"] == 4:
            raise KeyboardInterrupt  # a second Ctrl-C, or the end of the grace period
        return real_export(model, processor, run_dir, info)

    sets = overrides(features_dir, tiny_model_dir, tmp_path, max_steps=10, eval_steps=2, save_steps=2,
                     save_total_limit=2, eval_before_training="false", export_ctranslate2="false")
    run_dir = tmp_path / "tiny"
    with monkeypatch.context() as m:
        if killed_in_export:
            m.setattr(whisper_trainer.checkpoints, "export_best", killed_writing)
        with pytest.raises(KeyboardInterrupt if killed_in_export else Stopped):
            train.run_training(load_config(ROOT / "config.yaml", sets), callbacks=[TermDuringStep4()])
    assert checkpoints.read_best(run_dir)["step"] == (2 if killed_in_export else 4)
    summary = train.run_training(load_config(ROOT / "config.yaml", sets))
    assert (summary["best_step"], summary["best_wer"]) == (4, 0.5)
    assert checkpoints.read_best(run_dir)["step"] == 4
    assert [s for s, _ in checkpoints.checkpoints(run_dir)] == [4, 10]


def test_no_data_loading_workers_outlive_their_pass_into_the_final_phase(tmp_path, features_dir, tiny_model_dir,
                                                                         monkeypatch):
    """The training Trainer kept its persistent workers (for training and for the checks) through
    the final phase, and every scoring pass there kept its own: 12 processes of ~0.5 GB each at
    dataloader_workers=4 while best/ was scored on the test split, on a 12 GB Colab machine."""
    import multiprocessing

    from whisper_ft import train

    seen = {}

    def counting(name, original):
        def wrapper(*args, **kwargs):
            if name != "score_test" or kwargs.get("final"):
                seen[name] = len(multiprocessing.active_children())
            return original(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(train, "try_average", counting("try_average", train.try_average))
    monkeypatch.setattr(train, "score_test", counting("score_test", train.score_test))
    sets = overrides(features_dir, tiny_model_dir, tmp_path, max_steps=4, eval_steps=2, save_steps=2,
                     eval_before_training="false", export_ctranslate2="false", average_checkpoints=2,
                     dataloader_workers=1)
    train.run_training(load_config(ROOT / "config.yaml", sets))
    assert seen == {"try_average": 0, "score_test": 0}



class Records(logging.Handler):
    """The messages of the loggers it is added to."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("at", [2, 4])
def test_a_check_killed_after_its_signal_saved_the_step_runs_when_the_run_resumes(tmp_path, features_dir,
                                                                                  tiny_model_dir, monkeypatch, at):
    """Saved first, the check at a signal's step may outlast the grace period and be killed: the
    resumed run checks that step first (at the last step: before its final phase), so no trained
    step goes unchecked and best/ can be its model."""
    from transformers import TrainerCallback

    from whisper_ft import train

    scores = iter([None, 0.4, 0.6, 0.7] if at == 2 else [0.5, None, 0.4, 0.7])  # None: killed during the check

    def scripted(tokenizer, pred):
        if (w := next(scores)) is None:
            raise RuntimeError("killed during the check")
        return {"wer": w, "wer_normalized": w, "cer": w, "clips": len(pred.label_ids)}

    monkeypatch.setattr(train, "compute_metrics", scripted)

    class TermDuringTheStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == at - 1:
                signal.raise_signal(signal.SIGTERM)

    sets = overrides(features_dir, tiny_model_dir, tmp_path, max_steps=4, eval_steps=2, save_steps=4,
                     eval_before_training="false", export_ctranslate2="false")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(RuntimeError, match="killed during the check"):
        train.run_training(load_config(ROOT / "config.yaml", sets), callbacks=[TermDuringTheStep()])
    run_dir = tmp_path / "tiny"
    assert at in [s for s, _ in checkpoints.checkpoints(run_dir)]
    warned = Records()
    logging.getLogger("transformers.trainer").addHandler(warned)  # transformers' loggers do not propagate
    try:
        summary = train.run_training(load_config(ROOT / "config.yaml", sets))
    finally:
        logging.getLogger("transformers.trainer").removeHandler(warned)
    # the tied output layer is saved once, as the token embedding: loading restores both
    assert not [m for m in warned.messages if "missing keys" in m]
    checks = {e["step"]: e["wer"] for e in checkpoints.selection_checks(checkpoints.read_events(run_dir))}
    assert checks == {2: 0.4, 4: 0.6} if at == 2 else {2: 0.5, 4: 0.4}
    assert (summary["best_step"], summary["best_wer"], summary["wer"]) == ((2, 0.4, 0.7) if at == 2 else (4, 0.4, 0.7))
    assert not list((tmp_path / "cwd").iterdir())  # nothing written where the command ran (TensorBoard's ./runs/)


def test_a_second_signal_of_a_kind_stops_at_once_and_one_of_each_kind_does_not(capfd):
    """Ctrl-C twice: the second ends the run without the save; a SIGTERM after a Ctrl-C does not."""
    from types import SimpleNamespace

    from whisper_ft.errors import Stopped
    from whisper_ft.stopping import StopOnSignal

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stopper = StopOnSignal()
    stopper.on_train_begin(SimpleNamespace(), None, None)
    signal.raise_signal(signal.SIGINT)
    signal.raise_signal(signal.SIGTERM)  # another kind: the same stop
    assert stopper.received and "Ctrl-C: saving a checkpoint at the end of this step" in capfd.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)  # a second Ctrl-C: at once
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers given back
    with pytest.raises(Stopped, match="stopped by Ctrl-C after step 7") as stop:
        stopper.raise_if_stopped(7)
    assert stop.value.signum == signal.SIGINT


def test_a_signal_ignored_when_training_begins_stays_ignored(monkeypatch):
    """A shell script's `python training_pipeline.py &` ignores Ctrl-C (the terminal's goes to the
    script): the run stopped at the next Ctrl-C during training, and ignored it afterwards."""
    from types import SimpleNamespace

    from whisper_ft.stopping import StopOnSignal

    monkeypatch.setattr(signal, "getsignal", lambda signum: signal.SIG_IGN if signum == signal.SIGINT else None)
    installed = {}
    monkeypatch.setattr(signal, "signal", lambda signum, handler: installed.setdefault(signum, handler))
    StopOnSignal().on_train_begin(SimpleNamespace(), None, None)
    assert list(installed) == [signal.SIGTERM]


@pytest.mark.parametrize("signum, name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_sigterm_or_ctrl_c_saves_the_step_and_the_rerun_goes_on_from_it(tmp_path, features_dir, tiny_model_dir, signum,
                                                                        name):
    """SIGTERM to the whole process group (as SLURM sends it; the data-loading worker too), or
    SIGINT (a terminal's Ctrl-C) saves the step the run is at, far from a save step, and exits
    143 (130) without the final phase."""
    sets = overrides(features_dir, tiny_model_dir, tmp_path, max_steps=1000, save_steps=500, eval_steps=500,
                     eval_before_training="false", dataloader_workers=1)
    cmd = [sys.executable, str(ROOT / "training_pipeline.py"), *cli_args(sets)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "tiny"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for_training(proc, run_dir)
        os.killpg(proc.pid, signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signum, err[-3000:]
    [(step, _)] = checkpoints.checkpoints(run_dir)
    assert 3 <= step < 500 and err.rstrip().endswith(
        f"stopped by {name} after step {step}, its checkpoint saved: rerun the same command to go on from there")
    assert f"{name}: saving a checkpoint at the end of this step" in err and "Traceback" not in err
    log = events(run_dir)
    assert max(e["step"] for e in log if e["event"] == "train") == step
    assert [(e["event"], e["step"]) for e in log if e["event"] in ("checkpoint", "trained", "eval")] == [
        ("checkpoint", step), ("trained", step)]
    assert not (run_dir / "metrics.json").exists() and not list(run_dir.glob(".checkpoint-*"))

    again = subprocess.run([*cmd, "--set", f"training.max_steps={step + 2}"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    log = events(run_dir)
    second = [e for e in log if e["event"] == "start"][1]
    assert second["resumed_from"] == f"checkpoint-{step}"
    assert [e["step"] for e in log if e["event"] == "train"][-2:] == [step + 1, step + 2]


def scripted_checks_and_kill(monkeypatch, wers: list[float], at: int):
    """Every check (and final scoring) scores the next of `wers` as its WER, half of it as its
    normalized WER and a quarter as its CER (each metric told apart from the others); returns a
    callback that kills the run (KeyboardInterrupt) at the end of step `at`."""
    from transformers import TrainerCallback

    from whisper_ft import train

    scores = iter(wers)
    monkeypatch.setattr(train, "compute_metrics", lambda tokenizer, pred: {
        "wer": (w := next(scores)), "wer_normalized": w / 2, "cer": w / 4, "clips": len(pred.label_ids)})

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == at:
                raise KeyboardInterrupt

    return Kill()


@pytest.mark.parametrize("averaging", [0, 2])
def test_a_resume_forgets_the_checks_after_its_checkpoint(tmp_path, features_dir, tiny_model_dir, monkeypatch, averaging):
    """Killed after a best check at step 4 but before checkpoint-6, a run resumes at checkpoint-3
    (checking every 3 steps now): best/ may not keep the model of a step it goes back over, a
    check no longer in its log. It is the best check up to step 3 again where its weights are
    kept (averaging/), else the best of the checks from there on; averaging/ drops step 4."""
    from whisper_ft import train

    # checks at 2, 4 (killed); 6, 8; the average; the test split
    kill = scripted_checks_and_kill(monkeypatch, [0.9, 0.5, 0.95, 0.96, 0.97, 0.98], at=5)
    sets = overrides(features_dir, tiny_model_dir, tmp_path, max_steps=8, eval_steps=2, save_steps=3,
                     eval_before_training="false", export_ctranslate2="false", average_checkpoints=averaging,
                     average_mode="best")
    with pytest.raises(KeyboardInterrupt):
        train.run_training(load_config(ROOT / "config.yaml", sets), callbacks=[kill])
    run_dir = tmp_path / "tiny"
    assert checkpoints.read_best(run_dir)["step"] == 4 and [s for s, _ in checkpoints.checkpoints(run_dir)] == [3]
    if averaging:  # the checks `last` would average are gone
        with pytest.raises(TrainingError, match=r"keeps the checks average_mode best averages, not those last would"):
            train.run_training(load_config(ROOT / "config.yaml", [*sets, "training.average_mode=last"]))
    summary = train.run_training(load_config(ROOT / "config.yaml", [*sets, "training.eval_steps=3"]))
    best = checkpoints.read_best(run_dir)
    log = checkpoints.read_events(run_dir)
    checks = {e["step"]: e for e in checkpoints.selection_checks(log)}
    assert {step: e["wer"] for step, e in checks.items()} == {2: 0.9, 6: 0.95, 8: 0.96}
    # with averaging/ the step-2 model is kept; without it (no checkpoint-2) the next check is best/
    assert (best["step"], best["wer"]) == ((2, 0.9) if averaging else (6, 0.95))
    assert (summary["best_step"], summary["best_wer"]) == (best["step"], best["wer"])
    # best.json carries that check's own scores, each metric as its eval event logged it
    keys = ("wer", "wer_normalized", "cer", "eval_clips")
    assert {k: best[k] for k in keys} == {k: checks[best["step"]][k] for k in keys}
    # the test split is scored on best/, an earlier check than the last step: its event names best/'s step
    [final] = [e for e in log if e.get("final")]
    assert (final["step"], summary["final"]["step"]) == (best["step"], best["step"]) and summary["steps"] == 8
    if averaging:
        assert summary["averaging"]["steps"] == [2, 6]  # the two best checks of this run's log



@pytest.mark.parametrize("damage", ["deleted", "info emptied"])
def test_a_resume_after_best_was_deleted_by_hand_exports_the_best_check_again(tmp_path, features_dir, tiny_model_dir,
                                                                             monkeypatch, damage):
    """Without best/ (or its best.json) the run knew no best score: the next check, however bad,
    was exported as best/ and reported. The best check so far is exported again from its
    checkpoint, which rotation keeps."""
    from whisper_ft import train

    # checks at 2 (best), 4; killed at 5; the check at 6; the test split
    kill = scripted_checks_and_kill(monkeypatch, [0.5, 0.9, 0.95, 0.97], at=5)
    sets = overrides(features_dir, tiny_model_dir, tmp_path, max_steps=6, eval_before_training="false",
                     export_ctranslate2="false")
    with pytest.raises(KeyboardInterrupt):
        train.run_training(load_config(ROOT / "config.yaml", sets), callbacks=[kill])
    run_dir = tmp_path / "tiny"
    assert checkpoints.read_best(run_dir)["step"] == 2 and [s for s, _ in checkpoints.checkpoints(run_dir)] == [2, 4]
    if damage == "deleted":
        shutil.rmtree(run_dir / "best")
    else:
        (run_dir / "best" / "best.json").write_text("")
    summary = train.run_training(load_config(ROOT / "config.yaml", sets))
    assert (summary["best_step"], summary["best_wer"]) == (2, 0.5)
    assert (checkpoints.read_best(run_dir)["step"], checkpoints.read_best(run_dir)["wer"]) == (2, 0.5)


def fake_checkpoint(run_dir: Path, step: int) -> Path:
    """A checkpoint folder with the files a resume reads, of a few bytes each, and the Trainer's
    training_args.bin, which every checkpoint holds beside its weights."""
    import torch
    from safetensors.torch import save_file

    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(64)}, folder / "model.safetensors")
    torch.save({"state": torch.zeros(64)}, folder / "optimizer.pt")
    torch.save({"learning_rate": 1e-5}, folder / "training_args.bin")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


@pytest.mark.parametrize("damage, problem", [
    (lambda f: os.truncate(f / "optimizer.pt", 100), "optimizer.pt: File is not a zip file"),
    (lambda f: os.truncate(f / "model.safetensors", 100), "model.safetensors: Error while deserializing header"),
    (lambda f: (f / "model.safetensors").unlink(), "no model weights in it"),
])
def test_a_damaged_newest_checkpoint_is_refused_with_one_line_before_anything_loads(tmp_path, damage, problem):
    from whisper_ft.train import run_training

    run_dir = tmp_path / "tiny"
    fake_checkpoint(run_dir, 2)
    damage(fake_checkpoint(run_dir, 4))
    sets = overrides(tmp_path / "features" / "none", tmp_path / "no-model", tmp_path)
    with pytest.raises(TrainingError, match=re.escape(f"{run_dir / 'checkpoint-4'} is damaged ({problem}") + r".*\): "
                                            r"copy it back whole, or delete that folder to resume from checkpoint-2$"):
        run_training(load_config(ROOT / "config.yaml", sets))


def test_a_finished_run_whose_checkpoint_was_damaged_since_still_has_nothing_to_do(tmp_path):
    """Its checkpoint is not loaded again: refusing it would have the user retrain the run."""
    from whisper_ft.config import save_config
    from whisper_ft.train import run_training

    cfg = load_config(ROOT / "config.yaml", overrides(tmp_path / "features" / "none", tmp_path / "no-model", tmp_path))
    run_dir = tmp_path / "tiny"
    os.truncate(fake_checkpoint(run_dir, 4) / "model.safetensors", 100)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "best").mkdir()
    (run_dir / "best" / "README.md").write_text("# the model card\n")
    (run_dir / "metrics.json").write_text(json.dumps({"steps": 4, "best_wer": 0.2}))
    assert run_training(cfg) == {"steps": 4, "best_wer": 0.2, "run_dir": str(run_dir)}


@pytest.mark.parametrize("layout", ["pytorch_model_fsdp_0", "global_step4"])
def test_checkpoints_of_sharded_trainers_are_not_taken_for_damaged(tmp_path, layout):
    """FSDP's sharded state dict and DeepSpeed's ZeRO-3 keep the weights in a folder of their own."""
    folder = fake_checkpoint(tmp_path, 4)
    (folder / "model.safetensors").unlink()
    (folder / "optimizer.pt").unlink()
    (folder / layout).mkdir()
    (folder / layout / "__0_0.distcp").write_bytes(b"\0" * 64)
    assert checkpoints.damage(folder) is None
    shutil.rmtree(folder / layout)
    assert checkpoints.damage(folder) == "no model weights in it"

@pytest.mark.parametrize("name", ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "adapter_model.bin"])
def test_checkpoints_with_torch_weights_are_not_taken_for_damaged(tmp_path, name):
    """save_safetensors=false and older PEFT write torch weights; training_args.bin is not weights."""
    import torch

    folder = fake_checkpoint(tmp_path, 4)
    (folder / "model.safetensors").unlink()
    assert checkpoints.damage(folder) == "no model weights in it"
    torch.save({"w": torch.zeros(4)}, folder / name)
    assert checkpoints.damage(folder) is None


def test_a_resume_says_which_newer_checkpoint_it_skips_as_incomplete(tmp_path, caplog):
    from whisper_ft.reruns import check_newest_checkpoint

    fake_checkpoint(tmp_path, 2)
    (fake_checkpoint(tmp_path, 4) / "trainer_state.json").write_text('{"global_')
    found = checkpoints.checkpoints(tmp_path)
    assert [s for s, _ in found] == [2]
    with caplog.at_level("WARNING", "whisper_ft.reruns"):
        check_newest_checkpoint(tmp_path, found)
    assert f"{tmp_path / 'checkpoint-4'} is incomplete" in caplog.text and "resuming from checkpoint-2" in caplog.text

def test_spec_augment_masks_longer_than_the_input_are_refused_before_any_scoring(tmp_path, features_dir,
                                                                                   tiny_model_dir):
    from whisper_ft.train import run_training

    sets = [*overrides(features_dir, tiny_model_dir, tmp_path), "training.spec_augment.enabled=true",
            "training.spec_augment.mask_feature_prob=0.1"]
    with pytest.raises(TrainingError, match=r"^training.spec_augment.mask_feature_length: must be under the "
                                            r"model's 80 mel bins, got 100$"):
        run_training(load_config(ROOT / "config.yaml", [*sets, "training.spec_augment.mask_feature_length=100"]))
    with pytest.raises(TrainingError, match=r"mask_time_length: must be under the model's 3000 frames, got 3000"):
        run_training(load_config(ROOT / "config.yaml", [*sets, "training.spec_augment.mask_time_length=3000"]))
    assert not (tmp_path / "tiny" / "metrics.jsonl").exists()


def test_a_lora_resume_exports_the_best_check_before_it_from_the_adapters_of_its_checkpoint(
        tmp_path, features_dir, tiny_model_dir, monkeypatch):
    """Killed after a best check at step 4, a LoRA run resumes at checkpoint-3, which holds its
    adapters only: the check at step 3 (the best up to there) is merged from them into best/,
    not dropped for a later, worse one."""
    import torch
    from safetensors.torch import load_file

    from whisper_ft import train

    # checks at 1, 2, 3, 4 (killed); 6; the test split
    kill = scripted_checks_and_kill(monkeypatch, [0.9, 0.8, 0.5, 0.3, 0.95, 0.97], at=5)
    sets = [*overrides(features_dir, tiny_model_dir, tmp_path, max_steps=6, eval_steps=1, save_steps=3,
                       eval_before_training="false", export_ctranslate2="false", learning_rate=1e-2),
            "training.lora.enabled=true"]
    with pytest.raises(KeyboardInterrupt):
        train.run_training(load_config(ROOT / "config.yaml", sets), callbacks=[kill])
    run_dir = tmp_path / "tiny"
    assert checkpoints.read_best(run_dir)["step"] == 4 and [s for s, _ in checkpoints.checkpoints(run_dir)] == [3]
    assert (run_dir / "checkpoint-3" / "adapter_config.json").is_file()
    summary = train.run_training(load_config(ROOT / "config.yaml", [*sets, "training.eval_steps=3"]))
    assert (summary["best_step"], summary["best_wer"]) == (3, 0.5)
    from peft import PeftModel

    from whisper_ft.model import load_model

    adapters = str(run_dir / "checkpoint-3")
    merged = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), adapters).merge_and_unload()
    exported = load_file(str(run_dir / "best" / "model.safetensors"))
    name = "model.decoder.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(exported[name].float(), merged.state_dict()[name].float(), atol=1e-6)


def test_rerunning_a_finished_run_trains_no_more_and_changed_settings_are_refused(tmp_path, features_dir,
                                                                                  tiny_model_dir, monkeypatch):
    """A rerun of a finished run does nothing; after a kill in the final phase (no metrics.json),
    or with other final-phase settings, it finishes from the last checkpoint without an
    extra step; a background write still in flight at the end of training keeps its checkpoint;
    a resume with another learning rate is refused, a longer one runs."""
    from whisper_ft.train import run_training
    from whisper_ft.trainer import WhisperTrainer

    write = WhisperTrainer._write_checkpoint

    def slow_write(self, *args, **kwargs):
        time.sleep(1.0)  # still writing when the Trainer's end-of-training cleanup runs
        return write(self, *args, **kwargs)

    monkeypatch.setattr(WhisperTrainer, "_write_checkpoint", slow_write)
    sets = overrides(features_dir, tiny_model_dir, tmp_path, max_steps=2, eval_steps=2, save_steps=2,
                     save_total_limit=2, eval_before_training="false", export_ctranslate2="false")
    first = run_training(load_config(ROOT / "config.yaml", sets))
    run_dir = tmp_path / "tiny"
    assert first["steps"] == 2 and [s for s, _ in checkpoints.checkpoints(run_dir)] == [2]
    tests = lambda: [e for e in events(run_dir) if e["event"] == "eval" and e.get("purpose") == "report"]  # noqa: E731
    assert len(tests()) == 1
    assert run_training(load_config(ROOT / "config.yaml", sets)) == first  # finished: nothing is done again
    assert len(tests()) == 1 and len([e for e in events(run_dir) if e["event"] == "start"]) == 1
    shutil.copytree(run_dir, tmp_path / "moved")  # a finished run copied (or moved) under another name
    moved = run_training(load_config(ROOT / "config.yaml", [*sets, "training.run_name=moved"]))
    assert moved == {**first, "run_dir": str(tmp_path / "moved")}  # it names where it is now
    sets.append("training.average_mode=best")  # another final phase: done again
    again = run_training(load_config(ROOT / "config.yaml", sets))
    assert again["steps"] == 2 and [s for s, _ in checkpoints.checkpoints(run_dir)] == [2]
    assert [e["step"] for e in events(run_dir) if e["event"] == "train"] == [1, 2]
    assert again["best_step"] == first["best_step"] and again["wer"] == first["wer"] and len(tests()) == 2
    assert again["train_loss"] == first["train_loss"]  # the figures of the run that trained
    (run_dir / "metrics.json").unlink()  # as after a kill in the final phase: done again
    finished = run_training(load_config(ROOT / "config.yaml", sets))
    assert finished["steps"] == 2 and len(tests()) == 3
    figures = ("train_runtime_seconds", "train_samples_per_second", "train_loss")  # from the `trained` event
    assert [finished[k] for k in figures] == [first[k] for k in figures] and first["train_runtime_seconds"] > 0

    with pytest.raises(TrainingError, match=r"trained to checkpoint-2 with other settings \(training.learning_rate "
                                            r"0.001 -> 0.01\): a resumed run keeps its own"):
        run_training(load_config(ROOT / "config.yaml", [*sets, "training.learning_rate=1e-2"]))
    longer = run_training(load_config(ROOT / "config.yaml", [*sets, "training.max_steps=3"]))
    assert longer["steps"] == 3 and [e["step"] for e in events(run_dir) if e["event"] == "train"] == [1, 2, 3]


def test_a_run_stopped_while_writing_its_reports_writes_them_when_rerun(tmp_path, features_dir, tiny_model_dir,
                                                                       monkeypatch):
    """metrics.json marks a finished run: a stop in the plotting step leaves none, so the rerun
    does the final phase again and best/ gets its card, plot and WER breakdown."""
    from whisper_ft import report
    from whisper_ft.train import run_training

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    sets = overrides(features_dir, tiny_model_dir, tmp_path, max_steps=2, eval_steps=2, save_steps=2,
                     eval_before_training="false", export_ctranslate2="false")
    plot = report.plot_curves
    monkeypatch.setattr(report, "plot_curves", killed)
    with pytest.raises(KeyboardInterrupt):
        run_training(load_config(ROOT / "config.yaml", sets))
    run_dir = tmp_path / "tiny"
    assert not (run_dir / "metrics.json").exists()
    monkeypatch.setattr(report, "plot_curves", plot)
    summary = run_training(load_config(ROOT / "config.yaml", sets))
    assert summary["steps"] == 2 and json.loads((run_dir / "metrics.json").read_text()) == summary
    for name in ("README.md", report.PLOT_NAME):
        assert (run_dir / "best" / name).is_file()
    assert (run_dir / "wer_breakdown.json").is_file()
    (run_dir / "best" / "README.md").unlink()  # metrics.json without the card it came with: not finished
    run_training(load_config(ROOT / "config.yaml", sets))
    assert (run_dir / "best" / "README.md").is_file()


def test_leftovers_are_removed_and_an_interrupted_best_replacement_restored(tmp_path):
    def folder(name: str, *files: str) -> Path:
        (tmp_path / name).mkdir(parents=True)
        for f in files:
            (tmp_path / name / f).write_text("x")
        return tmp_path / name

    folder(".best.tmp-99", "model.safetensors", checkpoints.BEST_INFO)  # complete: killed between the renames
    folder(".best.old-99", "model.safetensors", checkpoints.BEST_INFO)
    folder(".checkpoint-4.tmp-99", "model.safetensors")
    folder(".checkpoint-2.old-99", "model.safetensors")
    (tmp_path / ".metrics.json.tmp-99").write_text("{")
    folder("averaging")
    (tmp_path / "averaging" / ".step-2.safetensors.tmp-99").write_text("x")
    removed = checkpoints.remove_leftovers(tmp_path)
    assert (tmp_path / "best" / checkpoints.BEST_INFO).is_file()
    assert sorted(p.name for p in removed) == [".best.old-99", ".checkpoint-2.old-99", ".checkpoint-4.tmp-99",
                                               ".metrics.json.tmp-99", ".step-2.safetensors.tmp-99"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["averaging", "best"]
    folder(".best.tmp-98", "model.safetensors")  # incomplete, with a best/ in place: removed, best/ kept
    assert [p.name for p in checkpoints.remove_leftovers(tmp_path)] == [".best.tmp-98"]


def test_a_line_cut_short_in_metrics_jsonl_is_skipped_and_not_joined(tmp_path, caplog):
    checkpoints.append_event(tmp_path, {"event": "train", "step": 1, "loss": 3.0})
    with open(tmp_path / checkpoints.METRICS_LOG, "a") as f:
        f.write('{"event": "train", "st')  # killed while writing
    checkpoints.append_event(tmp_path, {"event": "train", "step": 2, "loss": 2.0})
    assert [(e["step"], e["loss"]) for e in checkpoints.read_events(tmp_path)] == [(1, 3.0), (2, 2.0)]
    assert "skipped 1 line(s) cut short" in caplog.text


# --------------------------------------------------------------------------- several processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: DDP over the bf16 weight copy
def test_torchrun_two_processes_share_the_work(tmp_path, features_dir, tiny_model_dir, precision):
    sets = overrides(features_dir, tiny_model_dir, tmp_path, max_steps=2, eval_steps=2, save_steps=1,
                     eval_before_training="false", batch_size=2, eval_batch_size=3, precision=precision)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(ROOT / "training_pipeline.py"), *cli_args(sets)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "tiny"
    log = events(run_dir)
    assert [(e["world_size"], e["mixed_precision"]) for e in log if e["event"] == "start"] == [
        (2, "bf16 weight copy" if precision == "bf16" else "fp32")]  # one writer: rank 0
    assert all(e["loss"] < 12 for e in log if e["event"] == "train")  # ~ln(vocab), not scaled by the process count
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["samples_seen"] == 2 * 2 * 2  # steps x per-device batch x processes
    final = [e for e in log if e.get("final")]
    assert len(final) == 1 and final[0]["eval_clips"] == 10  # gathered from both ranks, no duplicates
    assert len((run_dir / "predictions.jsonl").read_text().splitlines()) == 10
    assert (run_dir / "checkpoint-2" / "trainer_state.json").is_file() and (run_dir / "best" / "model.safetensors").is_file()
    assert proc.stdout.count("done: 2 steps") == 1
    # Checkpoints written by rank 0's writer thread, each with both ranks' RNG state.
    assert [(e["step"], e["background"]) for e in log if e["event"] == "checkpoint"] == [(1, True), (2, True)]
    for step in (1, 2):
        assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors", "optimizer.pt"} <= {
            p.name for p in (run_dir / f"checkpoint-{step}").iterdir()}
    assert not list(run_dir.glob(".checkpoint-*"))
    if precision == "fp32":  # both ranks resume from it
        again = subprocess.run([*cmd, "--set", "training.max_steps=3"], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=400)
        assert again.returncode == 0, again.stderr[-4000:]
        starts = [e for e in events(run_dir) if e["event"] == "start"]
        assert [(e["resumed_from"], e["world_size"]) for e in starts] == [(None, 2), ("checkpoint-2", 2)]
        assert json.loads((run_dir / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
        # On one process: training on is refused (the effective batch would halve), finishing is not. With
        # its final phase cut short (no metrics.json), the finish scores the same best/ again there: the same
        # loss, the mean over every label token of the test split, though on two processes the 10 clips in
        # batches of 3 filled the last batch with repeated clips, and the batches hold unequal token counts.
        single = [sys.executable, str(ROOT / "training_pipeline.py"), *cli_args(sets)]
        refused = subprocess.run([*single, "--set", "training.max_steps=4"], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=400)
        assert refused.returncode == 2 and "on 2 process(es), this run has 1" in refused.stderr, refused.stderr[-2000:]
        (run_dir / "metrics.json").unlink()
        finish = subprocess.run([*single, "--set", "training.max_steps=3"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=400)
        assert finish.returncode == 0, finish.stderr[-4000:]
        finals = [e for e in events(run_dir) if e.get("final")]
        assert len(finals) == 3  # after the two processes' finishes at steps 2 and 3, this one's
        two, one = finals[-2:]
        assert (one["step"], one["eval_clips"], one["wer"]) == (two["step"], two["eval_clips"], two["wer"])
        assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
        assert one["loss"] == pytest.approx(label_token_loss(run_dir / "best", features_dir), rel=1e-5)
        assert json.loads((run_dir / "metrics.json").read_text())["samples_seen"] == 3 * 2 * 2


def label_token_loss(model_dir: Path, features_dir: Path) -> float:
    """The cross-entropy of `model_dir`'s model averaged over every label token of the store's test
    split, computed directly in one batch of all its clips."""
    import torch.nn.functional as F

    from whisper_ft.collator import IGNORE_INDEX, SpeechCollator, expand
    from whisper_ft.features import EVAL, load_split
    from whisper_ft.model import load_model

    model = load_model(str(model_dir)).eval()
    batch = expand(SpeechCollator(model.config.decoder_start_token_id)(list(load_split(features_dir, EVAL))))
    with torch.no_grad():
        logits = model(input_features=batch["input_features"], labels=batch["labels"]).logits
    labels = batch["labels"]
    return (F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum")
            / (labels != IGNORE_INDEX).sum()).item()


def test_torchrun_trains_one_model_also_after_the_zero_shot_check(tmp_path, features_dir, tiny_model_dir):
    """The zero-shot test scoring before training must leave the model to be wrapped in DDP:
    the first step's gradient is the processes' average whether that check ran or not."""
    def first_step(run_name: str, before: str) -> dict:
        sets = overrides(features_dir, tiny_model_dir, tmp_path, max_steps=1, eval_steps=1, save_steps=1,
                         batch_size=2, eval_batch_size=5, export_ctranslate2="false", run_name=run_name,
                         eval_before_training=before)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(ROOT / "training_pipeline.py"), *cli_args(sets)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-4000:]
        log = events(tmp_path / run_name)
        assert any(e["event"] == "eval" and e["step"] == 0 and e.get("purpose") == "report" for e in log) == (
            before == "true")
        return next(e for e in log if e["event"] == "train")

    checked, unchecked = first_step("checked", "true"), first_step("unchecked", "false")
    assert checked["loss"] == pytest.approx(unchecked["loss"], rel=1e-6)
    assert checked["grad_norm"] == pytest.approx(unchecked["grad_norm"], rel=1e-4)  # not one process's own


@pytest.mark.parametrize("signum, name, group", [(signal.SIGTERM, "SIGTERM", False), (signal.SIGINT, "Ctrl-C", True)])
def test_sigterm_to_torchrun_saves_one_step_that_every_process_agreed_on(tmp_path, features_dir, tiny_model_dir,
                                                                         signum, name, group):
    """torchrun passes SIGTERM on to its processes; they stop together at a step that is a
    multiple of 10 (one collective there) and rank 0 saves it with both ranks' RNG state. A
    terminal's Ctrl-C reaches torchrun (its processes run in sessions of their own), which
    passes it on: the same stop."""
    sets = overrides(features_dir, tiny_model_dir, tmp_path, max_steps=1000, save_steps=500, eval_steps=500,
                     eval_before_training="false", batch_size=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(ROOT / "training_pipeline.py"), *cli_args(sets)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "tiny"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for_training(proc, run_dir, timeout=400)
        if group:  # the terminal's foreground process group: torchrun, its processes, their workers
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)  # to torchrun alone
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    [(step, folder)] = checkpoints.checkpoints(run_dir)
    assert step % 10 == 0 and 0 < step < 500, err[-3000:]
    assert err.count(f"stopped by {name} after step {step}, its checkpoint saved") == 2  # each process
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors", "optimizer.pt"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step
    assert max(e["step"] for e in events(run_dir) if e["event"] == "train") == step
    assert not list(run_dir.glob(".checkpoint-*"))


# --------------------------------------------------------------------------- errors: one line, exit code 2


def _main(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and the error line(s) of the entry script, run in-process."""
    import training_pipeline

    code = cli_run(training_pipeline.main, argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, "\n".join(line for line in err.splitlines() if line.startswith("error"))


def test_missing_features_exit_2(tmp_path, tiny_model_dir, capsys):
    code, err = _main(cli_args([f"features.data_dir={tmp_path}", f"model.name_or_path={tiny_model_dir}",
                                f"training.output_dir={tmp_path}"]), capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "feature_pipeline.py" in err


@pytest.mark.parametrize("key, folder", [("output_dir", "a-file"), ("output_dir", "a-file/runs"),
                                         ("run_name", "runs")])
def test_output_on_a_file_exit_2(tmp_path, features_dir, tiny_model_dir, key, folder, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").write_text("not a folder")
    code, err = _main(cli_args(overrides(features_dir, tiny_model_dir, tmp_path / folder)), capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: training.{key}: ") and "is a file, not a folder" in err


@pytest.mark.parametrize("run_name", ["new", "resumed"])
def test_an_output_dir_that_cannot_be_written_exit_2_before_loading(tmp_path, tiny_model_dir, run_name, capsys,
                                                                    monkeypatch):
    """A new run (its folder cannot be made) and an existing one (no file can be written in it)
    fail with one line before the data load, which would fail here (no features)."""
    import errno
    import pathlib

    out = tmp_path / "read-only"
    (out / "resumed").mkdir(parents=True)
    out.chmod(0o555), (out / "resumed").chmod(0o555)
    try:
        (out / "probe").touch()
    except PermissionError:
        pass
    else:  # root writes in folders without write permission: the file system refuses instead
        (out / "probe").unlink()

        def refuse(method):
            def refused(self, *args, **kwargs):
                if out in self.parents:
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
                return method(self, *args, **kwargs)
            return refused
        for name in ("mkdir", "write_bytes", "write_text", "touch"):
            monkeypatch.setattr(pathlib.Path, name, refuse(getattr(pathlib.Path, name)))
    try:
        code, err = _main(cli_args([f"features.data_dir={tmp_path}", f"model.name_or_path={tiny_model_dir}",
                                    f"training.output_dir={out}", f"training.run_name={run_name}"]), capsys)
    finally:
        out.chmod(0o755), (out / "resumed").chmod(0o755)
    assert code == 2 and err == (f"error: training.output_dir: cannot write in {out / run_name} (Permission denied); "
                                 "set training.output_dir to a folder you can write in, or make this one writable")
    assert os.listdir(out / "resumed") == []


def test_a_refused_run_leaves_no_folder_behind(tmp_path, tiny_model_dir, capsys):
    """The write check makes the run folder and its parents, then removes them: the command
    stops at a later check here (no features)."""
    out = tmp_path / "checkpoints"
    code, err = _main(cli_args([f"features.data_dir={tmp_path}", f"model.name_or_path={tiny_model_dir}",
                                f"training.output_dir={out / 'mine'}", "training.run_name=typo"]), capsys)
    assert code == 2 and "no finished features in" in err
    assert not out.exists()


def test_missing_eval_features_say_how_to_build_them(tmp_path, features_dir, tiny_model_dir, capsys):
    code, err = _main(cli_args(overrides(features_dir, tiny_model_dir, tmp_path, eval_features="nope")), capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert err == (f"error: training.eval_features: no finished features in {features_dir.parent / 'nope'} (no "
                   "manifest.json): build them first with python feature_pipeline.py --set features.name=nope")


def test_features_for_another_model_exit_2(tmp_path, features_dir, capsys):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    other = tmp_path / "large-v3-like"
    WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=51866, num_mel_bins=128, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=1,
        decoder_attention_heads=1, encoder_ffn_dim=16, decoder_ffn_dim=16)).save_pretrained(other)
    code, err = _main(cli_args(overrides(features_dir, other, tmp_path)), capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "128" in err and "mel bins" in err
    # the same features.name would be refused: it holds features built with other settings
    assert ("python feature_pipeline.py --set model.name_or_path=<the model> --set features.name=NEW_NAME and train "
            "with --set features.name=NEW_NAME (or, without a new name, pass --overwrite to replace fixture)") in err


def test_features_for_another_language_exit_2(tmp_path, features_dir, tiny_model_dir, capsys):
    code, err = _main([*cli_args(overrides(features_dir, tiny_model_dir, tmp_path)), "--set", "model.language=da"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "prefix tokens" in err
    assert "(model.language=sv), the tokenizer makes" in err and "model.name_or_path" not in err
    assert err.endswith("python feature_pipeline.py --set model.language=da --set features.name=NEW_NAME and train with "
                        "--set features.name=NEW_NAME (or, without a new name, pass --overwrite to replace fixture), "
                        "or train with model.language=sv")


def test_bad_config_exit_2(tmp_path, capsys):
    code, err = _main(cli_args(["training.precision=fp8"]), capsys)
    assert code == 2 and "training.precision" in err


# --------------------------------------------------------------------------- small pieces


def test_generation_length_capped_from_labels():
    from datasets import Dataset

    from whisper_ft.train import longest_label

    cfg = load_config(None)
    assert generation_max_length(cfg, 40) == 45
    assert generation_max_length(cfg, 440) == 448
    assert generation_max_length(load_config(None, ["training.generation_max_length=100"]), 20) == 100
    train = Dataset.from_dict({"labels": [[1] * 20, [1] * 40, [1] * 7]})
    validation = Dataset.from_dict({"labels": [[1] * 50, [1] * 3]})
    assert longest_label(train, validation) == 50
    assert longest_label(train, validation.select([1])) == 40  # a subset counts only its rows
    assert longest_label(train.select([])) == 0


def test_precision_per_device():
    assert resolve_precision("auto", cuda=False, bf16_ok=False) == "fp32"
    assert resolve_precision("auto", cuda=True, bf16_ok=True) == "bf16"
    assert resolve_precision("auto", cuda=True, bf16_ok=False) == "fp16"
    with pytest.raises(TrainingError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cuda=False, bf16_ok=False)


def test_latest_checkpoint_skips_half_written(tmp_path):
    """A kill before the Trainer's last file (12), or a power loss before it reached the disk (14, 16)."""
    for step, state in ((2, "{}"), (10, '{"global_step": 10}'), (12, None), (14, ""), (16, '{"global_st')):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if state is not None:
            (d / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-x").mkdir()
    assert checkpoints.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert checkpoints.latest_checkpoint(tmp_path / "missing") is None


def test_read_events_keeps_the_resumed_trajectory(tmp_path):
    for e in ({"event": "train", "step": 1, "loss": 3.0}, {"event": "train", "step": 2, "loss": 2.0},
              {"event": "start", "step": 1}, {"event": "train", "step": 2, "loss": 2.5},
              {"event": "eval", "step": 2, "wer": float("nan")}):
        checkpoints.append_event(tmp_path, e)
    got = checkpoints.read_events(tmp_path)
    assert [(e["event"], e["step"], e.get("loss")) for e in got] == [
        ("train", 1, 3.0), ("start", 1, None), ("train", 2, 2.5), ("eval", 2, None)]
    assert got[-1]["wer"] is None  # NaN is written as null: metrics.jsonl stays valid JSON


def test_a_run_whose_training_session_was_killed_says_its_time_is_not_recorded(tmp_path):
    """Finishing a run whose training session was killed before the Trainer returned (no
    `trained` event, no metrics.json): its runtime is unknown, not 0 s."""
    from whisper_ft import report
    from whisper_ft.reruns import earlier_train_metrics

    checkpoints.append_event(tmp_path, {"event": "start", "step": 0})
    assert earlier_train_metrics(tmp_path)["train_runtime"] is None
    assert report._runtime({"train_runtime_seconds": None, "train_sessions": 2}) == \
        "time not recorded (2 training sessions, resumed)"
    checkpoints.append_event(tmp_path, {"event": "trained", "step": 4, "train_runtime": 12.3})
    assert earlier_train_metrics(tmp_path)["train_runtime"] == 12.3
    assert report._runtime({"train_runtime_seconds": 12.3}) == "12 s"


def test_read_events_drops_the_steps_a_resume_abandoned(tmp_path):
    """Checks every 3 steps, killed in the step-12 check and resumed from checkpoint-6 checking
    every 4: the step-9 check and the train events after step 6 belong to no trajectory now."""
    first = [{"event": "start", "step": 0}, *({"event": "train", "step": s, "loss": 9.0} for s in range(1, 12)),
             *({"event": "eval", "step": s, "split": "validation", "wer": 0.5} for s in (3, 6, 9))]
    second = [{"event": "start", "step": 6, "resumed_from": "checkpoint-6"},
              *({"event": "train", "step": s, "loss": 1.0} for s in (8, 12)),
              *({"event": "eval", "step": s, "split": "validation", "wer": 0.4} for s in (8, 12))]
    for e in first + second:
        checkpoints.append_event(tmp_path, e)
    got = checkpoints.read_events(tmp_path)
    assert [e["step"] for e in got if e["event"] == "eval"] == [3, 6, 8, 12]
    assert [e["step"] for e in got if e["event"] == "train"] == [1, 2, 3, 4, 5, 6, 8, 12]
    assert [e["step"] for e in got if e["event"] == "start"] == [0, 6]


def test_read_events_drops_the_final_phase_of_a_run_resumed_to_train_further(tmp_path):
    """Finished at step 4 (best/ the step-4 check, its test score, an average that lost), then
    rerun with more steps: its final phase is done again for the best/ it then has, and the
    earlier one's test score and average describe a model that is no longer shipped."""
    first = [{"event": "start", "step": 0}, {"event": "eval", "step": 0, "split": "test", "purpose": "report"},
             *({"event": "eval", "step": s, "split": "validation", "purpose": "selection", "wer": w}
               for s, w in ((2, 0.8), (4, 0.7))),
             {"event": "average", "step": 4, "split": "validation", "wer": 0.75, "averaged_steps": [2, 4]},
             {"event": "eval", "step": 4, "split": "test", "purpose": "report", "wer": 0.7, "final": True}]
    second = [{"event": "start", "step": 4, "resumed_from": "checkpoint-4"},
              {"event": "eval", "step": 6, "split": "validation", "purpose": "selection", "wer": 0.5},
              {"event": "eval", "step": 6, "split": "test", "purpose": "report", "wer": 0.6, "final": True}]
    for e in first + second:
        checkpoints.append_event(tmp_path, e)
    got = checkpoints.read_events(tmp_path)
    assert [(e["step"], e.get("wer")) for e in got if e.get("split") == "test"] == [(0, None), (6, 0.6)]
    assert not [e for e in got if e["event"] == "average"]
    assert [e["step"] for e in checkpoints.selection_checks(got)] == [2, 4, 6]


def test_freeze_encoder_and_lora(tiny_model_dir, features_dir):
    from whisper_ft.model import load_processor
    from whisper_ft.train import prepare_model

    tok = load_processor(str(features_dir / "processor")).tokenizer
    sets = overrides(features_dir, tiny_model_dir, Path("unused"))
    frozen = prepare_model(load_config(None, [*sets, "training.freeze_encoder=true"]), tok)
    assert not any(p.requires_grad for p in frozen.model.encoder.parameters())
    assert any(p.requires_grad for p in frozen.model.decoder.parameters())
    lora = prepare_model(load_config(None, [*sets, "training.lora.enabled=true", "training.lora.rank=4"]), tok)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    merged = checkpoints.standalone(lora)
    assert type(merged).__name__ == "WhisperForConditionalGeneration"
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    # the adapters start from training.seed: two runs of one config start alike
    torch.manual_seed(12345)  # whatever state the process is in
    again = prepare_model(load_config(None, [*sets, "training.lora.enabled=true", "training.lora.rank=4"]), tok)
    first = {n: p for n, p in lora.named_parameters() if "lora_A" in n}
    assert all(torch.equal(p, dict(again.named_parameters())[n]) for n, p in first.items())
    # both: adapters on the decoder only, the whole encoder frozen
    both = prepare_model(load_config(None, [*sets, "training.lora.enabled=true", "training.freeze_encoder=true"]), tok)
    trainable = {n for n, p in both.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ".decoder." in n for n in trainable)
    assert not any("lora_" in n for n, _ in both.base_model.model.model.encoder.named_parameters())
    with pytest.raises(TrainingError, match=r"target_modules \['query'\].*q_proj"):
        prepare_model(load_config(None, [*sets, "training.lora.enabled=true", "training.lora.target_modules=[query]"]),
                      tok)


def test_eval_subset_for_periodic_checks(features_dir, tiny_model_dir):
    from whisper_ft.train import load_data

    sets = overrides(features_dir, tiny_model_dir, Path("unused"), eval_subset=2)
    data = load_data(load_config(None, sets))
    assert data.selection_split == "validation"
    assert len(data.selection_model) == 2 and len(data.test_model) == 10
    durations = data.test["duration"]
    assert durations == sorted(durations, reverse=True)  # longest first: batches generate similar lengths


def test_eval_subset_is_the_same_clips_whatever_the_seed(features_dir, tiny_model_dir):
    """Runs (sweep trials) that differ in training.seed are checked on the same validation clips."""
    from whisper_ft.train import load_data

    picked = set()
    for seed in range(6):
        sets = overrides(features_dir, tiny_model_dir, Path("unused"), eval_subset=2, seed=seed)
        picked.add(tuple(load_data(load_config(None, sets)).selection_model.with_format(None)["id"]))
    assert len(picked) == 1


def test_callback_can_stop_a_run_early(tmp_path, features_dir, tiny_model_dir):
    """The sweep's pruning path: a callback ends training after an evaluation; the run still
    finishes with a best model, a final evaluation and a summary."""
    from transformers import TrainerCallback

    from whisper_ft.train import run_training

    class Prune(TrainerCallback):
        def on_evaluate(self, args, state, control, **kwargs):
            if state.global_step >= 1:
                control.should_training_stop = True

    cfg = load_config(ROOT / "config.yaml", overrides(features_dir, tiny_model_dir, tmp_path, max_steps=20, eval_steps=1,
                                                      save_steps=20, eval_before_training="false"))
    summary = run_training(cfg, callbacks=[Prune()])
    assert summary["steps"] == 1 and summary["best_step"] == 1 and summary["eval_clips"] == 10
    assert summary["baseline"] is None  # no zero-shot scoring when eval_before_training is off
    assert (tmp_path / "tiny" / "best" / "model.safetensors").is_file()


def test_eval_features_from_another_store_must_share_the_encoding(tmp_path, features_dir, tiny_model_dir):
    import shutil

    from whisper_ft.features import FeaturesError
    from whisper_ft.train import load_data

    other = features_dir.parent / "fixture-eval-copy"
    if not other.exists():
        shutil.copytree(features_dir, other)
    sets = overrides(features_dir, tiny_model_dir, tmp_path, eval_features=other.name)
    data = load_data(load_config(None, sets))
    assert len(data.test) == 10 and data.manifest["name"] == features_dir.name
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["feature_extractor"]["n_mels"] = 128
    (other / "manifest.json").write_text(json.dumps(manifest))
    try:
        with pytest.raises(FeaturesError, match="differ in feature extractor"):
            load_data(load_config(None, sets))
    finally:
        shutil.rmtree(other)


def test_a_store_built_keeping_overlap_counts_its_overlapping_rows(tmp_path, features_dir, tiny_model_dir):
    """Stage 1 with features.on_overlap=keep records the training rows it kept that share a clip
    or a sentence with held-out rows, and the validation rows that share one with test rows; the
    run carries both counts to its card."""
    from whisper_ft.train import load_data

    other = features_dir.parent / "fixture-kept"
    shutil.rmtree(other, ignore_errors=True)
    shutil.copytree(features_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["overlap"] = {**manifest.get("overlap", {}), "kept_overlapping_training_rows": 7,
                           "kept_overlapping_validation_rows": 2}
    (other / "manifest.json").write_text(json.dumps(manifest))
    try:
        data = load_data(load_config(None, overrides(other, tiny_model_dir, tmp_path)))
        assert (data.overlapping_training_rows, data.overlapping_validation_rows) == (7, 2)
    finally:
        shutil.rmtree(other)


def _store_training_on_test_clips(features_dir: Path, name: str, speaker: str | None = None,
                                  source: str | None = None) -> Path:
    """A copy of the fixture store whose training split is the fixture's test clips (read by
    another `speaker`: the same sentences, other clips; or the same clips from a source of
    another name)."""
    from datasets import load_from_disk

    other = features_dir.parent / name
    shutil.rmtree(other, ignore_errors=True)
    shutil.copytree(features_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    test_shards = manifest["splits"]["eval"]["shards"]
    manifest["splits"]["train"] = manifest["splits"]["eval"]
    if speaker is not None or source is not None:
        def change(ex, i):
            if speaker is None:
                return {"source": source}
            return {"speaker": speaker, "id": f"train/other_{i}.mp3"}

        ds = load_from_disk(str(features_dir / test_shards[0])).map(change, with_indices=True)
        ds.save_to_disk(str(other / "train" / "shard-test"))
        (other / "train" / "shard-test" / "stats.json").write_text(json.dumps({"clips": len(ds)}))
        manifest["splits"]["train"] = {**manifest["splits"]["eval"], "shards": ["train/shard-test"]}
    (other / "manifest.json").write_text(json.dumps(manifest))
    return other


def test_eval_features_store_sharing_clips_with_training_is_refused(tmp_path, features_dir, tiny_model_dir, caplog):
    """Stage 1 keeps held-out clips out of training within a store; training.eval_features
    brings in another store's, which load_data checks against the training split."""
    from whisper_ft.features import FeaturesError
    from whisper_ft.train import load_data

    leaky = _store_training_on_test_clips(features_dir, "fixture-leaky")
    sets = overrides(leaky, tiny_model_dir, tmp_path, eval_features=features_dir.name)
    try:
        with pytest.raises(FeaturesError, match=f"the training clips of features fixture-leaky include 10 test clips of "
                                                f"{features_dir.name} \\(training.eval_features\\).*disjoint sources"):
            load_data(load_config(None, sets))
        kept = load_data(load_config(None, [*sets, "features.on_overlap=keep"]))
        assert len(kept.test) == 10 and kept.overlapping_training_rows == 10  # for the card's caveat
        assert "include 10 test clips" in caplog.text and "not held-out scores" in caplog.text
        caplog.clear()
        _store_training_on_test_clips(features_dir, "fixture-leaky", speaker="someone else")
        shared = load_data(load_config(None, sets))  # only sentences shared: a warning
        assert len(shared.test) == 10 and shared.overlapping_training_rows == 10
        assert "10 test clips of fixture (training.eval_features) share a sentence" in caplog.text
        _store_training_on_test_clips(features_dir, "fixture-leaky", source="cv17")  # one release, named otherwise
        with pytest.raises(FeaturesError, match="the training clips of features fixture-leaky include 10 test clips"):
            load_data(load_config(None, sets))
        assert load_data(load_config(None, overrides(features_dir, tiny_model_dir, tmp_path))).overlapping_training_rows == 0
    finally:
        shutil.rmtree(leaky)


def test_compiled_layers_train_like_eager_ones(features_dir, tiny_model_dir):
    """training.torch_compile compiles each layer in place: same loss and gradients, same
    parameter names in checkpoints."""
    import shutil

    import torch

    from whisper_ft.collator import SpeechCollator, expand
    from whisper_ft.features import load_split
    from whisper_ft.model import load_model
    from whisper_ft.train import compile_layers

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("torch.compile on CPU needs a C compiler (apt-get install gcc)")
    ds = load_split(features_dir, "train").with_format("numpy", columns=["input_features", "fill", "labels"])
    batch = expand(SpeechCollator(50258)([ds[i] for i in range(3)]))
    results = []
    for compiled in (False, True):
        model = load_model(str(tiny_model_dir)).train()
        keys = list(model.state_dict())
        if compiled:
            assert compile_layers(model) == 4  # 2 encoder + 2 decoder layers
            assert list(model.state_dict()) == keys
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.item(), model.model.encoder.layers[0].fc1.weight.grad.clone()))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)


def test_store_without_validation_selects_on_test_and_says_so(tmp_path, cv_release, tiny_model_dir, caplog):
    from whisper_ft.train import run_training

    proc = run_cli("feature_pipeline.py", "--config", str(ROOT / "config.yaml"),
                   "--set", f"model.name_or_path={tiny_model_dir}", "--set", f"features.data_dir={tmp_path}",
                   "--set", "features.name=noval", "--set", f"features.sources.0.path={cv_release}",
                   "--set", "features.sources.0.validation_from=", "--workers", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gives no validation rows" in proc.stdout
    store = tmp_path / "features" / "noval"
    cfg = load_config(ROOT / "config.yaml", overrides(store, tiny_model_dir, tmp_path, max_steps=2, eval_steps=2,
                                                      save_steps=2, export_ctranslate2="false"))
    with caplog.at_level("WARNING", logger="whisper_ft.train"):
        summary = run_training(cfg)
    assert "no validation split" in caplog.text
    assert summary["selection_split"] == "test" and summary["best_step"] == 2
    # the zero-shot score and the first periodic check both ran on the test split at step 0
    assert summary["baseline"]["purpose"] == "report" and summary["selection_baseline"]["purpose"] == "selection"
    assert "the fine-tuned test WER is optimistic" in (tmp_path / "tiny" / "README.md").read_text()


@pytest.mark.parametrize("d_model, rate", [(384, 3.75e-5), (512, 2.5e-5), (768, 1.25e-5), (1024, 6.25e-6),
                                           (1280, 4.375e-6), (800, 1.25e-5)])
def test_auto_learning_rate_is_a_fortieth_of_pretraining_by_width(d_model, rate):
    assert auto_learning_rate(d_model) == pytest.approx(rate)


def test_schedule_resolves_auto_and_takes_warmup_as_a_fraction_unless_set():
    t = load_config(ROOT / "config.yaml", ["training.max_steps=60"]).training
    assert schedule(t, 512) == (pytest.approx(2.5e-5), 6)
    t = load_config(ROOT / "config.yaml", ["training.max_steps=60", "training.learning_rate=1e-5",
                                           "training.warmup_steps=500"]).training
    assert schedule(t, 512) == (1e-5, 500)


def test_a_rerun_compares_the_average_with_the_best_single_check_not_with_itself(tmp_path):
    """Killed after its average was exported as best/ (during the final test scoring, say), a
    rerun averages again: the single-check baseline comes from the log, not from best/; so does
    the bar a resumed run's new checks must beat to become best/."""
    from whisper_ft import checkpoints
    from whisper_ft.reruns import best_single_check
    from whisper_ft.trainer import EventLog

    (tmp_path / "best").mkdir()
    for step, wer in ((0, 0.9), (2, 0.6), (4, 0.55)):
        checkpoints.append_event(tmp_path, {"event": "eval", "split": "validation", "purpose": "selection",
                                            "step": step, "wer": wer})
    checkpoints.append_event(tmp_path, {"event": "eval", "split": "test", "purpose": "report", "step": 4, "wer": 0.1,
                                        "final": True})
    (tmp_path / "best" / "best.json").write_text(json.dumps({"step": 4, "wer": 0.55}))
    assert best_single_check(tmp_path)["wer"] == 0.55  # best/ is the best single check
    (tmp_path / "best" / "best.json").write_text(json.dumps({"step": 4, "wer": 0.5, "averaged_steps": [2, 4]}))
    assert (best_single_check(tmp_path)["step"], best_single_check(tmp_path)["wer"]) == (4, 0.55)
    assert EventLog(tmp_path, None, {}, "validation").best_score == 0.55


def _same_weights(folder: Path, saved: Path) -> bool:
    """Whether the model in `folder` has the weights of the safetensors file `saved` (tied copies aside)."""
    from safetensors.torch import load_file

    shipped, kept = load_file(str(folder / "model.safetensors")), load_file(str(saved))
    return all(torch.equal(tensor, kept[name].to(tensor.dtype)) for name, tensor in shipped.items())


def test_a_rerun_that_does_not_choose_the_average_ships_the_best_single_check(tmp_path, features_dir, tiny_model_dir,
                                                                              monkeypatch):
    """A finished run whose average won, rerun with averaging off, exports its best single check
    as best/ again (from averaging/, else from its checkpoint): best/, metrics.json, the final
    test score and the card describe that model, not the earlier average."""
    import whisper_ft.reruns as reruns
    import whisper_ft.train as train

    sets = overrides(features_dir, tiny_model_dir, tmp_path, eval_before_training="false", export_ctranslate2="false")
    run_dir = tmp_path / "tiny"

    def averaged_run():
        with monkeypatch.context() as m:
            m.setattr(reruns, "best_single_check", lambda *_: {})  # the average wins, whatever it scores
            train.run_training(load_config(ROOT / "config.yaml", [*sets, "training.average_checkpoints=2"]))
        assert json.loads((run_dir / "best" / "best.json").read_text())["averaged_steps"] == [2, 4]

    averaged_run()
    checks = [e for e in events(run_dir) if e["event"] == "eval" and e["purpose"] == "selection" and e["step"] > 0]
    single = min(checks, key=lambda e: e["wer"])  # the first of equals, as during training
    step = single["step"]
    for source in ("averaging", "checkpoint"):
        kept = run_dir / "averaging" / f"step-{step}.safetensors"
        weights = kept if source == "averaging" else run_dir / f"checkpoint-{step}" / "model.safetensors"
        summary = train.run_training(load_config(ROOT / "config.yaml", [*sets, "training.average_checkpoints=0"]))
        best = json.loads((run_dir / "best" / "best.json").read_text())
        assert "averaged_steps" not in best, source
        assert (best["step"], best["wer"], best["cer"]) == (step, single["wer"], single["cer"])
        assert _same_weights(run_dir / "best", weights), source
        assert (summary["best_step"], summary["best_wer"], summary["averaging"]) == (step, single["wer"], None)
        final = [e for e in events(run_dir) if e["event"] == "eval" and e.get("final")][-1]
        assert final["step"] == step and summary["wer"] == final["wer"]
        assert f"(WER {100 * single['wer']:.2f} at step {step})" in (run_dir / "README.md").read_text()
        assert f"| fine-tuned (best/, step {step}) |" in (run_dir / "README.md").read_text()
        if source == "averaging":  # once more, with the check's weights kept only in its checkpoint
            averaged_run()
            kept.unlink()


def test_an_average_not_chosen_again_is_refused_when_the_single_checks_weights_are_gone(tmp_path):
    """best/ holding an average the rerun does not ship, without the best single check's weights
    (neither in averaging/ nor a checkpoint), is a one-line error saying what to do, and best/
    is left as it is."""
    from whisper_ft.reruns import single_check_source
    from whisper_ft.train import drop_unchosen_average

    cfg = load_config(ROOT / "config.yaml", [f"training.output_dir={tmp_path}", "training.run_name=tiny"])
    run_dir = tmp_path / "tiny"
    (run_dir / "best").mkdir(parents=True)
    for step, wer in ((2, 0.6), (4, 0.7)):
        checkpoints.append_event(run_dir, {"event": "eval", "split": "validation", "purpose": "selection",
                                           "step": step, "wer": wer})
    info = {"step": 4, "wer": 0.5, "averaged_steps": [2, 4]}
    (run_dir / "best" / "best.json").write_text(json.dumps(info))
    assert single_check_source(run_dir, 2) is None
    drop_unchosen_average(cfg, run_dir, {}, {"chosen": True}, None, True)  # chosen again: nothing to do
    with pytest.raises(TrainingError, match=r"holds the average of the checks at steps \[2, 4\], which these "
                                            r"averaging settings do not ship, and the weights of its best single "
                                            r"check \(step 2\) are gone.*--fresh"):
        drop_unchosen_average(cfg, run_dir, {}, None, None, True)
    assert json.loads((run_dir / "best" / "best.json").read_text()) == info
    (run_dir / "averaging").mkdir()
    (run_dir / "averaging" / "step-2.safetensors").write_bytes(b"")
    assert single_check_source(run_dir, 2) == run_dir / "averaging" / "step-2.safetensors"


def test_select_metric_picks_best_the_kept_checkpoint_and_the_average_by_that_score(tmp_path, features_dir,
                                                                                   tiny_model_dir, capsys):
    """training.select_metric: cer makes the lowest-CER check best/ (here the checks tie on WER, so
    WER would keep the first), the checkpoint rotation's best and the `best` averaging mode's
    choice, compares the average in CER, and the card says so."""
    from whisper_ft.train import run_training

    sets = overrides(features_dir, tiny_model_dir, tmp_path, seed=3, generation_max_length=20, select_metric="cer",
                     average_checkpoints=2, average_mode="best", eval_before_training="false",
                     export_ctranslate2="false")
    summary = run_training(load_config(ROOT / "config.yaml", sets))
    run_dir = tmp_path / "tiny"
    checks = [e for e in events(run_dir) if e["event"] == "eval" and e["purpose"] == "selection" and e["step"] > 0]
    by_cer = min(checks, key=lambda e: e["cer"])
    assert by_cer != min(checks, key=lambda e: e["wer"])  # the two metrics choose differently on this run
    best = json.loads((run_dir / "best" / "best.json").read_text())
    avg = summary["averaging"]
    assert (avg["metric"], avg["single_step"], avg["single_score"]) == ("cer", by_cer["step"], by_cer["cer"])
    assert avg["chosen"] == (avg["score"] < by_cer["cer"]) and avg["score"] == avg["cer"]
    if not avg["chosen"]:
        assert (best["step"], best["cer"], best["wer"]) == (by_cer["step"], by_cer["cer"], by_cer["wer"])
    assert (summary["select_metric"], summary["best_score"], summary["best_wer"]) == ("cer", best["cer"], best["wer"])
    candidates = json.loads((run_dir / "averaging" / "candidates.json").read_text())["scores"]
    assert candidates == {str(e["step"]): e["cer"] for e in checks}
    state = json.loads((run_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert (state["best_global_step"], state["best_metric"]) == (by_cer["step"], by_cer["cer"])
    card = (run_dir / "README.md").read_text()
    assert (f"chosen on the validation split by CER (CER {100 * best['cer']:.2f}, WER {100 * best['wer']:.2f} at "
            f"step {best['step']})") in card
    assert f"validation CER {100 * avg['score']:.2f} against {100 * by_cer['cer']:.2f} for the best single check" in card
    import training_pipeline

    capsys.readouterr()
    training_pipeline.print_summary(summary)
    assert (f"best validation WER {100 * best['wer']:.2f}% at step {best['step']} (chosen by CER: "
            f"{100 * best['cer']:.2f}%); test split") in capsys.readouterr().out


def test_a_finished_run_rerun_with_another_max_steps_names_the_schedule_it_trained_on(tmp_path, caplog):
    """A run stopped at step 4 of a schedule towards 6, finished with max_steps 3, then rerun with 4."""
    from whisper_ft.config import save_config
    from whisper_ft.reruns import check_resumable

    resume = tmp_path / "checkpoint-4"
    resume.mkdir()
    (resume / "trainer_state.json").write_text(json.dumps({"global_step": 4, "max_steps": 6}))
    save_config(load_config(ROOT / "config.yaml", ["training.max_steps=3"]), tmp_path / "config.yaml")
    with caplog.at_level(logging.INFO, logger="whisper_ft"):
        check_resumable(load_config(ROOT / "config.yaml", ["training.max_steps=4"]), tmp_path, resume, 4)
    assert ("training.max_steps changed from 3 to 4: no training left after step 4, trained on the schedule towards 6"
            in caplog.text)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="whisper_ft"):
        check_resumable(load_config(ROOT / "config.yaml", ["training.max_steps=8"]), tmp_path, resume, 4)
    assert "changed from 3 to 8: the learning-rate schedule runs to the new end from here" in caplog.text


def test_a_run_configured_with_a_language_name_resumes_with_its_code(tmp_path):
    """Names ("swedish") were taken before model.language had to be a code: such a run resumes
    with the code, and still not with another language."""
    import yaml

    from whisper_ft.config import save_config
    from whisper_ft.reruns import check_resumable

    save_config(load_config(ROOT / "config.yaml"), tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    saved["model"]["language"] = "Swedish"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    check_resumable(load_config(ROOT / "config.yaml"), tmp_path, tmp_path / "checkpoint-2", 2)
    with pytest.raises(TrainingError, match=r"model.language 'sv' -> 'no'"):
        check_resumable(load_config(ROOT / "config.yaml", ["model.language=no"]), tmp_path, tmp_path / "checkpoint-2", 2)


def test_a_resume_over_a_hand_damaged_run_config_is_a_one_line_error_saying_what_to_do(tmp_path):
    from whisper_ft.config import ConfigError
    from whisper_ft.reruns import check_resumable

    advice = "; restore the file, or pass --fresh to start the run over"
    (tmp_path / "config.yaml").write_text("training:\n  max_steps: [4000\n")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'config.yaml'} is not valid YAML") + ".*" +
                       re.escape(advice) + "$"):
        check_resumable(load_config(ROOT / "config.yaml"), tmp_path, tmp_path / "checkpoint-2", 2)
    (tmp_path / "config.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections, got list" + re.escape(advice) + "$"):
        check_resumable(load_config(ROOT / "config.yaml"), tmp_path, tmp_path / "checkpoint-2", 2)
    (tmp_path / "config.yaml").write_text("")  # which would pass any change
    with pytest.raises(ConfigError, match="config.yaml is empty: the settings the run was trained with are gone" +
                       re.escape(advice) + "$"):
        check_resumable(load_config(ROOT / "config.yaml", ["training.learning_rate=1e-3"]), tmp_path,
                        tmp_path / "checkpoint-2", 2)


@pytest.mark.parametrize("section, key", [("lora", "rank=8"), ("spec_augment", "mask_time_length=20")])
def test_a_resume_refuses_changed_lora_or_spec_augment_settings_only_where_they_are_on(tmp_path, section, key):
    from whisper_ft.config import save_config
    from whisper_ft.reruns import check_resumable

    resume = tmp_path / "checkpoint-2"
    config = lambda *sets: load_config(ROOT / "config.yaml", [f"training.{section}.{s}" for s in sets])  # noqa: E731
    save_config(config(), tmp_path / "config.yaml")
    check_resumable(config(key), tmp_path, resume, 2)  # off: its settings change nothing
    with pytest.raises(TrainingError, match=rf"training.{section} .*'enabled': False.* -> .*'enabled': True"):
        check_resumable(config("enabled=true"), tmp_path, resume, 2)
    save_config(config("enabled=true"), tmp_path / "config.yaml")
    check_resumable(config("enabled=true"), tmp_path, resume, 2)
    with pytest.raises(TrainingError, match=rf"with other settings \(training.{section} "):
        check_resumable(config("enabled=true", key), tmp_path, resume, 2)


def test_a_resume_with_another_select_metric_is_refused(tmp_path):
    """best/ and the kept checks were chosen by the run's select_metric; a run whose config.yaml
    predates the key chose by WER."""
    import yaml

    from whisper_ft.config import save_config
    from whisper_ft.reruns import check_resumable

    resume = tmp_path / "checkpoint-2"
    save_config(load_config(ROOT / "config.yaml", ["training.select_metric=cer"]), tmp_path / "config.yaml")
    check_resumable(load_config(ROOT / "config.yaml", ["training.select_metric=cer"]), tmp_path, resume, 2)
    with pytest.raises(TrainingError, match=r"training.select_metric 'cer' -> 'wer'"):
        check_resumable(load_config(ROOT / "config.yaml"), tmp_path, resume, 2)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["training"]["select_metric"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    check_resumable(load_config(ROOT / "config.yaml"), tmp_path, resume, 2)
    with pytest.raises(TrainingError, match=r"training.select_metric 'wer' -> 'wer_normalized'"):
        check_resumable(load_config(ROOT / "config.yaml", ["training.select_metric=wer_normalized"]), tmp_path,
                        resume, 2)


def test_a_run_without_a_checkpoint_starts_over_without_the_earlier_best(tiny_run, tmp_path, monkeypatch):
    """A run stopped before its first checkpoint was complete left best/ behind (here cut off
    between its two renames): rerun with the same settings, it starts over without it (it must
    not stand against the new checks); with other settings it is refused rather than deleted,
    and so is a finished run whose checkpoints were deleted."""
    import whisper_ft.train as train

    run_dir, *_ = tiny_run
    copy = tmp_path / "tiny"
    shutil.copytree(run_dir, copy)
    for folder in copy.glob("checkpoint-*"):
        shutil.rmtree(folder)
    cfg = load_config(copy / "config.yaml", [f"training.output_dir={tmp_path}"])
    with pytest.raises(TrainingError, match="is a finished run with no checkpoint left.*--push-only"):
        train.run_training(cfg)
    assert (copy / "best").is_dir()

    (copy / "metrics.json").unlink()  # stopped early: no summary was written
    (copy / "best").rename(copy / ".best.tmp-123")  # killed between the renames of its export
    with pytest.raises(TrainingError, match="holds a best/ model trained with other settings.*learning_rate"):
        train.run_training(load_config(copy / "config.yaml", [f"training.output_dir={tmp_path}",
                                                              "training.learning_rate=5e-4"]))
    assert (copy / "best").is_dir()  # put back, not deleted

    def stop(*_args):
        raise RuntimeError("stopped after the start")

    monkeypatch.setattr(train, "load_data", stop)
    with pytest.raises(RuntimeError, match="stopped after the start"):
        train.run_training(cfg)
    assert not (copy / "best").exists() and not (copy / "averaging").exists()


def test_a_longer_resumed_run_keeps_its_warmup(tmp_path):
    """warmup_steps null makes the warm-up a fraction of max_steps; resumed with more steps, the
    run keeps the warm-up it started with rather than warming up again."""
    from whisper_ft.reruns import first_warmup

    checkpoints.append_event(tmp_path, {"event": "start", "step": 0, "warmup_steps": 400})
    checkpoints.append_event(tmp_path, {"event": "start", "step": 2000, "warmup_steps": 600})
    longer = load_config(ROOT / "config.yaml", ["training.max_steps=6000"])
    assert longer.training.warmup_steps is None and first_warmup(longer, tmp_path) == 400
    assert first_warmup(load_config(ROOT / "config.yaml", ["training.warmup_steps=50"]), tmp_path) is None


def test_a_resume_on_another_number_of_processes_is_refused(tmp_path, monkeypatch):
    """Checkpointed on 2 processes, resumed on 1: the effective batch would halve, so it is
    refused while there is training left; with as many processes, or nothing left to train, it
    goes on."""
    from whisper_ft.config import save_config
    from whisper_ft.reruns import check_resumable

    cfg = load_config(ROOT / "config.yaml", ["training.max_steps=12"])
    save_config(cfg, tmp_path / "config.yaml")
    checkpoints.append_event(tmp_path, {"event": "start", "step": 0, "world_size": 2})
    resume = tmp_path / "checkpoint-9"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(TrainingError, match=r"trained to checkpoint-9 on 2 process\(es\), this run has 1.*run it on 2"):
        check_resumable(cfg, tmp_path, resume, 9)
    check_resumable(cfg, tmp_path, resume, 12)  # only the final evaluation left
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_resumable(cfg, tmp_path, resume, 9)
    # finished at 9 on 1 process (a start that trained nothing): what trained up to checkpoint-9 counts
    checkpoints.append_event(tmp_path, {"event": "start", "step": 9, "resumed_from": "checkpoint-9", "world_size": 1})
    check_resumable(cfg, tmp_path, resume, 9)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(TrainingError, match=r"on 2 process\(es\), this run has 1"):
        check_resumable(cfg, tmp_path, resume, 9)


def test_fresh_deletes_the_run_only_once_its_data_and_model_load(tmp_path, features_dir, tiny_model_dir):
    from whisper_ft.features import FeaturesError
    from whisper_ft.train import run_training

    run_dir = tmp_path / "tiny"
    (run_dir / "best").mkdir(parents=True)
    sets = overrides(features_dir, tiny_model_dir, tmp_path)
    with pytest.raises(FeaturesError):
        run_training(load_config(ROOT / "config.yaml", [*sets, "features.name=no-such-store"]), fresh=True)
    with pytest.raises(Exception, match="no-such-model"):
        run_training(load_config(ROOT / "config.yaml", [*sets, f"model.name_or_path={tmp_path / 'no-such-model'}"]),
                     fresh=True)
    assert (run_dir / "best").is_dir()


def test_a_run_resumed_longer_trains_its_next_step_at_the_new_schedules_rate(tmp_path, features_dir, tiny_model_dir):
    """Finished at step 2 of 2 (linear decay: the optimizer's rate is 0 there), resumed to 4:
    step 3 trains at the new schedule's rate for step 2 (half the peak), not at the old end's."""
    from transformers import TrainerCallback

    from whisper_ft.train import run_training

    class Rates(TrainerCallback):
        seen: dict = {}

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            self.seen[state.global_step + 1] = optimizer.param_groups[0]["lr"]

    sets = overrides(features_dir, tiny_model_dir, tmp_path, max_steps=2, eval_steps=2, save_steps=2,
                     eval_before_training="false", export_ctranslate2="false", lr_scheduler="linear")
    run_training(load_config(ROOT / "config.yaml", sets))
    rates = Rates()
    run_training(load_config(ROOT / "config.yaml", [*sets, "training.max_steps=4"]), callbacks=[rates])
    assert rates.seen[3] == pytest.approx(1e-3 * 2 / 4) and rates.seen[4] == pytest.approx(1e-3 * 1 / 4)


def _rebuilt_copy(features_dir: Path, name: str) -> Path:
    """A copy of the fixture store; `_rebuild` then changes it as `--overwrite` with other sources would."""
    other = features_dir.parent / name
    shutil.rmtree(other, ignore_errors=True)
    shutil.copytree(features_dir, other)
    return other


def _rebuild(store: Path) -> None:
    """The store rebuilt under its name from fewer training rows: another plan, one training shard."""
    (store / "plan.json").write_text(json.dumps({"fingerprint": "another build", "settings": {}}))
    manifest = json.loads((store / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    first = json.loads((store / train["shards"][0] / "stats.json").read_text())
    manifest["splits"]["train"] = {**train, "clips": first["clips"], "shards": train["shards"][:1]}
    (store / "manifest.json").write_text(json.dumps(manifest))


def test_a_resume_on_a_rebuilt_store_is_refused(tmp_path, features_dir, tiny_model_dir):
    """The same features.name rebuilt with other clips (--overwrite) after the run started: its
    checkpoint's data order, token cap and best/ belong to the old store, so a resume is refused;
    a run whose start predates the record of its stores still resumes."""
    from whisper_ft.config import save_config
    from whisper_ft.reruns import check_resumable
    from whisper_ft.train import run_training

    store = _rebuilt_copy(features_dir, "fixture-rebuilt")
    try:
        sets = overrides(store, tiny_model_dir, tmp_path, max_steps=2, eval_steps=2, save_steps=2,
                         eval_before_training="false", export_ctranslate2="false")
        run_training(load_config(ROOT / "config.yaml", sets))
        _rebuild(store)
        with pytest.raises(TrainingError, match=r"trained to checkpoint-2 on features fixture-rebuilt \(features.name\) "
                                                r"as they were built then; they were rebuilt since \(training clips "
                                                r"27 -> 16\): pass --fresh"):
            run_training(load_config(ROOT / "config.yaml", [*sets, "training.max_steps=4"]))
        assert [s for s, _ in checkpoints.checkpoints(tmp_path / "tiny")] == [2]

        old = tmp_path / "old"  # started before the stores were recorded
        old.mkdir()
        cfg = load_config(ROOT / "config.yaml", sets)
        save_config(cfg, old / "config.yaml")
        checkpoints.append_event(old, {"event": "start", "step": 0, "world_size": 1})
        check_resumable(cfg, old, old / "checkpoint-2", 2)
    finally:
        shutil.rmtree(store)


def test_a_resumed_run_checks_saves_and_logs_at_its_new_cadence(tmp_path, features_dir, tiny_model_dir):
    """The checkpoint's trainer state carries the cadence it was saved with; a resume with other
    eval_steps, save_steps and logging_steps follows the new ones."""
    from whisper_ft.train import run_training

    sets = overrides(features_dir, tiny_model_dir, tmp_path, max_steps=2, eval_steps=2, save_steps=2, logging_steps=1,
                     eval_before_training="false", export_ctranslate2="false")
    run_training(load_config(ROOT / "config.yaml", sets))
    summary = run_training(load_config(ROOT / "config.yaml", [*sets, "training.max_steps=6", "training.eval_steps=3",
                                                              "training.save_steps=3", "training.logging_steps=3"]))
    # the Trainer's runtime and loss are the last session's, and the card says so
    assert summary["train_sessions"] == 2
    assert "s in the last of its 2 training sessions (resumed)." in (tmp_path / "tiny" / "README.md").read_text()
    log = events(tmp_path / "tiny")
    resumed = log[[i for i, e in enumerate(log) if e["event"] == "start"][1]:]
    assert [e["step"] for e in resumed if e["event"] == "eval" and e["purpose"] == "selection"] == [3, 6]
    assert [e["step"] for e in resumed if e["event"] == "checkpoint"] == [3, 6]
    assert [e["step"] for e in resumed if e["event"] == "train"] == [3, 6]


def test_a_resumed_run_checks_the_eval_subset_it_started_with(tmp_path):
    """The eval_subset draw is recorded in the start event; a run started when the draw followed
    training.seed keeps its clips when resumed."""
    from whisper_ft.reruns import EVAL_SUBSET_SEED, eval_subset_seed

    cfg = load_config(ROOT / "config.yaml", ["training.seed=7"])
    assert eval_subset_seed(cfg, tmp_path) == EVAL_SUBSET_SEED  # a new run
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    checkpoints.append_event(old, {"event": "start", "step": 0})
    assert eval_subset_seed(cfg, old) == 7
    checkpoints.append_event(new, {"event": "start", "step": 0, "eval_subset_seed": EVAL_SUBSET_SEED})
    assert eval_subset_seed(cfg, new) == EVAL_SUBSET_SEED


def test_a_resume_naming_the_eval_store_it_defaulted_to_goes_on(tmp_path):
    """training.eval_features empty reads features.name: naming that store on resume changes
    nothing and is not refused; naming another is."""
    from whisper_ft.config import save_config
    from whisper_ft.reruns import check_resumable

    cfg = load_config(ROOT / "config.yaml", ["features.name=cv-sv"])
    save_config(cfg, tmp_path / "config.yaml")
    resume = tmp_path / "checkpoint-2"
    check_resumable(load_config(ROOT / "config.yaml", ["features.name=cv-sv", "training.eval_features=cv-sv"]),
                    tmp_path, resume, 2)
    with pytest.raises(TrainingError, match=r"training.eval_features 'cv-sv' -> 'other'"):
        check_resumable(load_config(ROOT / "config.yaml", ["features.name=cv-sv", "training.eval_features=other"]),
                        tmp_path, resume, 2)


def test_a_failed_ctranslate2_export_warns_unless_the_disk_is_full(tmp_path, monkeypatch, caplog):
    """The app falls back to transformers without the export, so a failure only warns; but on a
    full disk the reports that follow cannot be written either: the run stops with one line."""
    import errno

    from whisper_ft import ct2
    from whisper_ft.train import export_ct2

    def fails(error):
        def export(model_dir):
            raise error
        return export

    monkeypatch.setattr(ct2, "export", fails(OSError(errno.EIO, "Input/output error")))
    export_ct2(tmp_path)
    assert "CTranslate2 export of" in caplog.text and "falls back to transformers" in caplog.text
    monkeypatch.setattr(ct2, "export", fails(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError, match="No space"):
        export_ct2(tmp_path)
    assert cli_run(lambda argv: export_ct2(tmp_path), []) == 2


def test_the_summary_names_the_best_model_by_its_whole_path(monkeypatch, tmp_path, capsys):
    import training_pipeline

    monkeypatch.chdir(tmp_path)
    training_pipeline.print_summary({"baseline": {"wer": 0.3}, "select_metric": "wer", "best_wer": 0.2, "best_step": 4,
                                     "selection_split": "validation", "steps": 4, "eval_clips": 10, "wer": 0.21,
                                     "wer_normalized": 0.15, "cer": 0.08, "run_dir": "checkpoints/tiny"})
    out = capsys.readouterr().out
    assert out.startswith("done: 4 steps; best validation WER 20.00% at step 4; test split (10 clips): WER 21.00%")
    assert out.endswith(f"best model: {tmp_path / 'checkpoints' / 'tiny' / 'best'}\n")


def test_best_is_never_the_zero_shot_check_and_a_tie_keeps_the_earlier_check(tmp_path, monkeypatch):
    """The step-0 check scores the untouched base model: exporting it as best/ would ship the
    base model as the fine-tuned one, however well it scored. A later check that only ties the
    best so far is no improvement: best/ stays the earlier check."""
    from types import SimpleNamespace

    from whisper_ft.trainer import EventLog

    exported = []
    monkeypatch.setattr(checkpoints, "export_best",
                        lambda model, processor, run_dir, info: exported.append(info["step"]))
    callback = EventLog(tmp_path, None, {}, "validation")
    for step, wer in ((0, 0.1), (2, 0.5), (4, 0.5), (6, 0.4), (8, 0.4), (10, float("nan"))):
        state = SimpleNamespace(global_step=step, is_world_process_zero=True)
        callback.on_evaluate(None, state, None, metrics={"eval_wer": wer}, model=None)
    assert exported == [2, 6] and callback.best_score == 0.4


def test_the_best_single_check_after_an_average_is_never_the_zero_shot_check(tmp_path):
    """A rerun compares its average with the best single check: the base model's step-0 score
    is no check of this run's training, even when it is the lowest in the log."""
    from whisper_ft.reruns import best_single_check

    (tmp_path / "best").mkdir()
    for step, wer in ((0, 0.2), (2, 0.6), (4, 0.55)):
        checkpoints.append_event(tmp_path, {"event": "eval", "split": "validation", "purpose": "selection",
                                            "step": step, "wer": wer})
    (tmp_path / "best" / "best.json").write_text(json.dumps({"step": 4, "wer": 0.5, "averaged_steps": [2, 4]}))
    best = best_single_check(tmp_path)
    assert (best["step"], best["wer"]) == (4, 0.55)


def test_a_resume_keeps_the_averaging_weights_of_the_check_at_its_own_step(tmp_path):
    """Resuming from checkpoint-4 forgets only the checks after step 4: the check at step 4
    itself was made on the weights the run resumes with, and stays an averaging candidate."""
    from whisper_ft import averaging
    from whisper_ft.reruns import rewind

    folder = tmp_path / averaging.FOLDER
    folder.mkdir(parents=True)
    index = {2: 0.5, 4: 0.4, 6: 0.3}
    for step in index:
        averaging.weights_path(folder, step).write_bytes(b"weights")
    averaging.write_index(folder, index, "last")
    rewind(load_config(ROOT / "config.yaml"), tmp_path, 4, {}, None)
    assert averaging.read_index(folder) == {s: v for s, v in index.items() if s <= 4}
    assert [averaging.weights_path(folder, s).is_file() for s in index] == [True, True, False]


@pytest.mark.parametrize("role, key", [("train", "features.name"), ("held_out", "training.eval_features")])
def test_a_resume_on_a_rebuilt_training_or_held_out_store_is_refused(tmp_path, monkeypatch, role, key):
    """The validation and test store named by training.eval_features rebuilt since the run
    started: best/'s validation score and the kept checks belong to the old one, so a resume
    is refused as for a rebuilt training store."""
    from whisper_ft import reruns

    def identity(name, fingerprint, clips):
        return {"name": name, "fingerprint": fingerprint, "clips": {"train": clips, "validation": clips, "eval": clips}}

    before = {"train": identity("cv-sv", "a", 20), "held_out": identity("cv-sv-eval", "b", 10)}
    checkpoints.append_event(tmp_path, {"event": "start", "step": 0, "world_size": 1, "stores": before})
    cfg = load_config(ROOT / "config.yaml", ["features.name=cv-sv", "training.eval_features=cv-sv-eval"])
    monkeypatch.setattr(reruns, "store_identities", lambda cfg: before)
    reruns.check_same_stores(cfg, tmp_path, tmp_path / "checkpoint-2")  # unchanged: goes on
    after = {**before, role: identity(before[role]["name"], "rebuilt", 5)}
    monkeypatch.setattr(reruns, "store_identities", lambda cfg: after)
    with pytest.raises(TrainingError, match=rf"on features {before[role]['name']} \({re.escape(key)}\) as they were "
                                            "built then; they were rebuilt since"):
        reruns.check_same_stores(cfg, tmp_path, tmp_path / "checkpoint-2")


# The plain-valued settings a resumed run must keep, written out here so that a key dropped from
# reruns.FIXED_ON_RESUME fails its case (training.lora and training.spec_augment have their own test).
PLAIN_FIXED_ON_RESUME = (
    "model.name_or_path", "model.language", "model.task", "features.name", "training.eval_features",
    "training.learning_rate", "training.lr_scheduler", "training.warmup_steps", "training.warmup_fraction",
    "training.batch_size", "training.gradient_accumulation_steps", "training.weight_decay", "training.seed",
    "training.dropout", "training.freeze_encoder", "training.eval_subset", "training.generation_max_length",
    "training.num_beams", "training.select_metric",
)


@pytest.mark.parametrize("key", PLAIN_FIXED_ON_RESUME)
def test_a_resume_with_any_fixed_setting_changed_is_refused(tmp_path, key):
    """Each of these is restored from the checkpoint or defines the run's trajectory (the
    effective batch, the decay, the data order): a resume that changed one silently would mix
    two runs. The run's config.yaml is changed here, as if the run had been trained with it."""
    import yaml

    from whisper_ft.config import lookup, save_config, to_dict
    from whisper_ft.reruns import check_resumable

    cfg = load_config(ROOT / "config.yaml")
    save_config(cfg, tmp_path / "config.yaml")
    resume = tmp_path / "checkpoint-2"
    check_resumable(cfg, tmp_path, resume, 2)  # the same settings: goes on
    now = lookup(to_dict(cfg), key)
    other = (not now if isinstance(now, bool) else now + 1 if isinstance(now, (int, float)) else
             7 if now is None else f"{now}-other")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    section, name = key.split(".")
    saved[section][name] = other
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(TrainingError, match=rf"with other settings \({re.escape(key)} {re.escape(repr(other))} -> "):
        check_resumable(cfg, tmp_path, resume, 2)


def test_a_half_written_best_replacement_is_not_put_in_place(tmp_path):
    """Killed while staging a new best/ (no best.json yet) with no best/ in place: the staging
    folder is removed, not renamed to best/, which would ship weights cut short."""
    (tmp_path / ".best.tmp-97").mkdir()
    (tmp_path / ".best.tmp-97" / "model.safetensors").write_text("half")
    assert [p.name for p in checkpoints.remove_leftovers(tmp_path)] == [".best.tmp-97"]
    assert not (tmp_path / "best").exists() and not list(tmp_path.iterdir())
