"""Sweeps: trial planning, fair budgets, resume, pruning and the report.

Most tests drive the sweep with a scripted trainer that follows `run_training`'s contract
(metrics.jsonl in the run folder, callbacks called at each evaluation) so that the sweep
logic is checked in seconds; one test runs real trainings on the tiny model.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from whisper_ft.config import ConfigError, load_config
from whisper_ft.sweep import load_spec, make_study, read_trials, run_sweep

ROOT = Path(__file__).resolve().parents[1]


def write_spec(tmp_path: Path, **spec) -> Path:
    path = tmp_path / f"{spec.pop('file', 'sw')}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class ScriptedTrainer:
    """Stands in for run_training: WER follows `wer_of(params, step)`; records every call. A
    run folder with checks already resumes after the last one (as from a checkpoint saved at
    each check), with those checks in the Trainer's log history. `kill_at` (run name, step)
    stops the process after that check, or with step None in the final phase."""

    def __init__(self, wer_of, crash_on: int | None = None, kill_at: tuple[str, int | None] | None = None):
        self.wer_of = wer_of
        self.crash_on = crash_on
        self.kill_at = kill_at
        self.calls: list[tuple[str, float]] = []
        self.max_steps: list[int] = []

    def _kill(self, run_name: str, step: int | None) -> None:
        if self.kill_at == (run_name, step):
            self.kill_at = None
            raise KeyboardInterrupt

    def __call__(self, cfg, callbacks=()):
        t = cfg.training
        run = Path(t.output_dir) / t.run_name
        run.mkdir(parents=True, exist_ok=True)
        self.calls.append((t.run_name, t.learning_rate))
        self.max_steps.append(t.max_steps)
        if self.crash_on is not None and len(self.calls) == self.crash_on:
            self.crash_on = None
            raise KeyboardInterrupt  # the process is killed mid-trial
        log = run / "metrics.jsonl"
        history = [{"eval_wer": e["wer"], "step": e["step"]}
                   for e in map(json.loads, log.read_text().splitlines() if log.is_file() else [])]
        control = SimpleNamespace(should_training_stop=False)
        best = 1e9
        step = history[-1]["step"] if history else 0
        with open(log, "a") as f:
            for step in range(step + t.eval_steps if history else 0, t.max_steps + 1, t.eval_steps):
                wer = self.wer_of(t, step) / 100  # metrics.jsonl holds fractions
                best = min(best, wer) if step else best
                f.write(json.dumps({"event": "eval", "step": step, "wer": wer, "wer_normalized": wer * 0.9,
                                    "cer": wer / 2}) + "\n")
                f.flush()
                history.append({"eval_wer": wer, "step": step})
                for cb in callbacks:
                    cb.on_evaluate(None, SimpleNamespace(global_step=step, log_history=history), control,
                                   metrics={"eval_wer": wer})
                self._kill(t.run_name, step)
                if control.should_training_stop:
                    break
        self._kill(t.run_name, None)
        return {"best_wer": best, "best_step": step, "steps": step}


def base_config(tmp_path: Path):
    return load_config(ROOT / "config.yaml", [f"training.output_dir={tmp_path / 'ck'}"])


def test_grid_2x2_runs_every_trial_and_writes_table_and_plot(tmp_path):
    spec = load_spec(write_spec(tmp_path, method="grid", budget_samples=64, eval_every_samples=32, prune=False,
                                space={"training.learning_rate": [1e-5, 1e-4], "training.batch_size": [8, 16]}))
    trainer = ScriptedTrainer(lambda t, step: 100 - step * t.learning_rate * 1e3)
    folder = run_sweep(spec, base_config(tmp_path), str(ROOT / "config.yaml"), [f"training.output_dir={tmp_path / 'ck'}"],
                       trainer, log=lambda s: None)
    trials = read_trials(folder)
    assert sorted((t["params"]["training.learning_rate"], t["params"]["training.batch_size"]) for t in trials) == \
        [(1e-5, 8), (1e-5, 16), (1e-4, 8), (1e-4, 16)]
    # fair budget: the same samples for every batch size, evaluated at the same sample counts
    for t in trials:
        assert t["max_steps"] * t["samples_per_step"] == 64
        assert [e["step"] * t["samples_per_step"] for e in t["evals"]] == [0, 32, 64]
    report = (folder / "report.md").read_text()
    assert "Winner: trial" in report and report.count("| complete |") == 4
    winner = re.search(r"Winner: trial (\d+)", report).group(1)
    best = min(trials, key=lambda t: min(e["wer"] for e in t["evals"] if e["step"]))
    assert int(winner) == best["number"] and best["params"]["training.learning_rate"] == 1e-4
    assert (folder / "wer.png").stat().st_size > 5000


def test_trials_that_tie_have_no_winner(tmp_path):
    spec = load_spec(write_spec(tmp_path, method="grid", budget_samples=32, eval_every_samples=16, prune=False,
                                space={"training.learning_rate": [1e-5, 1e-4, 1e-3]}))
    scripted = ScriptedTrainer(lambda t, step: 40.0 if t.learning_rate < 1e-3 else 60.0)
    folder = run_sweep(spec, base_config(tmp_path), str(ROOT / "config.yaml"), [f"training.output_dir={tmp_path}"],
                       scripted, log=lambda s: None)
    report = (folder / "report.md").read_text()
    assert "Winner" not in report
    assert ("**No winner: trials 0, 1 tie** at wer 40.00% (learning_rate=1e-05; learning_rate=0.0001): this sweep "
            "cannot tell them apart.") in report


def test_a_trial_whose_average_was_shipped_is_ranked_by_the_average(tmp_path):
    """With checkpoint averaging, best/ may hold the average of checks, chosen on validation
    as a check is: the trial ranks by it (and the table says so), as the test column reports it."""
    spec = load_spec(write_spec(tmp_path, method="grid", budget_samples=32, eval_every_samples=16, prune=False,
                                space={"training.learning_rate": [1e-5, 1e-4]}))
    scripted = ScriptedTrainer(lambda t, step: 40.0 if t.learning_rate == 1e-5 else 45.0)

    def trainer(cfg, callbacks=()):
        result = scripted(cfg, callbacks)
        run = Path(cfg.training.output_dir) / cfg.training.run_name
        if cfg.training.learning_rate == 1e-4:  # its average beats every check of both trials
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"event": "average", "split": "validation", "step": 2, "wer": 0.3,
                                    "wer_normalized": 0.27, "cer": 0.15, "averaged_steps": [1, 2]}) + "\n")
            (run / "best").mkdir()
            (run / "best" / "best.json").write_text(json.dumps({"step": 2, "wer": 0.3, "averaged_steps": [1, 2]}))
        return result

    folder = run_sweep(spec, base_config(tmp_path), str(ROOT / "config.yaml"), [f"training.output_dir={tmp_path}"],
                       trainer, log=lambda s: None)
    report = (folder / "report.md").read_text()
    assert "**Winner: trial 1** (learning_rate=0.0001): wer 30.00%, 10.00 points better" in report
    assert "| 30.00 | 27.00 | 15.00 | average of 1, 2 |" in report
    assert make_study(spec, folder).best_trial.number == 1


def test_the_test_column_is_the_orthographic_wer_of_best(tmp_path):
    """The table's test WER is the orthographic one of the trial's best/ on the test split, as
    its validation WER column is: the normalized figure, lower, read as if it were that."""
    spec = load_spec(write_spec(tmp_path, method="grid", budget_samples=32, eval_every_samples=16, prune=False,
                                space={"training.learning_rate": [1e-5]}))
    scripted = ScriptedTrainer(lambda t, step: 40.0)
    test = {"wer": 0.25, "wer_normalized": 0.2, "cer": 0.1}  # best/ on the test split, as run_training says

    def trainer(cfg, callbacks=()):
        return {**scripted(cfg, callbacks), **test}

    folder = run_sweep(spec, base_config(tmp_path), str(ROOT / "config.yaml"), [f"training.output_dir={tmp_path}"],
                       trainer, log=lambda s: None)
    header, _, row = [line.strip("|").split("|") for line in (folder / "report.md").read_text().splitlines()
                      if line.startswith("|")]
    cells = dict(zip((c.strip() for c in header), (c.strip() for c in row)))
    assert cells["test WER %"] == f"{100 * test['wer']:.2f}"


def test_random_search_with_a_seed_is_reproducible(tmp_path):
    space = {"training.learning_rate": {"low": 1e-6, "high": 1e-3, "log": True}, "training.warmup_steps": [0, 50, 100]}
    params = []
    for run in ("a", "b"):
        spec = load_spec(write_spec(tmp_path, file="rs", method="random", trials=3, seed=7, budget_samples=32,
                                    eval_every_samples=32, space=space))
        out = tmp_path / run
        trainer = ScriptedTrainer(lambda t, step: 50.0)
        folder = run_sweep(spec, load_config(ROOT / "config.yaml", [f"training.output_dir={out}"]),
                           str(ROOT / "config.yaml"), [f"training.output_dir={out}"], trainer, log=lambda s: None)
        params.append([t["params"] for t in read_trials(folder)])
    assert params[0] == params[1]
    assert len({p["training.learning_rate"] for p in params[0]}) == 3


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_a_resumed_search_draws_what_an_uninterrupted_one_would(tmp_path, method):
    """Killed during its third trial and rerun, a seeded search goes on where it was: no trial
    repeats an earlier one's values."""
    space = {"training.learning_rate": {"low": 1e-6, "high": 1e-3, "log": True}}
    drawn = []
    for run, crash_on in (("whole", None), ("killed", 3)):
        spec = load_spec(write_spec(tmp_path, file=f"s{method}", method=method, trials=5, seed=7, budget_samples=32,
                                    eval_every_samples=32, prune=False, space=space))
        out = [f"training.output_dir={tmp_path / run}"]
        trainer = ScriptedTrainer(lambda t, step: 50.0 + 1e4 * t.learning_rate, crash_on=crash_on)
        args = (spec, load_config(ROOT / "config.yaml", out), str(ROOT / "config.yaml"), out, trainer)
        if crash_on:
            with pytest.raises(KeyboardInterrupt):
                run_sweep(*args, log=lambda s: None)
        folder = run_sweep(*args, log=lambda s: None)
        drawn.append([t["params"]["training.learning_rate"] for t in read_trials(folder)])
    assert drawn[1] == drawn[0] and len(set(drawn[0])) == 5


def test_killed_search_resumes_without_rerunning_finished_trials(tmp_path):
    spec = load_spec(write_spec(tmp_path, method="grid", budget_samples=32, eval_every_samples=16, prune=False,
                                space={"training.learning_rate": [1e-5, 2e-5, 3e-5]}))
    overrides = [f"training.output_dir={tmp_path / 'ck'}"]
    trainer = ScriptedTrainer(lambda t, step: 40.0, crash_on=2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, base_config(tmp_path), str(ROOT / "config.yaml"), overrides, trainer, log=lambda s: None)
    assert len(trainer.calls) == 2
    first, killed = trainer.calls
    run_sweep(spec, base_config(tmp_path), str(ROOT / "config.yaml"), overrides, trainer, log=lambda s: None)
    names = [c[0] for c in trainer.calls[2:]]
    assert first[0] not in names  # finished trial skipped
    assert names[0] == killed[0]  # the killed trial resumed first, in its own folder
    assert len(names) == 2
    assert sorted(t["status"] for t in read_trials(tmp_path / "ck" / "sweeps" / "sw")) == ["complete"] * 3


@pytest.mark.parametrize("warmup", [0, 1])
def test_hopeless_trial_is_pruned_and_reported(tmp_path, warmup):
    spec = load_spec(write_spec(tmp_path, method="grid", budget_samples=64, eval_every_samples=16, prune=True,
                                prune_warmup_evals=warmup, space={"training.learning_rate": [1e-4, 1e-6]}))
    # lr 1e-4 learns; lr 1e-6 stays at 100 and is worse than the median from its first check on
    trainer = ScriptedTrainer(lambda t, step: 100.0 if t.learning_rate < 1e-5 else 100.0 - step)
    folder = run_sweep(spec, base_config(tmp_path), str(ROOT / "config.yaml"), [f"training.output_dir={tmp_path / 'ck'}"],
                       trainer, log=lambda s: None)
    by_lr = {t["params"]["training.learning_rate"]: t for t in read_trials(folder)}
    assert by_lr[1e-4]["status"] == "complete"
    assert by_lr[1e-6]["status"] == "pruned"
    assert len(by_lr[1e-4]["evals"]) == 5  # step 0 and four checks
    assert len(by_lr[1e-6]["evals"]) == 2 + warmup  # step 0, the warm-up checks, the check that prunes
    assert "| pruned |" in (folder / "report.md").read_text()


def test_a_trial_pruned_then_killed_in_its_final_phase_is_finished_without_more_training(tmp_path):
    """The prune is in trial.json before the final phase: the rerun finishes the trial at the
    step it was pruned at, and its wall time counts the killed session."""
    spec = load_spec(write_spec(tmp_path, method="grid", budget_samples=64, eval_every_samples=16, prune=True,
                                prune_warmup_evals=0, space={"training.learning_rate": [1e-4, 1e-6]}))
    trainer = ScriptedTrainer(lambda t, step: 100.0 if t.learning_rate < 1e-5 else 100.0 - step,
                              kill_at=("trial-001", None))
    args = (spec, base_config(tmp_path), str(ROOT / "config.yaml"), [f"training.output_dir={tmp_path / 'ck'}"], trainer)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(*args, log=lambda s: None)
    record = tmp_path / "ck" / "sweeps" / "sw" / "trial-001" / "trial.json"
    killed = json.loads(record.read_text())
    assert killed["pruned_at"] == 1 and killed["status"] == "running" and killed["wall_seconds"] > 0
    folder = run_sweep(*args, log=lambda s: None)
    assert trainer.calls[-1][0] == "trial-001" and trainer.max_steps[-1] == 1  # no step past the prune
    pruned = {t["number"]: t for t in read_trials(folder)}[1]
    assert pruned["status"] == "pruned" and [e["step"] for e in pruned["evals"]] == [0, 1]
    assert pruned["max_steps"] == 4 and pruned["wall_seconds"] >= killed["wall_seconds"]


def test_a_resumed_trial_counts_its_earlier_checks_toward_the_pruning_warmup(tmp_path):
    """Killed after its one exempt check, a hopeless trial resumed is pruned at its next check."""
    spec = load_spec(write_spec(tmp_path, method="grid", budget_samples=64, eval_every_samples=16, prune=True,
                                prune_warmup_evals=1, space={"training.learning_rate": [1e-4, 1e-6]}))
    trainer = ScriptedTrainer(lambda t, step: 100.0 if t.learning_rate < 1e-5 else 100.0 - step,
                              kill_at=("trial-001", 1))
    args = (spec, base_config(tmp_path), str(ROOT / "config.yaml"), [f"training.output_dir={tmp_path / 'ck'}"], trainer)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(*args, log=lambda s: None)
    folder = run_sweep(*args, log=lambda s: None)
    pruned = {t["number"]: t for t in read_trials(folder)}[1]
    assert pruned["status"] == "pruned" and [e["step"] for e in pruned["evals"]] == [0, 1, 2]


@pytest.mark.parametrize("spec, message", [
    ({"method": "anneal", "space": {"training.learning_rate": [1]}}, "method"),
    ({"method": "grid", "space": {"training.learning_rate": {"low": 1, "high": 2}}}, "space.training.learning_rate"),
    ({"method": "random", "space": {"training.learning_rate": [1]}}, "trials"),
    ({"method": "grid", "spaces": {}}, "unknown sweep key: spaces"),
    ({"method": "grid", "space": {1: [2, 3]}}, "space: expected dotted config keys .*got 1"),
    ({"method": "grid", "variants": {"a": {1: 2}}}, "variants.a: expected dotted config keys .*got 1"),
    ({"method": "grid", "base": {2: 1}, "space": {"training.seed": [1]}}, "base: expected dotted config keys"),
    ({"method": "grid", "space": {"training.lora": [{"enabled": True}]}},
     r"space.training.lora: a mapping replaces every setting of its section; search its keys one by one"),
])
def test_bad_sweep_files_name_the_key(tmp_path, spec, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(write_spec(tmp_path, **spec))


def test_nested_settings_in_base_and_variants_keep_the_others_of_their_section(tmp_path):
    """base: {training: {weight_decay: 0.1}} is the dotted key training.weight_decay: the trials
    keep every other training setting of config.yaml and of --set."""
    from whisper_ft.sweep import check_trials

    overrides = [f"training.output_dir={tmp_path / 'ck'}", "training.gradient_accumulation_steps=2",
                 "training.eval_subset=50", "training.lora.rank=8"]
    spec = load_spec(write_spec(tmp_path, method="grid", budget_samples=64, base={"training": {"weight_decay": 0.1}},
                                variants={"a": {"training": {"dropout": 0.1}}, "b": {"training.lora": {"alpha": 4}}},
                                space={"training.learning_rate": [1.0e-5]}))
    trials = {p["variant"]: cfg.training for p, cfg in check_trials(
        spec, load_config(ROOT / "config.yaml", overrides), str(ROOT / "config.yaml"), overrides)}
    for name, t in trials.items():
        assert (t.gradient_accumulation_steps, t.eval_subset, t.weight_decay, t.lora.rank) == (2, 50, 0.1, 8), name
        assert t.max_steps == 64 // (t.batch_size * 2)
    assert (trials["a"].dropout, trials["b"].dropout, trials["b"].lora.alpha) == (0.1, 0.0, 4)


def test_real_grid_on_the_tiny_model_writes_comparable_trials(tmp_path, features_dir, tiny_model_dir):
    from whisper_ft.train import run_training

    overrides = [f"model.name_or_path={tiny_model_dir}", f"features.data_dir={features_dir.parent.parent}",
                 f"features.name={features_dir.name}", f"training.output_dir={tmp_path / 'ck'}",
                 "training.eval_batch_size=10", "training.dataloader_workers=0", "training.warmup_steps=0",
                 "training.eval_before_training=false", "training.logging_steps=1", "training.score_served=false"]
    spec = load_spec(write_spec(tmp_path, file="tiny", method="grid", budget_samples=8, eval_every_samples=4,
                                prune=False, space={"training.batch_size": [2, 4]}))
    base = load_config(ROOT / "config.yaml", overrides)
    folder = run_sweep(spec, base, str(ROOT / "config.yaml"), overrides, run_training, log=lambda s: None)
    trials = {t["params"]["training.batch_size"]: t for t in read_trials(folder)}
    assert {b: t["max_steps"] for b, t in trials.items()} == {2: 4, 4: 2}
    for t in trials.values():
        assert t["status"] == "complete"
        assert [e["step"] * t["samples_per_step"] for e in t["evals"]] == [4, 8]
        assert t["result"]["samples_seen"] == 8
        assert (folder / f"trial-{t['number']:03d}" / "best" / "config.json").is_file()
        assert all(e["split"] == "validation" for e in t["evals"]) and t["result"]["wer"] is not None
    report = (folder / "report.md").read_text()
    # a random tiny model may score both alike: a winner or a tie, named either way
    assert re.search(r"\*\*(Winner: trial \d|No winner: trials 0, 1 tie)", report)
    assert "metric wer on the validation split" in report
    assert "| validation WER % |" in report and "| test WER % |" in report


def test_a_sweep_on_cer_ships_the_check_that_ranks_each_trial(tmp_path, features_dir, tiny_model_dir):
    """The sweep's metric is every trial's training.select_metric: a trial's best/ (and so its
    test figure) is the check whose CER ranked it, here where its checks tie on WER; --set may
    not choose another."""
    from whisper_ft.sweep import check_trials, trial_config
    from whisper_ft.train import run_training

    overrides = [f"model.name_or_path={tiny_model_dir}", f"features.data_dir={features_dir.parent.parent}",
                 f"features.name={features_dir.name}", f"training.output_dir={tmp_path / 'ck'}",
                 "training.eval_batch_size=10", "training.dataloader_workers=0", "training.warmup_steps=0",
                 "training.learning_rate=1e-3", "training.batch_size=4", "training.generation_max_length=20",
                 "training.eval_before_training=false", "training.export_ctranslate2=false",
                 "training.score_served=false"]
    spec = load_spec(write_spec(tmp_path, file="cer", method="grid", metric="cer", budget_samples=16,
                                eval_every_samples=8, prune=False, space={"training.seed": [3]}))
    base = load_config(ROOT / "config.yaml", overrides)
    assert trial_config(base, spec, {"training.seed": 3}, tmp_path, 0, str(ROOT / "config.yaml"),
                        overrides).training.select_metric == "cer"
    with pytest.raises(ConfigError, match="training.select_metric is set by the sweep file and by --set; keep one"):
        check_trials(spec, base, str(ROOT / "config.yaml"), [*overrides, "training.select_metric=wer"])
    folder = run_sweep(spec, base, str(ROOT / "config.yaml"), overrides, run_training, log=lambda s: None)
    [trial] = read_trials(folder)
    ranked = min((e for e in trial["evals"] if e["step"] > 0), key=lambda e: e["cer"])
    assert ranked != min((e for e in trial["evals"] if e["step"] > 0), key=lambda e: e["wer"])  # WER would differ
    best = json.loads((folder / "trial-000" / "best" / "best.json").read_text())
    assert (best["step"], best["cer"]) == (ranked["step"], ranked["cer"])
    assert trial["result"]["final"]["step"] == ranked["step"]  # the test figure is that check's
    report = (folder / "report.md").read_text()
    assert f"cer {100 * ranked['cer']:.2f}%" in report and "![cer against samples seen](wer.png)" in report
    assert f"| {ranked['step']} | {100 * trial['result']['wer']:.2f} |" in report


def test_sweep_command_reports_a_bad_file_in_one_line(tmp_path):
    import subprocess
    import sys

    bad = write_spec(tmp_path, method="grid", space={"training.learning_rate": "1e-5"})
    proc = subprocess.run([sys.executable, str(ROOT / "sweep.py"), str(bad), "--config", str(ROOT / "config.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {bad}: space.training.learning_rate: grid search needs a "
                                                "list of values"]


def test_trial_objective_is_the_best_check_of_the_chosen_metric():
    from whisper_ft.sweep import best_value

    evals = [{"step": 0, "wer": 0.1, "cer": 0.05}, {"step": 2, "wer": 0.5, "cer": 0.3}, {"step": 4, "wer": 0.6, "cer": 0.2}]
    assert best_value(evals, "wer") == 0.5  # the zero-shot check is not the trial's result
    assert best_value(evals, "cer") == 0.2
    assert best_value(evals[:1], "cer") == math.inf  # stopped before a check: never the test score


def test_a_failing_trial_is_recorded_and_not_rerun(tmp_path):
    spec = load_spec(write_spec(tmp_path, method="grid", budget_samples=32, eval_every_samples=32, prune=False,
                                space={"training.learning_rate": [1e-5, 1e-4, 1e-3]}))
    scripted = ScriptedTrainer(lambda t, step: 50.0)

    def trainer(cfg, callbacks=()):
        if cfg.training.learning_rate == 1e-4:
            scripted.calls.append((cfg.training.run_name, 1e-4))
            raise RuntimeError("CUDA out of memory\nmore detail")
        return scripted(cfg, callbacks)

    sets = [f"training.output_dir={tmp_path / 'ck'}"]
    folder = run_sweep(spec, base_config(tmp_path), str(ROOT / "config.yaml"), sets, trainer, log=lambda s: None)
    trials = {t["params"]["training.learning_rate"]: t for t in read_trials(folder)}
    assert [trials[lr]["status"] for lr in (1e-5, 1e-4, 1e-3)] == ["complete", "failed", "complete"]
    assert trials[1e-4]["error"] == "RuntimeError: CUDA out of memory"
    assert "Traceback" in (folder / f"trial-{trials[1e-4]['number']:03d}" / "error.txt").read_text()
    report = (folder / "report.md").read_text()
    assert report.count("| complete |") == 2 and "RuntimeError: CUDA out of memory" in report
    calls = len(scripted.calls)
    run_sweep(spec, base_config(tmp_path), str(ROOT / "config.yaml"), sets, trainer, log=lambda s: None)
    assert len(scripted.calls) == calls  # finished and failed trials are not run again


def test_failed_trials_run_again_on_request_each_once_and_count_once(tmp_path):
    """--retry-failed: a failed trial runs again with its settings as a new trial, before any
    trial still to draw, and the sweep still ends with its number of trials that did not fail."""
    spec = load_spec(write_spec(tmp_path, method="random", trials=3, seed=5, budget_samples=32, eval_every_samples=32,
                                prune=False, space={"training.learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}}))
    scripted = ScriptedTrainer(lambda t, step: 50.0, crash_on=1)  # the process is killed in the second trial
    broken = [True]

    def trainer(cfg, callbacks=()):
        if broken:
            broken.clear()
            raise RuntimeError("CUDA out of memory")
        return scripted(cfg, callbacks)

    sets, lines = [f"training.output_dir={tmp_path / 'ck'}"], []
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, base_config(tmp_path), str(ROOT / "config.yaml"), sets, trainer, log=lambda s: None)
    folder = run_sweep(spec, base_config(tmp_path), str(ROOT / "config.yaml"), sets, trainer, log=lines.append,
                       retry_failed=True)
    trials = read_trials(folder)
    assert [(t["number"], t["status"]) for t in trials] == [(0, "failed"), (1, "complete"), (2, "complete"),
                                                            (3, "complete")]
    assert trials[2]["params"] == trials[0]["params"] and trials[0]["retried_as"] == 2
    assert lines[0] == "resuming trial 1" and "retrying failed trial 0 as trial 2" in lines
    assert "- trial 0 (learning_rate=" in (report := (folder / "report.md").read_text())
    assert "CUDA out of memory; retried as trial 2" in report
    calls = len(scripted.calls)
    run_sweep(spec, base_config(tmp_path), str(ROOT / "config.yaml"), sets, trainer, log=lambda s: None,
              retry_failed=True)
    assert len(scripted.calls) == calls and len(read_trials(folder)) == 4  # nothing left to retry or to draw


def test_a_full_disk_stops_the_sweep_with_its_trial_resumable(tmp_path):
    """A full disk would fail every later trial too: the sweep stops (one line from the
    command), the trial is not marked failed, and the rerun resumes it."""
    import errno

    spec = load_spec(write_spec(tmp_path, method="grid", budget_samples=32, eval_every_samples=32, prune=False,
                                space={"training.learning_rate": [1e-5, 1e-4]}))
    scripted = ScriptedTrainer(lambda t, step: 50.0)
    full = [True]

    def trainer(cfg, callbacks=()):
        if cfg.training.learning_rate == 1e-5 and full and full.pop():
            raise RuntimeError("saving failed") from OSError(errno.ENOSPC, "No space left on device")
        return scripted(cfg, callbacks)

    sets = [f"training.output_dir={tmp_path / 'ck'}"]
    with pytest.raises(RuntimeError, match="saving failed"):
        run_sweep(spec, base_config(tmp_path), str(ROOT / "config.yaml"), sets, trainer, log=lambda s: None)
    folder = run_sweep(spec, base_config(tmp_path), str(ROOT / "config.yaml"), sets, trainer, log=lambda s: None)
    assert [t["status"] for t in read_trials(folder)] == ["complete", "complete"]
    assert [lr for _, lr in scripted.calls] == [1e-5, 1e-4]


def test_a_sweep_that_cannot_make_a_config_is_refused_before_any_trial(tmp_path):
    """A key misspelt or a value out of range at any grid point, a range's bound, a count YAML
    reads as a string, or a key --set sets too: one line before any trial runs."""
    sets = [f"training.output_dir={tmp_path / 'ck'}"]
    for space, message in (({"training.gradient_accumulation_steps": [1, 0]},
                            "gradient_accumulation_steps=0: training.gradient_accumulation_steps: must be at least 1"),
                           ({"training.learning_rat": [1e-5]}, "unknown config key: training.learning_rat")):
        spec = load_spec(write_spec(tmp_path, method="grid", budget_samples=32, space=space))
        trainer = ScriptedTrainer(lambda t, step: 50.0)
        with pytest.raises(ConfigError, match=re.escape(message)):
            run_sweep(spec, base_config(tmp_path), str(ROOT / "config.yaml"), sets, trainer, log=lambda s: None)
        assert trainer.calls == [] and not (tmp_path / "ck" / "sweeps").exists()
    spec = load_spec(write_spec(tmp_path, method="random", trials=3, space={"training.dropout": {"low": 0.0, "high": 1.5}}))
    with pytest.raises(ConfigError, match=r"dropout=1.5: training.dropout: must be in \[0, 1\)"):
        run_sweep(spec, base_config(tmp_path), str(ROOT / "config.yaml"), sets, ScriptedTrainer(lambda t, s: 1.0))
    for method in ("random", "bayes"):  # a list's every value, not only its first and last
        spec = load_spec(write_spec(tmp_path, method=method, trials=3,
                                    space={"training.lr_scheduler": ["linear", "cosinus", "constant"]}))
        with pytest.raises(ConfigError, match=r"lr_scheduler=cosinus: training.lr_scheduler: expected one of"):
            run_sweep(spec, base_config(tmp_path), str(ROOT / "config.yaml"), sets, ScriptedTrainer(lambda t, s: 1.0))
    spec = load_spec(write_spec(tmp_path, method="grid", budget_samples="3.2e4", space={"training.seed": [1]}))
    assert spec.budget_samples == 32000
    with pytest.raises(ConfigError, match="budget_samples: expected a whole number"):
        load_spec(write_spec(tmp_path, method="grid", budget_samples="lots", space={"training.seed": [1]}))
    spec = load_spec(write_spec(tmp_path, method="grid", base={"training.eval_subset": 100}, space={"training.seed": [1]}))
    with pytest.raises(ConfigError, match="training.eval_subset is set by the sweep file and by --set; keep one"):
        run_sweep(spec, base_config(tmp_path), str(ROOT / "config.yaml"), [*sets, "training.eval_subset=0"],
                  ScriptedTrainer(lambda t, s: 1.0))


def test_an_output_dir_on_a_file_is_refused_before_any_trial(tmp_path):
    (tmp_path / "ck").write_text("not a folder")
    spec = load_spec(write_spec(tmp_path, method="grid", budget_samples=32, space={"training.seed": [1]}))
    trainer = ScriptedTrainer(lambda t, step: 50.0)
    with pytest.raises(ConfigError, match=re.escape(f"training.output_dir: {tmp_path / 'ck'} is a file, not a folder")):
        run_sweep(spec, base_config(tmp_path), str(ROOT / "config.yaml"), [], trainer, log=lambda s: None)
    assert trainer.calls == []


def test_trials_of_any_batch_size_report_their_checks_at_the_same_steps(tmp_path):
    """ceil(80 / 48) = 2 steps of 48 clips is 96 clips a check, not 80: each check is reported at
    the nearest multiple of 80, where the other trials report theirs."""
    import whisper_ft.sweep as sweep

    spec = load_spec(write_spec(tmp_path, method="grid", budget_samples=480, eval_every_samples=80, prune=True,
                                space={"training.batch_size": [16, 48]}))
    reported: dict[int, list[int]] = {}
    for batch in (16, 48):
        trial = SimpleNamespace(report=lambda value, step, b=batch: reported.setdefault(b, []).append(step),
                                should_prune=lambda: False)
        cfg = sweep.trial_config(base_config(tmp_path), spec, {"training.batch_size": batch}, tmp_path / str(batch), 0,
                                 str(ROOT / "config.yaml"), [])
        ScriptedTrainer(lambda t, step: 50.0)(cfg, callbacks=[sweep.pruning_callback(
            trial, "wer", batch, 0, spec.eval_every_samples)])
    assert reported[16] == [80, 160, 240, 320, 400, 480]
    assert reported[48] == [80, 160, 320, 400, 480]  # checks at 96, 192, 288, 384 and 480 clips


def test_warmup_in_samples_is_the_same_for_every_batch_size(tmp_path):
    from whisper_ft.sweep import trial_config

    spec = load_spec(write_spec(tmp_path, method="grid", budget_samples=640, warmup_samples=160,
                                space={"training.batch_size": [8, 32]}))
    for batch, steps in ((8, 20), (32, 5)):
        cfg = trial_config(base_config(tmp_path), spec, {"training.batch_size": batch}, tmp_path, 0,
                           str(ROOT / "config.yaml"), [])
        assert (cfg.training.warmup_steps, cfg.training.max_steps) == (steps, 640 // batch)


def test_named_variants_apply_their_overrides_and_are_listed_in_the_report(tmp_path):
    spec = load_spec(write_spec(tmp_path, method="grid", budget_samples=64, eval_every_samples=32, prune=False,
                                variants={"blog": {"training.learning_rate": 1e-5, "training.warmup_steps": 500},
                                          "defaults": {}},
                                space={"training.batch_size": [8, 16]}))
    scripted = ScriptedTrainer(lambda t, step: 50.0 - step / 10 if t.learning_rate == "auto" else 60.0)
    folder = run_sweep(spec, base_config(tmp_path), str(ROOT / "config.yaml"),
                       [f"training.output_dir={tmp_path / 'ck'}"], scripted, log=lambda s: None)
    trials = read_trials(folder)
    assert sorted((t["params"]["variant"], t["params"]["training.batch_size"]) for t in trials) == [
        ("blog", 8), ("blog", 16), ("defaults", 8), ("defaults", 16)]
    for t in trials:
        blog = t["params"]["variant"] == "blog"
        assert (t["config"]["learning_rate"], t["config"]["warmup_steps"]) == ((1e-5, 500) if blog else ("auto", None))
        assert t["max_steps"] * t["samples_per_step"] == 64
    report = (folder / "report.md").read_text()
    assert "- `blog`: training.learning_rate=1e-05, training.warmup_steps=500" in report
    assert "- `defaults`: the defaults" in report and re.search(r"Winner: trial \d+\*\* \(variant=defaults", report)


def test_a_variant_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="variants.blog"):
        load_spec(write_spec(tmp_path, method="grid", variants={"blog": "lr=1e-5"}))


def test_trial_config_layers_typed_values_over_the_command_line(tmp_path):
    from whisper_ft.sweep import trial_config

    spec = load_spec(write_spec(tmp_path, method="grid", budget_samples=64,
                                base={"training.dropout": 0.2, "training.seed": 2, "training.output_dir": "elsewhere"},
                                variants={"v": {"training.seed": 3, "training.num_beams": 2, "app.cookies_file": "yes",
                                                "training.learning_rate": 1e-5,
                                                "training.lora.target_modules": ["q_proj", "k_proj"]}},
                                space={"training.num_beams": [4]}))
    overrides = ["training.weight_decay=0.3", "training.dropout=0.3", "training.max_steps=7", "training.batch_size=16"]
    cfg = trial_config(base_config(tmp_path), spec, {"variant": "v", "training.num_beams": 4}, tmp_path, 5,
                       str(ROOT / "config.yaml"), overrides)
    t = cfg.training
    assert (t.weight_decay, t.dropout, t.seed, t.num_beams) == (0.3, 0.2, 3, 4)
    assert (t.output_dir, t.run_name, t.max_steps) == (str(tmp_path), "trial-005", 4)
    assert t.learning_rate == 1e-5 and t.lora.target_modules == ("q_proj", "k_proj")
    assert cfg.app.cookies_file == "yes"


def test_a_metrics_line_cut_short_by_a_kill_does_not_stop_the_sweep(tmp_path):
    """A trial killed while writing metrics.jsonl is resumed and reported from its whole lines."""
    import whisper_ft.sweep as sweep

    run = tmp_path / "trial-000"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"event": "eval", "step": 2, "wer": 0.5}) + "\n"
                                       + json.dumps({"event": "eval", "step": 2, "wer": 0.4}) + "\n"  # resumed
                                       + '{"event": "eval", "step": 4, "spl')
    assert [e["wer"] for e in sweep._evals(run)[0]] == [0.4]


@pytest.mark.parametrize("name", ["runs?x", "runs%41", "runs#1"])
def test_the_study_database_lies_in_the_sweep_folder_whatever_its_path(tmp_path, monkeypatch, name):
    import whisper_ft.sweep as sweep

    monkeypatch.chdir(tmp_path)
    spec = load_spec(write_spec(tmp_path, method="random", trials=2, budget_samples=64, eval_every_samples=32,
                                space={"training.learning_rate": {"low": 1e-5, "high": 1e-4, "log": True}}))
    folder = tmp_path / name / "sweeps" / "lr"
    sweep.make_study(spec, folder)
    assert (folder / "study.db").is_file() and sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "sw.yaml"])


def test_report_only_on_a_sweep_that_never_ran_is_a_one_line_error(tmp_path, capsys):
    import sweep as entry

    from whisper_ft import cli

    args = [str(ROOT / "sweeps" / "lr.yaml"), "--report-only", "--set", f"training.output_dir={tmp_path / 'typo'}"]
    assert cli.run(entry.main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --report-only: no trials in ") and "python sweep.py" in err
    assert err.count("\n") == 1 and not (tmp_path / "typo").exists()


@pytest.mark.parametrize("content, message", [
    (b"method: grid\nspace: {training.seed: [1\n", "is not valid YAML (line 3): expected ',' or ']'"),
    (b"# Title\n\nA paragraph: with a colon\nand: another: one\n", "is not valid YAML (line 4)"),  # e.g. README.md
    (b"\xff\xfemethod: grid\n", "is not UTF-8 text (line 1): save it as UTF-8"),
    (b"method: grid\x00\n", "is not valid YAML"),
    (b"just some words\n", "must hold a mapping of sweep keys (method, space, ...), got str"),
    (b"- method\n- grid\n", "must hold a mapping of sweep keys (method, space, ...), got list"),
    (b"1: a\nfoo: b\n", ": unknown sweep key: 1"),
    (b"method: grid\nspace:\n  training.seed: [1]\n  training.seed: [2]\n",
     "is not valid YAML (line 4): key 'training.seed' is written twice"),
    (b"method: grid\nmethod: random\n", "is not valid YAML (line 2): key 'method' is written twice"),
    (b"method: grid\nspace: {training.seed: [1]}\nvariants: {1: {training.dropout: 0.1}}\n",
     ": variants: expected names (text), got 1"),
])
def test_a_sweep_file_that_is_not_a_yaml_mapping_is_a_one_line_error(tmp_path, capsys, content, message):
    path = tmp_path / "sw.yaml"
    path.write_bytes(content)
    err = sweep_command_error(tmp_path, capsys, path)
    assert err.startswith(f"error: {path}") and message in err


def sweep_command_error(tmp_path: Path, capsys, path: Path) -> str:
    """What `python sweep.py path` prints, checked to be one line with exit code 2 before any trial."""
    import sweep as entry

    from whisper_ft import cli

    assert cli.run(entry.main, [str(path), "--set", f"training.output_dir={tmp_path / 'ck'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp_path / "ck").exists()
    return err


def test_a_feature_pipeline_setting_given_to_the_sweep_command_is_said_to_change_nothing(tmp_path, capsys, caplog):
    import sweep as entry

    from whisper_ft import cli

    path = write_spec(tmp_path, method="grid", budget_samples=64, space={"training.seed": [1, 2]})
    assert cli.run(entry.main, [str(path), "--set", f"training.output_dir={tmp_path / 'ck'}", "--set",
                                "features.max_seconds=5", "--set", f"features.data_dir={tmp_path / 'unbuilt'}"]) == 2
    assert "no finished features in" in capsys.readouterr().err
    assert [r.getMessage() for r in caplog.records if r.name == "whisper_ft.cli"] == [
        "--set features.max_seconds changes nothing here: it is a setting of feature_pipeline.py, and every trial "
        "trains on its store as it was built (build another store under a new features.name to change it)"]


def test_a_sweep_started_under_torchrun_is_refused(tmp_path, capsys, monkeypatch):
    """Every process would create the same study and run every trial."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = write_spec(tmp_path, method="grid", budget_samples=64, space={"training.seed": [1, 2]})
    assert sweep_command_error(tmp_path, capsys, path) == (
        "error: sweep.py runs its trials one after another in one process: start it with python, not torchrun or "
        "accelerate launch\n")
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("space, message", [
    ("{training.learning_rate: 3e-5}", "space.training.learning_rate: expected a list of values or a range "
                                       "{low, high}, got '3e-5' (a value every trial shares goes in base)"),
    ("{training.seed: 7}", "space.training.seed: expected a list of values or a range {low, high}, got 7"),
    ("{training.seed: null}", "space.training.seed: expected a list of values or a range {low, high}, got None"),
    ("{training.learning_rate: []}", "space.training.learning_rate: expected at least one value, got []"),
    ("{training.learning_rate: {low: 1.0e-3, high: 1.0e-5}}", "space.training.learning_rate: low 0.001 is above "
                                                              "high 1e-05"),
    ("{training.batch_size: {low: 32, high: 8}}", "space.training.batch_size: low 32 is above high 8"),
    ("{training.dropout: {low: 0.0, high: 0.5, log: true}}", "space.training.dropout: a log range needs low above "
                                                             "0, got 0.0"),
    ("{features.name: {low: a, high: b}}", "space.features.name.low: expected a number, got 'a'"),
    ("{training.seed: {low: 1, high: true}}", "space.training.seed.high: expected a number, got True"),
])
@pytest.mark.parametrize("method", ["random", "bayes"])
def test_a_space_optuna_cannot_search_is_a_one_line_error_naming_the_key(tmp_path, capsys, method, space, message):
    path = tmp_path / "sw.yaml"
    path.write_text(f"method: {method}\ntrials: 2\nspace: {space}\n")
    assert sweep_command_error(tmp_path, capsys, path).startswith(f"error: {path}: {message}")


def test_an_empty_grid_list_is_a_one_line_error(tmp_path, capsys):
    path = write_spec(tmp_path, method="grid", space={"training.seed": [1, 2], "training.learning_rate": []})
    assert sweep_command_error(tmp_path, capsys, path) == (f"error: {path}: space.training.learning_rate: expected "
                                                           "at least one value, got []\n")


def test_range_bounds_yaml_reads_as_strings_are_numbers(tmp_path):
    path = tmp_path / "sw.yaml"
    path.write_text("method: random\ntrials: 2\nspace: {training.learning_rate: {low: 1e-5, high: 1e-3, log: true}}\n")
    assert load_spec(path).space == {"training.learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}}


@pytest.mark.parametrize("space, message", [
    ("{training.learning_rate: {low: 1.0e-5, high: 1.0e-3, logg: true}}",
     "space.training.learning_rate.logg: unknown range key (a range has low, high, log, step)"),
    ("{training.learning_rate: {low: 1.0e-5, high: 1.0e-3, log: 'no'}}",
     "space.training.learning_rate.log: expected true or false, got 'no'"),
    ("{training.batch_size: {low: 8, high: 32, step: 0}}",
     "space.training.batch_size.step: expected a whole number of at least 1, got 0"),
    ("{training.dropout: {low: 0.0, high: 0.5, step: 0.25}}",
     "space.training.dropout.step: only an integer range (integer low and high, no log) takes a step"),
    ("{training.batch_size: {low: 8, high: 64, log: true, step: 8}}",
     "space.training.batch_size.step: only an integer range (integer low and high, no log) takes a step"),
])
def test_a_range_key_optuna_would_ignore_or_refuse_is_a_one_line_error(tmp_path, capsys, space, message):
    path = tmp_path / "sw.yaml"
    path.write_text(f"method: random\ntrials: 2\nspace: {space}\n")
    assert sweep_command_error(tmp_path, capsys, path) == f"error: {path}: {message}\n"


def test_an_integer_range_with_a_step_draws_its_multiples(tmp_path):
    from whisper_ft.sweep import distributions

    spec = load_spec(write_spec(tmp_path, method="random", trials=2,
                                space={"training.batch_size": {"low": 8, "high": 32, "step": 8}}))
    dist = distributions(spec)["training.batch_size"]
    assert (type(dist).__name__, dist.low, dist.high, dist.step) == ("IntDistribution", 8, 32, 8)


def test_an_integer_range_on_a_log_scale_draws_integers(tmp_path):
    """batch_size {low: 8, high: 64, log: true} draws whole batch sizes (it drew 25.04, which
    failed every trial on the config's integer type)."""
    from whisper_ft.sweep import distributions

    spec = load_spec(write_spec(tmp_path, method="random", trials=2,
                                space={"training.batch_size": {"low": 8, "high": 64, "log": True}}))
    dist = distributions(spec)["training.batch_size"]
    assert (type(dist).__name__, dist.low, dist.high, dist.log) == ("IntDistribution", 8, 64, True)


@pytest.mark.parametrize("key, values, message", [
    ("training.seed", [1, 2, 1], "1 repeats an earlier value"),
    ("training.learning_rate", [1.0e-5, 3.0e-5, 1.0e-5], "1e-05 repeats an earlier value"),
])
def test_a_grid_value_listed_twice_is_a_one_line_error(tmp_path, capsys, key, values, message):
    path = write_spec(tmp_path, method="grid", space={key: values})
    assert sweep_command_error(tmp_path, capsys, path) == (f"error: {path}: space.{key}: {message}; "
                                                           "a grid runs each value once\n")


@pytest.mark.parametrize("variants", [{}, {"a": {"training.seed": 1}, "b": {"training.seed": 2}}])
def test_variant_in_space_is_a_one_line_error(tmp_path, capsys, variants):
    """It named no variant (every trial ran the same config) or replaced the ones defined."""
    path = write_spec(tmp_path, method="grid", variants=variants, space={"variant": ["a", "c"]})
    assert sweep_command_error(tmp_path, capsys, path) == (f"error: {path}: space.variant: this key searches the named "
                                                           "variants; define them under variants\n")


@pytest.mark.parametrize("name", [5, "", ".", "..", "../lr"])
def test_a_sweep_name_that_is_not_a_folder_name_is_a_one_line_error(tmp_path, capsys, name):
    """5 raised a TypeError; "" and "." put the trials in <output_dir>/sweeps/ itself, ".." and
    "../lr" outside it."""
    path = write_spec(tmp_path, name=name, method="grid", space={"training.seed": [1]})
    assert sweep_command_error(tmp_path, capsys, path) == (f"error: {path}: name: expected a folder name (the sweep's "
                                                           f"is <output_dir>/sweeps/<name>), got {name!r}\n")


def test_trials_checked_on_different_stores_are_refused(tmp_path, capsys):
    """A sweep over feature stores ranks each trial on its own store's held-out splits unless
    training.eval_features fixes one: refused before any trial."""
    path = write_spec(tmp_path, method="grid", space={"features.name": ["cv-sv", "cv-sv-plus-nst"]})
    err = sweep_command_error(tmp_path, capsys, path)
    assert "held-out splits of different feature stores (cv-sv, cv-sv-plus-nst)" in err
    assert "set training.eval_features" in err
    fixed = write_spec(tmp_path, file="fixed", method="grid", base={"training.eval_features": "cv-sv"},
                       space={"features.name": ["cv-sv", "cv-sv-plus-nst"]})
    from whisper_ft.sweep import check_trials

    check_trials(load_spec(fixed), load_config(ROOT / "config.yaml"), str(ROOT / "config.yaml"), [])


def test_trials_checked_on_subsets_of_different_sizes_are_refused(tmp_path, capsys):
    """training.eval_subset decides which validation clips the periodic checks score: trials that
    differ in it would be ranked on different clips, so the sweep is refused before any trial."""
    path = write_spec(tmp_path, method="grid", space={"training.eval_subset": [0, 200]})
    assert "error: sweep sw: its trials would be checked on validation subsets of different sizes " \
           "(training.eval_subset 0, 200)" in sweep_command_error(tmp_path, capsys, path)
    from whisper_ft.sweep import check_trials

    same = write_spec(tmp_path, file="same", method="grid", base={"training.eval_subset": 200},
                      space={"training.seed": [1, 2]})
    check_trials(load_spec(same), load_config(ROOT / "config.yaml"), str(ROOT / "config.yaml"), [])


@pytest.mark.parametrize("where, message", [
    ({"space": {"training.warmup_steps": [0, 100]}}, "training.warmup_steps is set by the sweep file's space and by "
                                                     "its warmup_samples, which sets it for every trial; keep one"),
    ({"space": {"training.seed": [1]}, "base": {"training.warmup_fraction": 0.2}},
     "training.warmup_fraction is set by the sweep file's base and by its warmup_samples"),
    ({"variants": {"long": {"training.max_steps": 500}}}, "training.max_steps is set by the sweep file's "
                                                          "variants.long and by its budget_samples"),
    ({"space": {"training.save_steps": [10, 20]}}, "training.save_steps is set by the sweep file's space and by its "
                                                   "eval_every_samples"),
    ({"space": {"training.seed": [1]}, "base": {"training.select_metric": "cer"}},
     "training.select_metric is set by the sweep file's base and by its metric")])
def test_a_key_a_budget_decides_is_refused_in_the_sweep_file(tmp_path, capsys, where, message):
    """The budgets set max_steps, eval/save steps and the warm-up of every trial last, and the
    metric what picks best/: the same key in the space, base or a variant would silently lose (a
    grid of identical trials, a best/ other than the check that ranks the trial)."""
    path = write_spec(tmp_path, method="grid", budget_samples=64, eval_every_samples=32, warmup_samples=16, **where)
    err = sweep_command_error(tmp_path, capsys, path)
    assert err.startswith(f"error: sweep sw: {message}") and err.endswith("; keep one\n")


def test_a_rerun_with_another_budget_or_base_config_is_refused(tmp_path):
    """A killed sweep rerun with an edited budget or another --set evaluation setting would rank
    its new trials beside the earlier ones as trained and checked alike: refused, naming the key;
    another eval batch size goes on."""
    sets = [f"training.output_dir={tmp_path / 'ck'}"]
    space = {"training.learning_rate": [1e-5, 2e-5]}
    spec = load_spec(write_spec(tmp_path, method="grid", budget_samples=32, eval_every_samples=16, prune=False,
                                space=space))
    trainer = ScriptedTrainer(lambda t, step: 40.0, crash_on=2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, base_config(tmp_path), str(ROOT / "config.yaml"), sets, trainer, log=lambda s: None)
    folder = tmp_path / "ck" / "sweeps" / "sw"
    longer = load_spec(write_spec(tmp_path, method="grid", budget_samples=64, eval_every_samples=16, prune=False,
                                  space=space))
    with pytest.raises(ConfigError, match=re.escape(f"sweep sw ran its trials in {folder} with budget_samples 32, "
                                                    "this run has 64: new trials would not compare with them; set it "
                                                    "back, or give the sweep another name")):
        run_sweep(longer, base_config(tmp_path), str(ROOT / "config.yaml"), sets, trainer, log=lambda s: None)
    subset = [*sets, "training.eval_subset=100"]
    with pytest.raises(ConfigError, match="with training.eval_subset 0, this run has 100"):
        run_sweep(spec, load_config(ROOT / "config.yaml", subset), str(ROOT / "config.yaml"), subset, trainer,
                  log=lambda s: None)
    assert len(trainer.calls) == 2
    record = folder / "sweep.yaml"
    kept = record.read_text()
    record.write_text("method: [grid\n")  # damaged by hand
    with pytest.raises(ConfigError, match=re.escape(f"{record} is not valid YAML")):
        run_sweep(spec, base_config(tmp_path), str(ROOT / "config.yaml"), sets, trainer, log=lambda s: None)
    record.write_text(kept)
    batch = [*sets, "training.eval_batch_size=8"]
    run_sweep(spec, load_config(ROOT / "config.yaml", batch), str(ROOT / "config.yaml"), batch, trainer,
              log=lambda s: None)
    assert sorted(t["status"] for t in read_trials(folder)) == ["complete"] * 2


def test_a_rerun_with_other_grid_values_or_variants_is_refused_and_ranges_may_change(tmp_path):
    """An Optuna study cannot change a list of values within it (it would stop with a traceback
    at the first new trial): a rerun that extends the grid, its keys or the variants is a
    one-line error; a range's bounds may change, and so may the base config's value of a key
    the sweep sets for every trial."""
    sets = [f"training.output_dir={tmp_path / 'ck'}"]
    budget = {"budget_samples": 32, "eval_every_samples": 16, "prune": False}
    grid = {"training.learning_rate": [1e-5, 2e-5]}
    one = {"a": {"training.weight_decay": 0.0}}
    trainer = ScriptedTrainer(lambda t, step: 40.0)
    run_sweep(load_spec(write_spec(tmp_path, method="grid", space=grid, variants=one, **budget)), base_config(tmp_path),
              str(ROOT / "config.yaml"), sets, trainer, log=lambda s: None)
    # the base config's value of a key the sweep sets for every trial reaches no trial: it may change
    other_base = load_config(ROOT / "config.yaml", [*sets, "training.learning_rate=3e-5", "training.weight_decay=0.5"])
    run_sweep(load_spec(write_spec(tmp_path, method="grid", space=grid, variants=one, **budget)), other_base,
              str(ROOT / "config.yaml"), sets, trainer, log=lambda s: None)
    wider = load_spec(write_spec(tmp_path, method="grid", space={**grid, "training.dropout": [0.0, 0.1]}, variants=one,
                                 **budget))
    with pytest.raises(ConfigError, match="sweep sw searched variant, training.learning_rate, this file "
                                          "searches variant, training.dropout, training.learning_rate: the keys "
                                          "searched cannot change"):
        run_sweep(wider, base_config(tmp_path), str(ROOT / "config.yaml"), sets, trainer, log=lambda s: None)
    more = load_spec(write_spec(tmp_path, method="grid", space={"training.learning_rate": [1e-5, 2e-5, 4e-5]},
                                variants=one, **budget))
    with pytest.raises(ConfigError, match=re.escape("sweep sw drew its trials' space.training.learning_rate from "
                                                    "[1e-05, 2e-05], this file has [1e-05, 2e-05, 4e-05]: a study "
                                                    "cannot change a list of values")):
        run_sweep(more, base_config(tmp_path), str(ROOT / "config.yaml"), sets, trainer, log=lambda s: None)
    variants = load_spec(write_spec(tmp_path, method="grid", space=grid,
                                    variants={**one, "b": {"training.weight_decay": 0.1}}, **budget))
    with pytest.raises(ConfigError, match="drew its trials' variants from"):
        run_sweep(variants, base_config(tmp_path), str(ROOT / "config.yaml"), sets, trainer, log=lambda s: None)
    assert len(trainer.calls) == 2
    ranged = {"file": "rs", "method": "random", "trials": 2, "seed": 1, **budget}
    run_sweep(load_spec(write_spec(tmp_path, space={"training.learning_rate": {"low": 1e-5, "high": 2e-5}}, **ranged)),
              base_config(tmp_path), str(ROOT / "config.yaml"), sets, trainer, log=lambda s: None)
    wider = load_spec(write_spec(tmp_path, **{**ranged, "trials": 3},
                                 space={"training.learning_rate": {"low": 1e-5, "high": 4e-5}}))
    run_sweep(wider, base_config(tmp_path), str(ROOT / "config.yaml"), sets, trainer, log=lambda s: None)
    assert len(trainer.calls) == 5
    # a random search's keys, variants and method stay too: the report describes the trials as they ran
    for change, message in (({"space": {"training.learning_rate": {"low": 1e-5, "high": 4e-5},
                                        "training.dropout": [0.0, 0.1]}},
                             "searched training.learning_rate, this file searches training.dropout, "
                             "training.learning_rate: the keys searched cannot change"),
                            ({"variants": one}, "searched training.learning_rate, this file searches variant, "
                                                "training.learning_rate"),
                            ({"method": "bayes"}, "drew its trials by a random search, this file asks for a bayes "
                                                  "search: the method cannot change")):
        spec = {**ranged, "trials": 4, "space": {"training.learning_rate": {"low": 1e-5, "high": 4e-5}}, **change}
        with pytest.raises(ConfigError, match=re.escape(message)):
            run_sweep(load_spec(write_spec(tmp_path, **spec)), base_config(tmp_path), str(ROOT / "config.yaml"), sets,
                      trainer, log=lambda s: None)
    assert len(trainer.calls) == 5


def test_a_sweep_before_its_feature_store_is_built_is_a_one_line_error(tmp_path, capsys):
    import sweep as entry

    from whisper_ft import cli

    args = [str(ROOT / "sweeps" / "lr.yaml"), "--set", f"training.output_dir={tmp_path / 'ck'}",
            "--set", f"features.data_dir={tmp_path / 'data'}", "--set", "features.name=unbuilt"]
    assert cli.run(entry.main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sweep lr, trial ") and "no finished features in" in err and "unbuilt" in err
    assert "python feature_pipeline.py" in err and err.count("\n") == 1 and not (tmp_path / "ck").exists()


def test_a_key_set_by_a_variant_and_searched_by_the_space_is_refused(tmp_path, capsys):
    path = write_spec(tmp_path, method="grid", budget_samples=64, space={"training.batch_size": [4, 8]},
                      variants={"a": {"training.batch_size": 2}, "b": {"training.seed": 3}})
    err = sweep_command_error(tmp_path, capsys, path)
    assert err.startswith("error: sweep ") and "training.batch_size is set by variants.a and searched by space" in err
    path = write_spec(tmp_path, method="grid", budget_samples=64, space={"training.batch_size": [2]},
                      base={"training.batch_size": 4})
    err = sweep_command_error(tmp_path, capsys, path)
    assert err.startswith("error: sweep ") and "training.batch_size is set by base and searched by space" in err
    # a nested mapping sets the keys within it
    path = write_spec(tmp_path, method="grid", budget_samples=64, space={"training.lora.enabled": [False]},
                      variants={"lora": {"training.lora": {"enabled": True, "rank": 8}}, "full": {}})
    err = sweep_command_error(tmp_path, capsys, path)
    assert "training.lora.enabled is set by variants.lora and searched by space" in err
    path = write_spec(tmp_path, method="grid", budget_samples=64, space={"training.seed": [1]},
                      base={"training": {"max_steps": 10}})
    err = sweep_command_error(tmp_path, capsys, path)
    assert "training.max_steps is set by the sweep file's base and by its budget_samples" in err


@pytest.mark.parametrize("where, key, owner", [
    ({"space": {"features.max_seconds": [3.0, 30.0]}}, "features.max_seconds", "space"),
    ({"space": {"training.seed": [1]}, "base": {"features": {"min_seconds": 1.0}}}, "features.min_seconds", "base"),
    ({"variants": {"few": {"features.sources.0.limit": 20}, "all": {}}}, "features.sources.0.limit", "variants.few")])
def test_a_setting_of_the_feature_pipeline_is_refused_in_the_sweep_file(tmp_path, capsys, where, key, owner):
    """A trial trains on a store already built: its stage-1 settings would change nothing, and the
    report would compare trials that differ only in name."""
    path = write_spec(tmp_path, method="grid", budget_samples=64, **where)
    err = sweep_command_error(tmp_path, capsys, path)
    assert err == (f"error: sweep sw: {key} (set by the sweep file's {owner}) is a setting of python "
                   "feature_pipeline.py, which a trial does not run: build one feature store per value "
                   "(--set features.name=NAME) and search features.name\n")
    # what a trial does read of the features section may be searched
    path = write_spec(tmp_path, method="grid", budget_samples=64, space={"features.on_overlap": ["refuse", "keep"]},
                      base={"features.data_dir": str(tmp_path / "unbuilt")})
    assert "no finished features in" in sweep_command_error(tmp_path, capsys, path)


@pytest.mark.parametrize("method", ["random", "bayes", "grid"])
def test_a_date_as_the_sweep_seed_makes_a_study(tmp_path, method):
    from whisper_ft.sweep import make_study

    space = {"training.learning_rate": [1e-5, 1e-4] if method == "grid" else {"low": 1e-5, "high": 1e-3, "log": True}}
    spec = load_spec(write_spec(tmp_path, method=method, trials=2, seed=20261127, budget_samples=64, space=space))
    make_study(spec, tmp_path / "sweep")  # the sampler's seed stays in numpy's 32-bit range


def test_report_labels_keep_keys_of_one_name_apart():
    from whisper_ft.sweep import _params

    assert _params({"training.learning_rate": 1e-4, "training.lora.enabled": True,
                    "training.spec_augment.enabled": False, "features.name": "cv", "variant": "a"}) == (
        "learning_rate=0.0001, lora.enabled=True, spec_augment.enabled=False, features.name=cv, variant=a")


def test_report_only_refuses_a_sweep_file_changed_since_its_trials_ran(tmp_path, capsys):
    """The report ranks and describes the trials as they ran: a new metric or budget in the
    sweep file is refused as a rerun refuses it."""
    import sweep as entry

    from whisper_ft import cli

    sets = [f"training.output_dir={tmp_path / 'ck'}"]
    space = {"training.learning_rate": [1e-5, 1e-4]}
    path = write_spec(tmp_path, file="lr", method="grid", budget_samples=32, eval_every_samples=32, space=space)
    run_sweep(load_spec(path), load_config(ROOT / "config.yaml", sets), str(ROOT / "config.yaml"), sets,
              ScriptedTrainer(lambda t, step: 50.0), log=lambda s: None)
    args = [str(path), "--report-only", "--config", str(ROOT / "config.yaml"), "--set", sets[0]]
    assert cli.run(entry.main, args) == 0
    for changed in ({"budget_samples": 64}, {"metric": "cer"}):
        write_spec(tmp_path, file="lr", **{"method": "grid", "budget_samples": 32, "eval_every_samples": 32,
                                           "space": space, **changed})
        assert cli.run(entry.main, args) == 2
        err = capsys.readouterr().err
        key = next(iter(changed))
        assert err.startswith("error: sweep lr ran its trials in ") and f"with {key} " in err, err
