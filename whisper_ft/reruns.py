"""What a rerun of a run folder may do: resume from its newest checkpoint, with the settings
that shaped its trajectory unchanged, on the feature stores and number of processes it trained
on; and what it must undo first (the checks after that checkpoint, a best/ of one of them).

    check_newest_checkpoint(run_dir, found)        # a damaged newest checkpoint: one line
    check_resumable(cfg, run_dir, resume, step)    # FIXED_ON_RESUME settings, stores, processes
    finished_summary(cfg, run_dir, step)           # a finished run: its metrics.json, nothing to do
    rewind(cfg, run_dir, step, meta, processor)    # best/ and averaging/ back to the checkpoint's step

The run folder's layout: `whisper_ft.checkpoints`; `whisper_ft.train.run_training` calls these.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME

from whisper_ft import averaging, checkpoints
from whisper_ft.config import Config, ConfigError, lookup, read_mapping, to_dict
from whisper_ft.errors import TrainingError
from whisper_ft.features import EVAL, ROLE, TRAIN, VALIDATION, FeatureStore
from whisper_ft.model import load_model
from whisper_ft.processes import is_main_process, world_size

log = logging.getLogger("whisper_ft.reruns")


# The seed of the training.eval_subset draw, fixed rather than training.seed: runs and sweep
# trials that differ in their seed are still checked on the same clips.
EVAL_SUBSET_SEED = 0


# What a resumed run may not change: its checkpoint restores the optimizer and the schedule (so
# a new rate, decay or warm-up would be ignored), and the rest defines the trajectory, what its
# checks measure or which of them is best/. Everything else (max_steps, the check and save
# cadence, speed and precision switches, exports) may change between runs.
FIXED_ON_RESUME = (
    "model.name_or_path", "model.language", "model.task", "features.name", "training.eval_features",
    "training.learning_rate", "training.lr_scheduler", "training.warmup_steps", "training.warmup_fraction",
    "training.batch_size", "training.gradient_accumulation_steps", "training.weight_decay", "training.seed",
    "training.dropout", "training.freeze_encoder", "training.lora", "training.spec_augment", "training.eval_subset",
    "training.generation_max_length", "training.num_beams", "training.select_metric",
)
SWITCHED = ("training.lora", "training.spec_augment")  # FIXED_ON_RESUME sections with an `enabled` switch
# The value a run used for a FIXED_ON_RESUME key that its config.yaml predates, where one is known.
PREDATED_DEFAULTS = {"training.select_metric": "wer"}


def check_newest_checkpoint(run_dir: Path, found: list[tuple[int, Path]]) -> None:
    """Say which newer checkpoints a resume skips as incomplete, and refuse to resume from a
    damaged one (`checkpoints.damage`) with one line, rather than a traceback from the Trainer
    after the data and model are loaded. Deleting it is the user's call: it may be copied back."""
    newest = found[-1][0] if found else -1
    for step, folder in checkpoints.incomplete(run_dir):
        if step > newest:
            log.warning("%s is incomplete (no whole trainer_state.json: cut short by a crash, or copied in part): %s",
                        folder, f"resuming from {found[-1][1].name}" if found else "starting at step 0")
    if found and (problem := checkpoints.damage(found[-1][1])):
        instead = f"resume from {found[-2][1].name}" if len(found) > 1 else "start the run over"
        raise TrainingError(f"{found[-1][1]} is damaged ({problem}): copy it back whole, or delete that folder to "
                            f"{instead}")


def saved_config(run_dir: Path) -> dict | None:
    """The run's config.yaml as saved (None without one); a damaged or emptied one is a
    ConfigError: the checks of a resume would otherwise pass whatever changed."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    advice = "restore the file, or pass --fresh to start the run over"
    try:
        saved = read_mapping(path, "run config", "sections")
    except ConfigError as e:
        raise ConfigError(f"{e}; {advice}") from e
    if not saved:
        raise ConfigError(f"{path} is empty: the settings the run was trained with are gone; {advice}")
    return saved


def check_resumable(cfg: Config, run_dir: Path, resume: Path | None, step: int = 0) -> None:
    """Refuse to resume `run_dir` from `resume` (at `step`) with settings that differ from the
    run's own (its config.yaml) in `FIXED_ON_RESUME`, on a feature store rebuilt since, or on
    another number of processes while there is training left: the change would be ignored or
    would mix two runs. Without a
    checkpoint (`resume` None), refuse to start over a run whose best/ came from other
    settings, rather than delete it."""
    if (saved := saved_config(run_dir)) is None:
        return
    now = to_dict(cfg)
    missing = object()  # a key the run's config.yaml predates
    changed = []
    for key in FIXED_ON_RESUME:
        before, after = lookup(saved, key, missing), lookup(now, key, missing)
        if before is missing:
            before = PREDATED_DEFAULTS.get(key, missing)
        if key == "training.eval_features":  # empty reads features.name: compare the store each one reads
            before = before or lookup(saved, "features.name", missing)
            after = after or lookup(now, "features.name", missing)
        if key in SWITCHED and not any(isinstance(v, dict) and v.get("enabled") for v in (before, after)):
            continue  # off before and after: its other settings change nothing
        if key == "model.language" and isinstance(before, str):  # a run configured before names were refused
            from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

            before = TO_LANGUAGE_CODE.get(before.lower(), before)
        if before is not missing and before != after:
            changed.append(f"{key} {before!r} -> {after!r}")
    if changed and resume is None:
        raise TrainingError(f"{run_dir} holds a best/ model trained with other settings ({'; '.join(changed)}) and no "
                            "checkpoint to resume from: set them back, pass --fresh to start it over (deleting it), "
                            "or use another training.run_name")
    if changed:
        raise TrainingError(f"{run_dir} was trained to {resume.name} with other settings ({'; '.join(changed)}): "
                            "a resumed run keeps its own; set them back, pass --fresh to start it over, or use "
                            "another training.run_name")
    if resume is not None:
        check_same_stores(cfg, run_dir, resume)
        check_average_mode(cfg, run_dir)
    if resume is not None and step < cfg.training.max_steps:
        check_same_processes(run_dir, resume, step)
    steps = lookup(saved, "training.max_steps", missing)
    if resume is not None and steps is not missing and steps != cfg.training.max_steps:
        if step < cfg.training.max_steps:
            why = "the learning-rate schedule runs to the new end from here"
        else:
            try:
                towards = json.loads((resume / TRAINER_STATE_NAME).read_text(encoding="utf-8"))["max_steps"]
            except (OSError, ValueError, KeyError):
                towards = steps
            why = f"no training left after step {step}, trained on the schedule towards {towards}"
        log.info("training.max_steps changed from %s to %d: %s", steps, cfg.training.max_steps, why)


def owed_check(run_dir: Path, resume: Path, step: int) -> bool:
    """Whether the check at `step`, where the run resumes from `resume`, was due (at the check
    cadence its checkpoint records, or its last step) and is not in its log: a run stopped by a
    signal at a check step saves before it checks, and may be killed during the check. The
    resumed run then checks there first (`eval_on_start`, which `WhisperTrainer._evaluate`
    counts as that step's check)."""
    try:
        state = json.loads((resume / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    every = int(state.get("eval_steps") or 0)
    due = step >= (state.get("max_steps") or math.inf) or (every > 0 and step % every == 0)
    checks = checkpoints.selection_checks(checkpoints.read_events(run_dir))
    return due and not any(e.get("step") == step for e in checks)


def check_average_mode(cfg: Config, run_dir: Path) -> None:
    """Refuse to average a run's checks in another training.average_mode than the one its
    averaging/ kept them for (an index written without it: the run's config.yaml's): the checks
    that mode would average were deleted as they came."""
    t, folder = cfg.training, run_dir / averaging.FOLDER
    kept = averaging.kept_mode(folder)
    if kept is None and averaging.read_index(folder):
        try:
            kept = lookup(saved_config(run_dir), "training.average_mode", "last")  # the default before the key
        except (OSError, ValueError):
            kept = None
    if t.average_checkpoints and kept is not None and kept != t.average_mode:
        raise TrainingError(f"{folder} keeps the checks average_mode {kept} averages, not those {t.average_mode} "
                            f"would (deleted as they came): set training.average_mode back to {kept}, pass --fresh "
                            "to start it over, or use another training.run_name")


STORE_KEYS = {"train": "features.name", "held_out": "training.eval_features"}  # the stores a run reads, by role


def store_identities(cfg: Config) -> dict:
    """`FeatureStore.identity` of the training store and of the validation and test store, by
    role (the start event records them)."""
    return {"train": FeatureStore.of(cfg).identity(), "held_out": FeatureStore.held_out_of(cfg).identity()}


def check_same_stores(cfg: Config, run_dir: Path, resume: Path) -> None:
    """Refuse to resume `run_dir` from `resume` on a feature store rebuilt since the run's last
    start (the same name, other clips: `--overwrite` with other sources, say): the data order,
    the token cap and best/'s validation WER belong to the store as it was. Runs whose start
    events predate the record are not checked."""
    starts = [e for e in checkpoints.read_events(run_dir) if e.get("event") == "start" and e.get("stores")]
    if not starts:
        return
    now = store_identities(cfg)
    for role, key in STORE_KEYS.items():
        before, after = starts[-1]["stores"].get(role), now[role]
        if before and before["fingerprint"] != after["fingerprint"]:
            raise TrainingError(f"{run_dir} was trained to {resume.name} on features {after['name']} ({key}) as they "
                                f"were built then; they were rebuilt since ({store_change(before, after)}): pass --fresh "
                                "to start the run over on them, or use another training.run_name")


def store_change(before: dict, after: dict) -> str:
    """'training clips 27 -> 15' for the split counts that differ between two identities."""
    changed = [f"{ROLE.get(split, split)} clips {before['clips'].get(split, 0)} -> {after['clips'].get(split, 0)}"
               for split in (TRAIN, VALIDATION, EVAL) if before["clips"].get(split, 0) != after["clips"].get(split, 0)]
    return ", ".join(changed) or "the same clip counts, other clips or settings"


def start_over(cfg: Config, run_dir: Path) -> None:
    """A run folder with best/ but no checkpoint to resume from. A finished run (its checkpoints
    deleted afterwards) is refused: training it again would replace the model it shipped. A run
    stopped before its first checkpoint was complete starts over, without that attempt's best/
    and averaging/, which must not stand against the new checks (refused with other settings)."""
    if (run_dir / "metrics.json").is_file():
        raise TrainingError(f"{run_dir} is a finished run with no checkpoint left to resume from: --push-only "
                            "publishes it as it is; --fresh trains it again (deleting it), or use another "
                            "training.run_name")
    check_resumable(cfg, run_dir, None)
    if is_main_process():
        for name in (checkpoints.BEST_DIR, averaging.FOLDER):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        log.info("%s has no checkpoint to resume from: starting it over (removed the earlier attempt's best/)", run_dir)


def eval_subset_seed(cfg: Config, run_dir: Path) -> int:
    """The seed that drew the `training.eval_subset` clips of `run_dir`, for resuming it on the
    clips its best/ was chosen on: recorded in its start event, else (a run started when the draw
    followed `training.seed`) its seed."""
    first = next((e for e in checkpoints.read_events(run_dir) if e.get("event") == "start"), None)
    if first is None:
        return EVAL_SUBSET_SEED
    return first.get("eval_subset_seed", cfg.training.seed)


def first_warmup(cfg: Config, run_dir: Path) -> int | None:
    """The warm-up `run_dir` started with, for resuming it where the warm-up is a fraction of
    max_steps (`warmup_steps: null`): a longer run keeps its warm-up rather than warming up
    again from where it is. None where the config sets the steps, or for a new run."""
    t = cfg.training
    first = next((e for e in checkpoints.read_events(run_dir) if e.get("event") == "start"), {})
    if t.warmup_steps is not None or first.get("warmup_steps") is None:
        return None
    if math.ceil(t.warmup_fraction * t.max_steps) != first["warmup_steps"]:
        log.info("keeping the run's warm-up of %d steps (training.warmup_fraction of the new max_steps would give %d)",
                 first["warmup_steps"], math.ceil(t.warmup_fraction * t.max_steps))
    return first["warmup_steps"]


def check_same_processes(run_dir: Path, resume: Path, step: int) -> None:
    """Refuse to go on training `run_dir` from `resume` (at `step`) on another number of processes
    than trained up to it: the effective batch (batch x accumulation x processes) and the order of
    the data would change. The starts before `step` count (a later one may only have finished the
    run, on any number of processes)."""
    starts = [e for e in checkpoints.read_events(run_dir)
              if e.get("event") == "start" and e.get("world_size") and e.get("step", 0) < step]
    before, now = (starts[-1]["world_size"], world_size()) if starts else (None, None)
    if before is not None and before != now:
        raise TrainingError(f"{run_dir} was trained to {resume.name} on {before} process(es), this run has {now}: the "
                            f"effective batch (batch_size x gradient_accumulation_steps x processes) would change; "
                            f"run it on {before}, pass --fresh to start it over, or use another training.run_name")


# What a finished run's final phase did, besides scoring best/: another value does that phase again.
FINAL_PHASE = ("export_ctranslate2", "score_served", "average_checkpoints", "average_mode")


def finished_summary(cfg: Config, run_dir: Path, step: int) -> dict | None:
    """The summary (metrics.json) of a run that finished at its newest checkpoint `step`, at or
    past training.max_steps, with this config's final-phase settings (`FINAL_PHASE`); None when
    there is work left: training, or a final phase cut short (no metrics.json) or asked for
    otherwise. A rerun of a finished run then repeats neither the test scoring nor the exports.
    Nor is a metrics.json beside a best/ without its model card: the card is what --push-only
    publishes, and rerun, the final phase writes it."""
    path = run_dir / "metrics.json"
    card = run_dir / checkpoints.BEST_DIR / "README.md"
    if step < cfg.training.max_steps or not path.is_file() or not card.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        saved = saved_config(run_dir)
    except (OSError, ValueError):
        return None
    if saved is None:
        return None
    now = to_dict(cfg)["training"]
    if summary.get("steps") != step or any(lookup(saved, f"training.{key}") != now[key] for key in FINAL_PHASE):
        return None
    return {**summary, "run_dir": str(run_dir)}  # where the run is now: its folder may have been moved


TRAIN_FIGURES = ("train_runtime", "train_samples_per_second", "train_loss")  # of the Trainer, per session


def log_trained(run_dir: Path, step: int, train_metrics: dict) -> None:
    """A `trained` event with the Trainer's figures of the session that just trained, as soon
    as training ends: a final phase cut short and rerun has no metrics.json to take them from."""
    checkpoints.append_event(run_dir, {"event": "trained", "step": step,
                                       **{k: train_metrics.get(k) for k in TRAIN_FIGURES}})


def earlier_train_metrics(run_dir: Path) -> dict:
    """The training figures of the last session that trained the run (its `trained` event, or
    for a run logged without one its metrics.json), for a rerun that trains no more."""
    trained = [e for e in checkpoints.read_events(run_dir) if e.get("event") == "trained"]
    if trained:
        return {k: trained[-1].get(k) for k in TRAIN_FIGURES}
    path = run_dir / "metrics.json"
    earlier = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return {"train_runtime": earlier.get("train_runtime_seconds"),  # None: the session that trained was killed
            "train_samples_per_second": earlier.get("train_samples_per_second"),
            "train_loss": earlier.get("train_loss")}


def best_single_check(run_dir: Path, metric: str = "wer") -> dict:
    """{"step", "wer", "wer_normalized", "cer", ...} of the best single check by `metric`
    (training.select_metric): `best/` as the Trainer exported it, or, when `best/` holds an
    average already (a rerun of a run killed after its average won), the selection check in
    metrics.jsonl with the lowest `metric`, the earliest of equals as during training; {}
    before any."""
    best = checkpoints.read_best(run_dir) or {}
    if not best.get("averaged_steps"):
        return best
    checks = [e for e in checkpoints.selection_checks(checkpoints.read_events(run_dir))
              if e.get("step", 0) > 0 and e.get(metric) is not None]
    return min(checks, key=lambda e: e[metric], default={})


def rewind(cfg: Config, run_dir: Path, step: int, meta: dict, processor) -> None:
    """Before a resume from checkpoint-`step`: forget the models of the checks after it (a kill
    came after a check and before the next checkpoint), which belong to steps this run goes
    back over. Their weights in averaging/ are deleted; a `best/` of such a check is replaced
    by the best check up to `step` (from its weights in averaging/ or its checkpoint), or,
    where those are gone, removed: the next check that scores is exported. A `best/` deleted
    or damaged by hand (no readable best.json) after checks is exported again the same way:
    else the next check would be exported as best, however it scored. So is a better check
    up to `step` than the one `best/` holds: a run stopped by a signal at a check step saves
    its checkpoint, then checks, and may be killed while it writes that check's `best/`."""
    folder = run_dir / averaging.FOLDER
    index = averaging.read_index(folder)
    if gone := [s for s in index if s > step]:
        for s in gone:
            averaging.weights_path(folder, s).unlink(missing_ok=True)
        averaging.write_index(folder, {s: v for s, v in index.items() if s <= step}, averaging.kept_mode(folder))
    best = checkpoints.read_best(run_dir)
    metric = cfg.training.select_metric
    single = best_logged_check(run_dir, step, metric)
    if best is not None and (best.get("step") or 0) <= step:
        if not (single and single["step"] != best.get("step") and best.get(metric) is not None
                and single[metric] < best[metric]):
            return
        held = (f"best/ held the check at step {best['step']}, not the better one logged at step {single['step']} "
                "(stopped while writing best/)")
        source = single_check_source(run_dir, single["step"])
        if source is None:
            log.warning("%s, whose weights are gone: best/ stays as it is", held)
            return
    else:
        if best is None and not single:
            return  # no check yet: the first one exports best/
        held = (f"best/ held the model of the check at step {best['step']}, after checkpoint-{step} where this "
                "run resumes" if best is not None else f"best/ is missing or has no readable {checkpoints.BEST_INFO}")
        source = single_check_source(run_dir, single["step"]) if single else None
        if source is None:
            shutil.rmtree(run_dir / checkpoints.BEST_DIR, ignore_errors=True)
            log.warning("%s; %s: the next check exports best/", held,
                        f"the weights of the best check before (step {single['step']}) are gone" if single else
                        "no check before it")
            return
    export_single_check(cfg, run_dir, meta, single, source, processor)
    log.info("%s: exported the best check up to there (step %d, from %s) as best/", held, single["step"], source)


def best_logged_check(run_dir: Path, step: int, metric: str) -> dict:
    """The periodic check after step 0 and up to `step` in metrics.jsonl with the lowest
    `metric` (training.select_metric), the earliest of equals as during training; {} before any."""
    checks = [e for e in checkpoints.selection_checks(checkpoints.read_events(run_dir))
              if 0 < e.get("step", 0) <= step and e.get(metric) is not None and math.isfinite(e[metric])]
    return min(checks, key=lambda e: e[metric], default={})


def export_single_check(cfg: Config, run_dir: Path, meta: dict, single: dict, source: Path, processor) -> None:
    """Export the model of the periodic check `single` (an `eval` event), saved at `source`
    (`single_check_source`), as `best/`."""
    if source.is_file():  # weights kept for averaging, in best/'s architecture (the base model's)
        shape = run_dir / checkpoints.BEST_DIR
        model = load_model(str(shape) if (shape / "config.json").is_file() else cfg.model.name_or_path,
                           cfg.model.language, cfg.model.task, attn_implementation="sdpa")
        model.load_state_dict(averaging.average([source]))
    elif (source / "config.json").is_file():
        model = load_model(str(source), cfg.model.language, cfg.model.task, attn_implementation="sdpa")
    else:  # a LoRA checkpoint: its adapters, merged into the base model
        from peft import PeftModel

        base = load_model(cfg.model.name_or_path, cfg.model.language, cfg.model.task, attn_implementation="sdpa")
        model = PeftModel.from_pretrained(base, str(source)).merge_and_unload()
    info = {**meta, "step": single["step"], "split": single.get("split"),
            **{k: single.get(k) for k in ("wer", "wer_normalized", "cer", "eval_clips")}}
    checkpoints.export_best(model, processor, run_dir, info)


def single_check_source(run_dir: Path, step: int) -> Path | None:
    """Where the model of the periodic check at `step` is still saved: its weights file in
    averaging/, else its complete checkpoint folder (the whole model, or a LoRA run's adapters);
    None when neither is left."""
    kept = averaging.weights_path(run_dir / averaging.FOLDER, step)
    if kept.is_file():
        return kept
    found = dict(checkpoints.checkpoints(run_dir)).get(step)
    if found is not None and any((found / name).is_file() for name in ("config.json", "adapter_config.json")):
        return found
    return None
