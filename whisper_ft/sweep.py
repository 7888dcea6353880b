"""Hyperparameter and data-mix search over config keys, fair by construction.

A sweep file declares a search space of dotted config keys, and/or named `variants` (each a
set of overrides, e.g. a whole recipe), searched as one more key, `variant`. Every trial is a normal
training run (`whisper_ft.train.run_training`) in `<output_dir>/sweeps/<name>/trial-NNN/`,
trained on the same budget of samples and evaluated on the same evaluation set at the same
points, so trials with other batch sizes still see the same data. Grid, random and Bayesian
(TPE) search and median pruning all come from Optuna; its study lives in a SQLite file
beside the trials, so a rerun skips finished trials and resumes a killed one.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
import traceback
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import yaml

from whisper_ft.checkpoints import read_best, read_events, selection_checks
from whisper_ft.config import (SELECT_METRICS, Config, ConfigError, check_folder, check_writable, first_change, flat,
                               is_folder_name, load_config, read_mapping, save_config, stage1_only, to_dict)
from whisper_ft.errors import first_line, machine_problem
from whisper_ft.files import write_atomic

METHODS = ("grid", "random", "bayes")
METRICS = SELECT_METRICS  # a sweep's metric is also every trial's training.select_metric, which picks its best/
SELECT_KEY = "training.select_metric"
TRIAL_FILE = "trial.json"


@dataclass(frozen=True)
class SweepSpec:
    name: str
    method: str = "grid"
    trials: int = 0
    seed: int = 0
    metric: str = "wer"
    budget_samples: int = 0
    eval_every_samples: int = 0
    warmup_samples: int = 0
    prune: bool = True
    prune_warmup_evals: int = 1
    base: dict = field(default_factory=dict)
    space: dict = field(default_factory=dict)
    variants: dict = field(default_factory=dict)


VARIANT = "variant"  # the search key of named variants


def search_space(spec: SweepSpec) -> dict:
    """The keys searched: `variant` (the names of the variants) first, then `space`."""
    return searched(spec.variants, spec.space)


def searched(variants: dict | None, space: dict | None) -> dict:
    """`search_space` of a sweep's variants and space (as a sweep file, or its record, has them)."""
    return {**({VARIANT: list(variants)} if variants else {}), **(space or {})}


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep file; errors name the key."""
    path = Path(path)
    raw = read_mapping(path, "sweep file", "sweep keys (method, space, ...)")
    names = {f.name for f in dataclasses.fields(SweepSpec)}
    unknown = sorted(set(raw) - names, key=str)
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key: {unknown[0]}")
    for key in ("trials", "seed", "budget_samples", "eval_every_samples", "warmup_samples", "prune_warmup_evals"):
        if key in raw:
            raw[key] = _count(raw[key], f"{path}: {key}")
    for key in ("base", "space", "variants"):
        if not isinstance(raw.get(key, {}), dict):
            raise ConfigError(f"{path}: {key}: expected a mapping of config keys")
    for where, mapping in [("base", raw.get("base", {})), ("space", raw.get("space", {})),
                           *((f"variants.{name}", v) for name, v in raw.get("variants", {}).items()
                             if isinstance(v, dict))]:
        bad = next((k for k in mapping if not isinstance(k, str)), None)
        if bad is not None:
            raise ConfigError(f"{path}: {where}: expected dotted config keys (training.learning_rate), got {bad!r}")
    if not isinstance(raw.get("prune", True), bool):
        raise ConfigError(f"{path}: prune: expected true or false, got {raw['prune']!r}")
    spec = SweepSpec(**{"name": path.stem, **raw})
    if not isinstance(spec.name, str) or not is_folder_name(spec.name):
        raise ConfigError(f"{path}: name: expected a folder name (the sweep's is <output_dir>/sweeps/<name>), "
                          f"got {spec.name!r}")
    if spec.method not in METHODS:
        raise ConfigError(f"{path}: method: expected one of {', '.join(METHODS)}, got {spec.method!r}")
    if spec.metric not in METRICS:
        raise ConfigError(f"{path}: metric: expected one of {', '.join(METRICS)}, got {spec.metric!r}")
    if not spec.space and not spec.variants:
        raise ConfigError(f"{path}: space or variants: at least one key or variant to search is needed")
    for name, overrides in spec.variants.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{path}: variants: expected names (text), got {name!r}")
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}: variants.{name}: expected a mapping of config keys to values")
    if VARIANT in spec.space:  # it would be taken for a variant's name, and never set in a config
        raise ConfigError(f"{path}: space.{VARIANT}: this key searches the named variants; define them under variants")
    space = {key: _space_values(values, spec.method, f"{path}: space.{key}") for key, values in spec.space.items()}
    if spec.method != "grid" and spec.trials < 1:
        raise ConfigError(f"{path}: trials: {spec.method} search needs trials >= 1")
    return dataclasses.replace(spec, space=space)


def _space_values(values, method: str, where: str) -> list | dict:
    """One key of `space`, checked: a list of values, or for random/bayes a range {low, high,
    log} whose bounds are numbers (here, not in Optuna's traceback when the sweep starts)."""
    if isinstance(values, list):
        if not values:
            raise ConfigError(f"{where}: expected at least one value, got []")
        if any(isinstance(value, dict) for value in values):  # it would replace the whole section
            raise ConfigError(f"{where}: a mapping replaces every setting of its section; search its keys one "
                              "by one, each a dotted key of its own")
        for i, value in enumerate(values):  # a repeat looks already run: run_sweep found no point left
            if method == "grid" and value in values[:i]:
                raise ConfigError(f"{where}: {value!r} repeats an earlier value; a grid runs each value once")
        return values
    if method == "grid":
        raise ConfigError(f"{where}: grid search needs a list of values")
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a list of values or a range {{low, high}}, got {values!r} "
                          "(a value every trial shares goes in base)")
    return _range(values, where)


RANGE_KEYS = ("low", "high", "log", "step")


def _range(values: dict, where: str) -> dict:
    """A range {low, high, log, step}, checked; a key Optuna would not get (a typo, a step
    of a float range) is refused rather than silently ignored."""
    if not {"low", "high"} <= set(values):
        raise ConfigError(f"{where}: a range needs low and high (and optionally log: true)")
    unknown = sorted(set(values) - set(RANGE_KEYS), key=str)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown range key (a range has {', '.join(RANGE_KEYS)})")
    log = values.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log: expected true or false, got {log!r}")
    low, high = (_bound(values[end], f"{where}.{end}") for end in ("low", "high"))
    if low > high:
        raise ConfigError(f"{where}: low {low} is above high {high}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low above 0, got {low}")
    if "step" in values:
        step = values["step"]
        if log or not (isinstance(low, int) and isinstance(high, int)):
            raise ConfigError(f"{where}.step: only an integer range (integer low and high, no log) takes a step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ConfigError(f"{where}.step: expected a whole number of at least 1, got {step!r}")
    return {**values, "low": low, "high": high}


def _bound(value, where: str) -> int | float:
    """A range's end; YAML reads 3e-5 (no dot) as a string, so it is parsed."""
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or math.isnan(number):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return number


def _count(value, where: str) -> int:
    """A whole number of the sweep file; YAML reads 3.2e4 (no dot) as a string, so it is parsed."""
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        number = None
    if (isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number)
            or number != int(number) or number < 0):
        raise ConfigError(f"{where}: expected a whole number of at least 0, got {value!r}")
    return int(number)


def check_trials(spec: SweepSpec, base: Config, config_path: str | None,
                 overrides: list[str]) -> list[tuple[dict, Config]]:
    """Refuse, before any trial runs, a sweep whose settings cannot make a config (an unknown
    key, a value out of range: every grid point and variant, a range's bounds) or that sets a
    key its budgets, its metric (`decided_keys`) or the command line set too (one would silently
    lose), a setting of stage 1 (`stage1_only`: it would change no trial), or a key both a
    variant and the space set (the space's value would replace the variant's), or whose trials
    would be checked on different clips: different feature stores' held-out splits
    (`training.eval_features` makes them one), or subsets of different sizes
    (`training.eval_subset`). Returns the (params, config) of the trials it checked."""
    both = _shared(flat(spec.base), spec.space)
    if both:
        raise ConfigError(f"sweep {spec.name}: {both[0]} is set by base and searched by space, whose values would "
                          "replace base's; keep one")
    for name, variant in spec.variants.items():
        both = _shared(flat(variant), spec.space)
        if both:
            raise ConfigError(f"sweep {spec.name}: {both[0]} is set by variants.{name} and searched by space, whose "
                              "values would replace the variant's; keep one")
    owners = {**{k: "variants." + name for name, v in spec.variants.items() for k in flat(v)},
              **{k: "base" for k in flat(spec.base)}, **{k: "space" for k in spec.space}}
    built = sorted(filter(stage1_only, owners))
    if built:  # a trial reads a built store: the report would compare settings that changed nothing
        raise ConfigError(f"sweep {spec.name}: {built[0]} (set by the sweep file's {owners[built[0]]}) is a setting of "
                          "python feature_pipeline.py, which a trial does not run: build one feature store per value "
                          "(--set features.name=NAME) and search features.name")
    decided = decided_keys(spec)
    both = _shared(owners, decided)
    if both:
        decider = next(decided[k] for k in decided if _shared([both[0]], [k]))
        raise ConfigError(f"sweep {spec.name}: {both[0]} is set by the sweep file's {owners[both[0]]} and by its "
                          f"{decider}, which sets it for every trial; keep one")
    both = _shared([*owners, *decided], [item.partition("=")[0].strip() for item in overrides])
    if both:
        raise ConfigError(f"sweep {spec.name}: {both[0]} is set by the sweep file and by --set; keep one")
    if spec.method == "grid":
        points = grid_points(spec)
    else:
        values = {k: v if isinstance(v, list) else [v["low"], v["high"]] for k, v in search_space(spec).items()}
        points = [{k: v[i] for k, v in values.items()} for i in (0, -1)]  # a range's bounds
        # a list's every value, each variant once
        points += [{**points[0], k: x} for k, v in values.items() if k != VARIANT for x in v[1:-1]]
        points += [{**points[0], VARIANT: name} for name in spec.variants]
    held_out, subsets, checked = set(), set(), []
    for params in points:
        try:
            cfg = trial_config(base, spec, params, Path(base.training.output_dir), 0, config_path, overrides)
        except ConfigError as e:
            raise ConfigError(f"sweep {spec.name}, trial {_params(params)}: {e}") from e
        held_out.add(cfg.training.eval_features or cfg.features.name)
        subsets.add(cfg.training.eval_subset)
        checked.append((params, cfg))
    if len(subsets) > 1:
        raise ConfigError(f"sweep {spec.name}: its trials would be checked on validation subsets of different sizes "
                          f"(training.eval_subset {', '.join(map(str, sorted(subsets)))}), so their scores would not "
                          "compare; set training.eval_subset once, in the sweep's base or with --set")
    if len(held_out) > 1:
        raise ConfigError(f"sweep {spec.name}: its trials would be checked on the held-out splits of different feature "
                          f"stores ({', '.join(sorted(held_out))}), so their scores would not compare; set "
                          "training.eval_features in the sweep's base to the store every trial is checked on")
    return checked


def _shared(keys, others) -> list[str]:
    """The dotted `keys` that set what one of `others` sets: the same key, or one within the
    other (`training.lora` and `training.lora.enabled`)."""
    return sorted(k for k in keys if any(k == o or k.startswith(f"{o}.") or o.startswith(f"{k}.") for o in others))


def check_stores(spec: SweepSpec, trials: list[tuple[dict, Config]]) -> None:
    """Refuse a sweep whose trials would read a feature store that is not built (or not
    readable by this code): every trial would fail the same way."""
    from whisper_ft.features import FeatureStore, FeaturesError

    seen = set()
    for params, cfg in trials:
        for store in {FeatureStore.of(cfg), FeatureStore.held_out_of(cfg)} - seen:
            try:
                store.manifest()
            except FeaturesError as e:
                raise FeaturesError(f"sweep {spec.name}, trial {_params(params)}: {e}") from e
            seen.add(store)


def distributions(spec: SweepSpec) -> dict:
    """Optuna distributions of the space: a list is a choice, {low, high, log} a range."""
    return space_distributions(search_space(spec))


def space_distributions(space: dict) -> dict:
    """Optuna distributions of a search space (`search_space`)."""
    import optuna.distributions as d

    out = {}
    for key, values in space.items():
        if isinstance(values, list):
            out[key] = d.CategoricalDistribution(values)
        elif isinstance(values["low"], int) and isinstance(values["high"], int):  # log-uniform with log
            out[key] = d.IntDistribution(values["low"], values["high"], log=bool(values.get("log")),
                                         step=values.get("step", 1))
        else:
            out[key] = d.FloatDistribution(float(values["low"]), float(values["high"]), log=bool(values.get("log")))
    return out


def grid_points(spec: SweepSpec) -> list[dict]:
    """Every combination of the grid, in a stable order."""
    space = search_space(spec)
    return [dict(zip(space, combo)) for combo in itertools.product(*space.values())]


def n_trials(spec: SweepSpec) -> int:
    if spec.method == "grid":
        return len(grid_points(spec))
    return spec.trials


def sampler(spec: SweepSpec, number: int = 0):
    """The sampler that draws trial `number`, seeded by the sweep's seed and that number: a
    sweep resumed after a kill draws what an uninterrupted one would, and never an earlier
    trial's values again (a sampler seeded once per run would start over). TPE reads the
    finished trials from the study, so a fresh one per trial loses nothing. Grid points are
    enqueued one by one (`grid_points`) and need no sampling."""
    import optuna

    seed = (spec.seed * 1_000_003 + number) % 2**32  # numpy's range
    if spec.method == "bayes":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, max(1, spec.trials // 3)))
    return optuna.samplers.RandomSampler(seed=seed)


def make_study(spec: SweepSpec, folder: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0, interval_steps=1)
              if spec.prune else optuna.pruners.NopPruner())
    folder.mkdir(parents=True, exist_ok=True)
    # the path URL-quoted: a "?" or "%" in it would otherwise start a query or an escape
    storage = "sqlite:///" + urllib.parse.quote(str((folder / "study.db").resolve()))
    return optuna.create_study(study_name=spec.name, storage=storage,
                               load_if_exists=True, direction="minimize", sampler=sampler(spec),
                               pruner=pruner)


def trial_config(base: Config, spec: SweepSpec, params: dict, folder: Path, number: int,
                 config_path: str | None, overrides: list[str]) -> Config:
    """The config of one trial: the command-line overrides, then as typed values (later wins)
    the sweep `base`, the trial's variant, its other params, its folder, the sweep's metric as
    what picks best/, and the equal budget."""
    variant = spec.variants.get(params.get(VARIANT), {})
    # key by key: a nested mapping (base: {training: {weight_decay: 0.1}}) set as one value would
    # replace its whole section, the command line's and config.yaml's other settings in it too
    values = [*flat(spec.base).items(), *flat(variant).items(), *((k, v) for k, v in params.items() if k != VARIANT),
              ("training.output_dir", str(folder)), ("training.run_name", trial_dir(folder, number).name),
              (SELECT_KEY, spec.metric)]
    cfg = load_config(config_path, overrides, values)
    steps = budget(spec, samples_per_step(cfg.training))
    return load_config(config_path, overrides, values + steps) if steps else cfg


def budget_keys(spec: SweepSpec) -> dict[str, str]:
    """The config keys the sweep's budgets decide, each with the sweep key that does (the warm-up
    in samples replaces `warmup_fraction` too: a set `warmup_steps` wins over it)."""
    decided = {"budget_samples": ("training.max_steps",),
               "eval_every_samples": ("training.eval_steps", "training.save_steps"),
               "warmup_samples": ("training.warmup_steps", "training.warmup_fraction")}
    return {key: name for name, keys in decided.items() if getattr(spec, name) for key in keys}


def decided_keys(spec: SweepSpec) -> dict[str, str]:
    """The config keys the sweep file decides for every trial, each with the sweep key that does:
    its budgets' (`budget_keys`) and training.select_metric, its `metric`, so that a trial's best/
    (and its test score) is the check the ranking counts."""
    return {**budget_keys(spec), SELECT_KEY: "metric"}


def budget(spec: SweepSpec, per_step: int) -> list[tuple[str, int]]:
    """The step counts that give every trial the sweep's budgets in clips seen, for a trial of
    `per_step` clips per optimizer step."""
    out = []
    if spec.budget_samples:
        out.append(("training.max_steps", max(1, math.ceil(spec.budget_samples / per_step))))
    if spec.eval_every_samples:
        every = max(1, math.ceil(spec.eval_every_samples / per_step))
        out += [("training.eval_steps", every), ("training.save_steps", every)]
    if spec.warmup_samples:  # the same warm-up in clips seen, whatever the batch size
        out.append(("training.warmup_steps", math.ceil(spec.warmup_samples / per_step)))
    return out


def samples_per_step(t) -> int:
    """Training clips per optimizer step: batch x accumulation (a sweep runs in one process)."""
    return t.batch_size * t.gradient_accumulation_steps


def pruning_callback(trial, metric: str, per_step: int, warmup_evals: int = 0, every_samples: int = 0,
                     on_check: Callable[[int, bool], None] | None = None):
    """A TrainerCallback that reports each evaluation to Optuna and stops a hopeless trial;
    `on_check(step, pruned)` runs after each check, before the trial goes on or finishes.

    Each check is reported at the clips seen, rounded to a multiple of the sweep's
    `every_samples` when it has one: a trial whose batch does not divide it checks every
    ceil(8000 / 48) steps = 8016 clips, and Optuna's pruners only compare equal steps. The
    `warmup_evals` exempt checks are counted in the Trainer's log history, which a resumed
    trial restores from its checkpoint: its checks before the kill count too."""
    from transformers import TrainerCallback

    class Pruning(TrainerCallback):
        pruned = False

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            value = (metrics or {}).get(f"eval_{metric}")
            if value is None or state.global_step == 0:
                return
            checks = sum(1 for h in state.log_history if f"eval_{metric}" in h and h.get("step", 0) > 0)
            seen = state.global_step * per_step  # samples seen: comparable across batches
            trial.report(float(value), step=round(seen / every_samples) * every_samples if every_samples else seen)
            if checks > warmup_evals and trial.should_prune():
                self.pruned = True
                control.should_training_stop = True
            if on_check is not None:
                on_check(state.global_step, self.pruned)

    return Pruning()


NEW_SWEEP = "give the sweep another name (name: in the sweep file) to start a new one"  # what a changed rerun does
SPEC_FILE = "sweep.yaml"  # the sweep file as the last run read it; config.yaml beside it, its resolved base config
# What a rerun may change in the sweep file (more trials, ranges, keys searched; pruning): the rest
# decides what the trials it ran measured (and a list of values or variants, `check_same_choices`).
SPEC_FREE_ON_RERUN = ("name", "method", "trials", "seed", "prune", "prune_warmup_evals", "space", "variants")
# What a rerun may change in the base config: where and how fast trials run and what they export.
CONFIG_FREE_ON_RERUN = ("training.output_dir", "training.run_name", "training.eval_batch_size",
                        "training.logging_steps", "training.save_steps", "training.save_total_limit",
                        "training.background_saves", "training.dataloader_workers", "training.fast_generation",
                        "training.torch_compile", "training.gradient_checkpointing", "training.export_ctranslate2",
                        "training.score_served", "training.push_to_hub", "training.hub_private")


def check_same_sweep(folder: Path, spec: SweepSpec, base: Config) -> None:
    """Refuse to add trials to a sweep whose earlier trials ran from another sweep file or base
    config (its budget, evaluation store or subset, a trial setting): the report would rank them
    as trained and checked alike. Compares with what the last run recorded in `folder`
    (`SPEC_FILE`, and config.yaml where it has one), the keys `*_FREE_ON_RERUN` aside; no
    variant's settings may change, nor a list of values or variants (`check_same_choices`)."""
    changed = None
    if (folder / SPEC_FILE).is_file():
        before = read_mapping(folder / SPEC_FILE, "sweep record", "sweep keys")
        now = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(spec)))
        check_same_choices(spec, before)
        kept = set(before.get("variants") or {}) & set(now["variants"])
        changed = (first_change(flat(before), flat(now), lambda k: k.split(".")[0] not in SPEC_FREE_ON_RERUN)
                   or first_change({f"variants.{n}": before["variants"][n] for n in kept},
                                   {f"variants.{n}": now["variants"][n] for n in kept}))
    if not changed and (folder / "config.yaml").is_file():
        free = {*CONFIG_FREE_ON_RERUN, *decided_keys(spec), *set_by_sweep(spec)}
        changed = first_change(flat(to_dict(load_config(folder / "config.yaml"))), flat(to_dict(base)),
                               lambda k: (k.split(".")[0] in ("model", "training")
                                          or k in ("features.name", "features.data_dir")) and not _shared([k], free))
    if changed:
        key, before_value, now_value = changed
        raise ConfigError(f"sweep {spec.name} ran its trials in {folder} with {key} {before_value!r}, this run has "
                          f"{now_value!r}: new trials would not compare with them; set it back, or {NEW_SWEEP}")


def set_by_sweep(spec: SweepSpec) -> set[str]:
    """The config keys the sweep file sets for every trial (its base and space, and what every
    variant sets): the base config's value of such a key reaches no trial."""
    every_variant = set.intersection(*(set(flat(v)) for v in spec.variants.values())) if spec.variants else set()
    return {*flat(spec.base), *spec.space, *every_variant}


def check_same_choices(spec: SweepSpec, before: dict) -> None:
    """Refuse a rerun that searches other keys (variants among them), or in another way, than the
    study's trials were drawn with (the report would describe trials that ran otherwise; a
    grid's would not be points of the new one), whose space lists other values for a key (or
    variants other than its), or that searches a key as a list that was a range or the other
    way: Optuna cannot change a choice within a study. Ranges may change."""
    import optuna.distributions as d

    was, now = searched(before.get("variants"), before.get("space")), search_space(spec)
    if set(was) != set(now):
        raise ConfigError(f"sweep {spec.name} searched {', '.join(was) or 'nothing'}, this file searches "
                          f"{', '.join(now) or 'nothing'}: the keys searched cannot change; set them back, or "
                          f"{NEW_SWEEP}")
    if before.get("method", spec.method) != spec.method:
        raise ConfigError(f"sweep {spec.name} drew its trials by a {before['method']} search, this file asks for a "
                          f"{spec.method} search: the method cannot change; set it back, or {NEW_SWEEP}")
    old_dists, new_dists = space_distributions(was), space_distributions(now)
    for key in (k for k in new_dists if k in old_dists):
        try:
            d.check_distribution_compatibility(old_dists[key], new_dists[key])
        except ValueError:
            name = "variants" if key == VARIANT else f"space.{key}"
            raise ConfigError(f"sweep {spec.name} drew its trials' {name} from {was[key]!r}, this file has "
                              f"{now[key]!r}: a study cannot change a list of values (ranges can change); set it "
                              f"back, or {NEW_SWEEP}") from None


def sweep_dir(spec: SweepSpec, base: Config) -> Path:
    """Where a sweep's trials and report live: <training.output_dir>/sweeps/<name>/."""
    return Path(base.training.output_dir) / "sweeps" / spec.name


def trial_dir(folder: Path, number: int) -> Path:
    return folder / f"trial-{number:03d}"


def report_only(spec: SweepSpec, base: Config, sweep_file: str) -> Path:
    """Rewrite the report of a sweep's finished trials (`write_report`), ranked and described as
    they ran (`check_same_sweep`); returns report.md."""
    folder = sweep_dir(spec, base)
    if not list(folder.glob(f"trial-*/{TRIAL_FILE}")):
        raise ConfigError(f"--report-only: no trials in {folder}; run python sweep.py {sweep_file} first (or pass "
                          "the training.output_dir it ran with)")
    check_same_sweep(folder, spec, base)
    return write_report(folder, spec)


def run_sweep(spec: SweepSpec, base: Config, config_path: str | None, overrides: list[str],
              train: Callable[..., dict], log: Callable[[str], None] = print, retry_failed: bool = False) -> Path:
    """Run (or continue) every trial of a sweep, then write the report; returns the sweep folder.
    With `retry_failed`, each failed trial not retried yet runs again first, from the start, as a
    new trial with its settings (Optuna's finished trials stay as they ended)."""
    import optuna
    from optuna.trial import TrialState

    check_trials(spec, base, config_path, overrides)
    check_folder(base.training.output_dir, "training.output_dir")
    folder = sweep_dir(spec, base)
    check_writable(folder, "training.output_dir")
    study = make_study(spec, folder)
    if study.get_trials(deepcopy=False):
        check_same_sweep(folder, spec, base)
    write_atomic(folder / SPEC_FILE, yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False))
    save_config(base, folder / "config.yaml")
    dists = distributions(spec)
    for ft in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        log(f"resuming trial {ft.number}")
        _run_one(study, optuna.trial.Trial(study, ft._trial_id), spec, base, folder, config_path, overrides, train, log)
    if retry_failed:
        retried = _retried(study)  # a retry run below retries none of the failed trials listed here
        for ft in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            if ft.number in retried:
                continue
            study.enqueue_trial(ft.params, user_attrs={RETRY_OF: ft.number})
            trial = study.ask(dists)
            record_path = trial_dir(folder, ft.number) / TRIAL_FILE
            _write_json(record_path, {**json.loads(record_path.read_text()), "retried_as": trial.number})
            log(f"retrying failed trial {ft.number} as trial {trial.number}")
            _run_one(study, trial, spec, base, folder, config_path, overrides, train, log)
    while _counted(study) < n_trials(spec):
        if spec.method == "grid":
            seen = [t.params for t in study.get_trials(deepcopy=False)]
            study.enqueue_trial(next(p for p in grid_points(spec) if p not in seen))
        else:
            study.sampler = sampler(spec, len(study.get_trials(deepcopy=False)))
        _run_one(study, study.ask(dists), spec, base, folder, config_path, overrides, train, log)
    write_report(folder, spec)
    return folder


RETRY_OF = "retry_of"  # the user attribute of a trial that reruns a failed one: that one's number


def _retried(study) -> set[int]:
    """The numbers of the failed trials that a later trial ran again."""
    return {t.user_attrs[RETRY_OF] for t in study.get_trials(deepcopy=False) if RETRY_OF in t.user_attrs}


def _counted(study) -> int:
    """The finished trials that count towards the sweep's number: a failed trial that was
    retried counts as its retry."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    return len(done) - len(_retried(study) & {t.number for t in done})


def _run_one(study, trial, spec: SweepSpec, base: Config, folder: Path, config_path: str | None,
             overrides: list[str], train: Callable[..., dict], log) -> None:
    from optuna.trial import TrialState

    number, params = trial.number, trial.params
    record_path = trial_dir(folder, number) / TRIAL_FILE
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"wall_seconds": 0.0}
    record.update(number=number, params=params, status="running")
    record_path.parent.mkdir(parents=True, exist_ok=True)
    clock = (record["wall_seconds"], time.monotonic())  # earlier sessions' time, this one's start
    try:
        cfg = trial_config(base, spec, params, folder, number, config_path, overrides)  # a bad value fails the trial
        t = cfg.training
        per_step = samples_per_step(t)
        record.update(max_steps=t.max_steps, samples_per_step=per_step, config=to_dict(cfg.training))
        _write_json(record_path, record)
        log(f"trial {number}: {params} ({t.max_steps} steps x {per_step} samples)")
        if record.get("pruned_at") is not None:
            log(f"trial {number}: pruned at step {record['pruned_at']} before the process stopped: finishing it "
                "without more training")
            cfg = dataclasses.replace(cfg, training=dataclasses.replace(t, max_steps=record["pruned_at"]))
        callback = pruning_callback(trial, spec.metric, per_step, spec.prune_warmup_evals, spec.eval_every_samples,
                                    partial(_note_check, record_path, record, clock))
        result = train(cfg, callbacks=[callback])
    except Exception as e:  # one trial's failure must not end the sweep: recorded, reported, retried on request
        if machine_problem(e):  # every later trial would fail alike: stop, resumable
            raise
        record.update(status="failed", error=f"{type(e).__name__}: {first_line(e)}")
        write_atomic(record_path.parent / "error.txt", traceback.format_exc())
        study.tell(number, state=TrialState.FAIL)
        log(f"trial {number}: failed ({record['error']}); traceback in {record_path.parent / 'error.txt'}")
        return
    finally:
        record["wall_seconds"] = _wall_seconds(clock)
        _write_json(record_path, record)
    value = best_value(sum(_evals(record_path.parent), []), spec.metric)
    if callback.pruned or record.get("pruned_at") is not None:
        record["status"] = "pruned"
        study.tell(number, state=TrialState.PRUNED)
    else:
        record["status"] = "complete"
        study.tell(number, value)
    record["result"] = result
    _write_json(record_path, record)
    log(f"trial {number}: {record['status']}, best {spec.metric} {value}")


def _wall_seconds(clock: tuple[float, float]) -> float:
    """A trial's wall time so far: its earlier sessions' and this one's, from `clock`
    (earlier seconds, this session's `time.monotonic()` start)."""
    return clock[0] + time.monotonic() - clock[1]


def _note_check(record_path: Path, record: dict, clock: tuple[float, float], step: int, pruned: bool) -> None:
    """Write a trial's record after each of its checks: its wall time so far, which a killed
    process cannot add at the end, and the step it was pruned at, so that a rerun after a kill
    in its final phase finishes it rather than training it on."""
    record["wall_seconds"] = _wall_seconds(clock)
    if pruned:
        record["pruned_at"] = step
    _write_json(record_path, record)


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(obj, indent=2, default=str))


def _evals(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """The periodic checks in a run's metrics.jsonl, the validation split's (the test split's
    scores are reported, never used to choose), and the `average` event of the checkpoint
    average that best/ holds, where averaging won (a list of it, else []): it ranks the trial
    as it chose best/."""
    events = read_events(run_dir)  # a line cut short by a kill is skipped, a resume's repeats merged
    steps = (read_best(run_dir) or {}).get("averaged_steps")
    average = [e for e in events if steps and e.get("event") == "average" and e.get("averaged_steps") == steps]
    return selection_checks(events), average[-1:]


def best_value(evals: list[dict], metric: str) -> float:
    """A trial's objective: its best `metric` at a check after step 0; inf without one, so that
    it cannot win (its final score is on the test split, reported but never used to choose)."""
    scores = [e[metric] for e in evals if e.get("step", 0) > 0 and e.get(metric) is not None]
    return float(min(scores)) if scores else math.inf


def read_trials(folder: Path) -> list[dict]:
    """Every trial record of a sweep folder, with its eval history from metrics.jsonl."""
    trials = []
    for path in sorted(folder.glob(f"trial-*/{TRIAL_FILE}")):
        rec = json.loads(path.read_text())
        rec["evals"], rec["average"] = _evals(path.parent)
        trials.append(rec)
    return trials


def write_report(folder: Path, spec: SweepSpec) -> Path:
    """report.md (one table, winner first) and wer.png (the sweep's metric against samples seen, every
    trial)."""
    trials = read_trials(folder)
    rows = []
    for t in trials:
        evals = [e for e in t["evals"] + t["average"] if e.get("step", 0) > 0]
        best = min(evals, key=lambda e: e[spec.metric]) if evals else {}
        rows.append({"trial": t["number"], "status": t["status"], "params": t["params"], "best": best,
                     "test": (t.get("result") or {}).get("wer"), "split": best.get("split", "eval"),
                     "steps": max((e["step"] for e in t["evals"]), default=0),
                     "samples": max((e["step"] for e in t["evals"]), default=0) * t.get("samples_per_step", 0),
                     "wall": t.get("wall_seconds", 0.0)})
    rows.sort(key=lambda r: (r["status"] != "complete", r["best"].get(spec.metric, math.inf)))
    split = next((r["split"] for r in rows if r["best"]), "validation")
    lines = [f"# Sweep {spec.name}", "",
             f"{spec.method} search over {', '.join(search_space(spec))}; metric {spec.metric} on the {split} split (lower is "
             f"better); {len(trials)} trials; every trial trained on "
             f"{spec.budget_samples or 'the configured steps x batch'} samples and evaluated on the same set. "
             "Trials are ranked on the periodic checks; the test column is each trial's best/ on the test split, "
             "reported only.", ""]
    if spec.variants:
        lines += ["Variants:", ""] + [f"- `{name}`: " + (", ".join(f"{k}={v}" for k, v in o.items()) or "the defaults")
                                     for name, o in spec.variants.items()] + [""]
    if split in ("test", "eval"):
        lines += ["**Note:** the feature store has no validation split, so trials were ranked on the test split and "
                  "the winner's test WER is optimistic.", ""]
    done = [r for r in rows if r["status"] == "complete" and r["best"]]
    tied = [r for r in done if done and r["best"][spec.metric] == done[0]["best"][spec.metric]]
    if len(tied) > 1:
        lines += [f"**No winner: trials {', '.join(str(r['trial']) for r in tied)} tie** at {spec.metric} "
                  f"{100 * tied[0]['best'][spec.metric]:.2f}% ({'; '.join(_params(r['params']) for r in tied)}): this "
                  "sweep cannot tell them apart.", ""]
    elif done:
        win = done[0]
        lines.append(f"**Winner: trial {win['trial']}** ({_params(win['params'])}): {spec.metric} "
                     f"{100 * win['best'][spec.metric]:.2f}%"
                     + (f", {100 * (done[1]['best'][spec.metric] - win['best'][spec.metric]):.2f} points better than the "
                        f"runner-up (trial {done[1]['trial']})" if len(done) > 1 else "") + ".")
        lines.append("")
    lines += [f"| trial | status | settings | {split} WER % | {split} normalized WER % | {split} CER % | at step | "
              "test WER % | steps | samples seen | wall time |",
              "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = r["best"]
        cells = [f"{100 * b[k]:.2f}" if b.get(k) is not None else "-" for k in ("wer", "wer_normalized", "cer")]
        test = "-" if r["test"] is None else f"{100 * r['test']:.2f}"
        lines.append(f"| {r['trial']} | {r['status']} | {_params(r['params'])} | {' | '.join(cells)} | "
                     f"{_at(b)} | {test} | {r['steps']} | {r['samples']} | {r['wall'] / 60:.1f} min |")
    failed = [t for t in trials if t["status"] == "failed"]
    if failed:
        lines += ["", "Failed trials (tracebacks in each trial's error.txt; `python sweep.py FILE --retry-failed` runs "
                  "the ones not retried yet again):", ""]
        lines += [f"- trial {t['number']} ({_params(t['params'])}): {t.get('error', '')}"
                  + (f"; retried as trial {t['retried_as']}" if "retried_as" in t else "") for t in failed]
    report = folder / "report.md"
    write_atomic(report, "\n".join(lines) + f"\n\n![{spec.metric} against samples seen](wer.png)\n")
    _plot(folder / "wer.png", trials, spec.metric)
    return report


def _at(best: dict) -> str:
    """Where a trial's best score comes from: a check's step, or the average of several."""
    if best.get("averaged_steps"):
        return f"average of {', '.join(map(str, best['averaged_steps']))}"
    return str(best.get("step", "-"))


def _params(params: dict) -> str:
    """`learning_rate=1e-05, lora.enabled=True, features.name=cv`: keys of the training
    section without it, others whole (`lora.enabled` and `spec_augment.enabled` stay apart)."""
    def label(key: str) -> str:
        return key.removeprefix("training.")

    return ", ".join(f"{label(k)}={v:.3g}" if isinstance(v, float) else f"{label(k)}={v}" for k, v in params.items())


def _plot(path: Path, trials: list[dict], metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for t in trials:
        xs = [e["step"] * t["samples_per_step"] for e in t["evals"]]
        ys = [100 * e[metric] for e in t["evals"]]
        if xs:
            ax.plot(xs, ys, marker="o", linestyle="--" if t["status"] == "pruned" else "-",
                    label=f"{t['number']}: {_params(t['params'])} ({t['status']})")
    ax.set_xlabel("training samples seen")
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)

