"""Typed, frozen configuration for the three stages, loaded from one `config.yaml`.

Every field is documented once, in `config.yaml` at the repository root. Loading checks
names and types and raises `ConfigError` naming the offending key; the command-line
front end (`whisper_ft.cli`) turns that into a one-line error with exit code 2.

    cfg = load_config("config.yaml", overrides=["training.learning_rate=3e-5"])
    cfg = load_config("config.yaml", values={"training.learning_rate": 3e-5})  # typed, no YAML
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from whisper_ft.errors import UserError
from whisper_ft.files import staging_dir, write_atomic


log = logging.getLogger(__name__)

# Keys that earlier versions read and this one does not, with what replaced them: a config.yaml
# written before (a sweep's saved copy, say) still loads, with a warning naming each one it sets.
WINDOW_AFTER_WINDOW = "long audio is decoded window after window, each starting where the last one's speech ended"
RETIRED = {"app.chunk_seconds": WINDOW_AFTER_WINDOW, "app.stride_seconds": WINDOW_AFTER_WINDOW,
           "app.batch_size": WINDOW_AFTER_WINDOW}


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message names the key."""


# The choices of the keys that take one of a few words (a value outside them is refused by type)
Task = Literal["transcribe", "translate"]
SourceKind = Literal["common_voice", "mdc", "hf"]
OverlapPolicy = Literal["refuse", "drop", "keep"]
FeatureDtype = Literal["float16", "float32"]
SelectMetric = Literal["wer", "wer_normalized", "cer"]  # the scores of a check that may pick best/ (lower wins)
AverageMode = Literal["last", "best"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
# transformers' scheduler names (transformers.trainer_utils.SchedulerType), without importing it here
# (those that need arguments of their own, such as cosine_with_min_lr's min_lr or warmup_stable_decay's
# decay steps, are not offered: the config has no key for them)
LrScheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                      "inverse_sqrt", "reduce_lr_on_plateau"]
SOURCE_KINDS, OVERLAP_POLICIES, AVERAGE_MODES, SELECT_METRICS, LR_SCHEDULERS = map(
    typing.get_args, (SourceKind, OverlapPolicy, AverageMode, SelectMetric, LrScheduler))


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = "openai/whisper-small"
    language: str = "sv"
    task: Task = "transcribe"


@dataclass(frozen=True)
class SourceConfig:
    name: str = "sample"
    kind: SourceKind = "common_voice"
    path: str = ""
    dataset_id: str = ""
    hf_config: str = ""
    train_splits: tuple[str, ...] = ("train", "dev")
    eval_splits: tuple[str, ...] = ("test",)
    validation_splits: tuple[str, ...] = ()
    validation_from: str = "dev"
    validation_fraction: float = 0.1
    validation_max_clips: int = 1000
    audio_column: str = "audio"
    text_column: str = "sentence"
    speaker_column: str = "client_id"
    limit: int = 0


MAX_TARGET_POSITIONS = 448  # Whisper's decoder length: the longest label, prefix and end included
# the features.* keys that training reads; the others decide how feature_pipeline.py builds a store
TRAINING_READS = ("name", "data_dir", "on_overlap")


@dataclass(frozen=True)
class FeaturesConfig:
    name: str = "sample"
    data_dir: str = "data"
    sources: tuple[SourceConfig, ...] = (SourceConfig(path="data/sample/cv-corpus-sample/sv-SE"),)
    min_seconds: float = 0.5
    max_seconds: float = 30.0
    max_label_tokens: int = MAX_TARGET_POSITIONS
    dtype: FeatureDtype = "float16"
    shard_size: int = 1000
    batch_size: int = 16
    workers: int = 0
    on_overlap: OverlapPolicy = "refuse"
    served_clips: int = 200
    claim_stale_seconds: float = 300.0


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = False
    rank: int = 32
    alpha: int = 64
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass(frozen=True)
class SpecAugmentConfig:
    enabled: bool = False
    mask_time_prob: float = 0.05
    mask_time_length: int = 10
    mask_feature_prob: float = 0.0
    mask_feature_length: int = 10


@dataclass(frozen=True)
class TrainingConfig:
    run_name: str = "whisper-small-sv"
    output_dir: str = "checkpoints"
    learning_rate: float | Literal["auto"] = "auto"
    lr_scheduler: LrScheduler = "linear"
    warmup_steps: int | None = None
    warmup_fraction: float = 0.1
    max_steps: int = 4000
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    eval_steps: int = 500
    save_steps: int = 500
    logging_steps: int = 25
    eval_batch_size: int = 64
    eval_subset: int = 0
    eval_before_training: bool = True
    eval_features: str = ""
    generation_max_length: int = 0
    num_beams: int = 1
    select_metric: SelectMetric = "wer"
    save_total_limit: int = 2
    background_saves: bool = True
    average_checkpoints: int = 0
    average_mode: AverageMode = "last"
    precision: Precision = "auto"
    autocast: bool = False
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    fast_generation: bool = True
    dataloader_workers: int = 4
    seed: int = 42
    export_ctranslate2: bool = True
    score_served: bool = True
    push_to_hub: str | None = None
    hub_private: bool = False
    dropout: float = 0.0
    freeze_encoder: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    spec_augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)


@dataclass(frozen=True)
class AppConfig:
    model: str = ""
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    max_media_seconds: float = 3600.0
    translate_to: str = "en"
    translate_timeout_seconds: float = 60.0
    cookies_file: str = ""
    device: str = "cpu"
    use_ctranslate2: bool = True
    beam_size: int = 5
    temperature_fallback: bool = True
    workers: int = 4
    queue_size: int = 64
    allow_private_urls: bool = False
    max_download_mb: float = 500.0
    download_timeout_seconds: float = 300.0
    request_timeout_seconds: float = 900.0
    auth_file: str = ""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    app: AppConfig = field(default_factory=AppConfig)


def read_mapping(path: str | Path, what: str, holds: str) -> dict:
    """A YAML file that holds a mapping (an empty file: {}); else ConfigError naming `what` it is
    (a "config file") and what its mapping `holds`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path} is not UTF-8 text (line {line}): save it as UTF-8") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML{yaml_problem(e)}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of {holds}, got {type(raw).__name__}")
    return raw


def lookup(tree: Any, key: str, default: Any = None) -> Any:
    """The value at dotted `key` of nested mappings (a saved config.yaml), or `default` where a
    part of it is missing."""
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


def flat(tree: Mapping, prefix: str = "", lists: bool = False) -> dict:
    """{"training.lora.rank": 8, ...}: the dotted keys --set takes, of nested mappings (an empty
    one stays a value) and, with `lists`, of lists of mappings by index (features.sources.0.path)."""
    out = {}
    for k, v in tree.items():
        if lists and isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
            v = {str(i): x for i, x in enumerate(v)}
        if isinstance(v, Mapping) and v:
            out.update(flat(v, f"{prefix}{k}.", lists))
        else:
            out[f"{prefix}{k}"] = v
    return out


def first_change(before: dict, now: dict, compared=lambda key: True) -> tuple | None:
    """(key, before, now) of the first key, in `now`'s order then `before`'s, whose value differs
    and for which `compared(key)`; None where none does (a missing key is None)."""
    keys = [*now, *(k for k in before if k not in now)]
    return next(((k, before.get(k), now.get(k)) for k in keys if compared(k) and before.get(k) != now.get(k)), None)


def load_config(path: str | Path | None = "config.yaml", overrides: list[str] | tuple[str, ...] = (),
                values: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> Config:
    """Read a YAML file (None: defaults only), apply `section.key=value` overrides, then typed
    `values` by dotted key (a mapping or (key, value) pairs, in order), type-check."""
    raw = {} if path is None else read_mapping(path, "config file", "sections")
    for item in overrides:
        apply_override(raw, item)
    for key, value in values.items() if isinstance(values, Mapping) else values:
        set_value(raw, key, value)
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in a nested dict in place, the value read as YAML."""
    set_value(raw, *parse_override(item))


@dataclasses.dataclass(frozen=True)
class Override:
    """A `--set` value as typed and as YAML reads it: a string field takes the text (`no`, `010`,
    `1:30` and `~/data` stay as typed, where YAML 1.1 would make them false, 8, 90 and null),
    any other field the YAML value."""

    text: str
    parsed: Any


class _UniqueKeys(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with a key written twice, as YAML does (PyYAML
    would keep the last value silently); keys brought in by a `<<` merge may be overridden."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is written twice",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str):
    """YAML as `yaml.safe_load` reads it, refusing a key written twice in one mapping."""
    return yaml.load(text, Loader=_UniqueKeys)


def yaml_problem(error: yaml.YAMLError) -> str:
    """' (line N): what is wrong' of a YAML error, for a one-line message."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    where = f" (line {mark.line + 1})" if mark else ""
    return f"{where}: {problem or str(error).splitlines()[0]}"


def parse_override(item: str) -> tuple[str, Override]:
    """`a.b.c=value` as its dotted key and its value (`Override`)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    try:
        return key.strip(), Override(text.strip(), yaml.safe_load(text) if text.strip() else "")
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {text!r}") from e


def set_value(raw: dict, key: str, value: Any) -> None:
    """Set the dotted `key` to a typed value in a nested dict in place; list elements are
    addressed by index (`features.sources.1.path`), the next index appends."""
    value = copy.deepcopy(value)  # a later key may set inside it; the caller's value stays as it was
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, ".".join(parts[: i + 1]))
            continue
        child = node.get(part)
        if isinstance(child, Override):  # set whole by an earlier override, now set inside
            child = node[part] = child.parsed
        if child is None:
            child = node[part] = [] if part == "sources" else {}
        if part == "sources" and not isinstance(child, list):
            raise ConfigError(f"{'.'.join(parts[: i + 1])} must be a list")
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"{key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    last = parts[-1]
    if isinstance(node, list):
        if last.isdigit() and int(last) == len(node):
            node.append(value)
        else:
            node[_index(node, last, key)] = value
    else:
        node[last] = value


def _index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{where}: no list element {part!r} (the list has {len(node)})")
    return int(part)


def _list_item(node: list, part: str, where: str) -> Any:
    if part.isdigit() and int(part) == len(node):
        node.append({})
    return node[_index(node, part, where)]


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    raw = _without_retired(raw, names, where)
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown config key: {_join(where, str(unknown[0]))}")
    kwargs = {name: _convert(hints[name], value, _join(where, name)) for name, value in raw.items()}
    return cls(**kwargs)


def _without_retired(raw: dict, names: set[str], where: str) -> dict:
    """`raw` without the keys in RETIRED (`names` aside), each logged as ignored."""
    kept = {}
    for name, value in raw.items():
        key = _join(where, str(name))
        if key in RETIRED and name not in names:
            log.warning("%s is no longer a setting and is ignored (%s); delete it from the config", key, RETIRED[key])
        else:
            kept[name] = value
    return kept


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(value, Override) and origin not in (typing.Union, types.UnionType):
        value = value.text if tp is str else value.parsed
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, where)
    if origin is tuple:
        if isinstance(value, str):  # "q_proj,v_proj" as well as [q_proj, v_proj]; "" (`--set key=`) as []
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_tp = typing.get_args(tp)[0]
        return tuple(_convert(item_tp, v, f"{where}.{i}") for i, v in enumerate(value))
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) or value not in choices:  # True == 1: a bool is no choice
            raise ConfigError(f"{where}: expected {_one_of(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):  # the first member type that takes the value
        members = typing.get_args(tp)
        plain = value.parsed if isinstance(value, Override) else value
        if plain is None and type(None) in members:
            return None
        wanted = []
        for member in (m for m in members if m is not type(None)):
            try:
                return _convert(member, value, where)
            except ConfigError as e:  # "<where>: expected <what>, got <value>"
                wanted.append(str(e).split(": expected ", 1)[1].rsplit(", got ", 1)[0])
        raise ConfigError(f"{where}: expected {' or '.join(wanted)}, got {plain!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-5 (no dot) as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        value = str(value)
        if where.rsplit(".", 1)[-1] in PATH_KEYS and value.startswith("~"):  # the shell leaves key=~/x alone
            value = os.path.expanduser(value)
        return value
    raise TypeError(f"{where}: unsupported config type {tp}")


def _one_of(choices: Iterable) -> str:
    words = list(map(str, choices))
    return " or ".join(words) if len(words) < 3 else f"one of {', '.join(words)}"


PATH_KEYS = ("data_dir", "output_dir", "cookies_file", "auth_file", "path", "name_or_path", "model")  # ~ expanded


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def validate(cfg: Config) -> None:
    """Checks that span fields; each error names the key."""
    check_finite(cfg, "")
    validate_features(cfg.features)
    check_language(cfg.model.language)
    validate_training(cfg.training)
    validate_app(cfg.app)


def validate_features(f: FeaturesConfig) -> None:
    check_folder_name(f.name, "features.name")
    if not 0 < f.max_seconds <= 30:
        raise ConfigError(f"features.max_seconds: must be in (0, 30], got {f.max_seconds}")
    if not 0 <= f.min_seconds < f.max_seconds:
        raise ConfigError("features.min_seconds: must be >= 0 and below features.max_seconds")
    if not 0 < f.max_label_tokens <= MAX_TARGET_POSITIONS:
        raise ConfigError(f"features.max_label_tokens: must be in 1..{MAX_TARGET_POSITIONS}, got {f.max_label_tokens}")
    for name, value in (("shard_size", f.shard_size), ("batch_size", f.batch_size)):
        if value < 1:
            raise ConfigError(f"features.{name}: must be at least 1, got {value}")
    if f.workers < 0:
        raise ConfigError(f"features.workers: must be at least 0 (0 = all cores), got {f.workers}")
    if f.served_clips < 0:
        raise ConfigError(f"features.served_clips: must be at least 0, got {f.served_clips}")
    if not f.claim_stale_seconds > 0:
        raise ConfigError(f"features.claim_stale_seconds: must be above 0, got {f.claim_stale_seconds}")
    if not f.sources:
        raise ConfigError("features.sources: at least one source is needed")
    seen = set()
    for i, s in enumerate(f.sources):
        if not s.name or s.name in seen:
            raise ConfigError(f"features.sources.{i}.name: must be set and unique, got {s.name!r}")
        seen.add(s.name)
        if s.kind == "mdc" and not s.dataset_id:
            raise ConfigError(f"features.sources.{i}.dataset_id: needed for kind mdc")
        if s.kind in ("common_voice", "hf") and not s.path:
            raise ConfigError(f"features.sources.{i}.path: needed for kind {s.kind}")
        for key in ("limit", "validation_max_clips"):
            if getattr(s, key) < 0:
                raise ConfigError(f"features.sources.{i}.{key}: must be at least 0, got {getattr(s, key)}")
        if not 0 <= s.validation_fraction < 1:
            raise ConfigError(f"features.sources.{i}.validation_fraction: must be in [0, 1), "
                              f"got {s.validation_fraction}")


def validate_training(t: TrainingConfig) -> None:
    check_folder_name(t.run_name, "training.run_name")
    if t.eval_features:
        check_folder_name(t.eval_features, "training.eval_features")
    if t.learning_rate != "auto" and not t.learning_rate > 0:
        raise ConfigError(f"training.learning_rate: must be auto or above 0, got {t.learning_rate}")
    if t.warmup_steps is not None and t.warmup_steps < 0:
        raise ConfigError(f"training.warmup_steps: must be at least 0 (or null: use warmup_fraction), got {t.warmup_steps}")
    if not 0 <= t.warmup_fraction < 1:
        raise ConfigError(f"training.warmup_fraction: must be in [0, 1), got {t.warmup_fraction}")
    if t.average_checkpoints == 1 or t.average_checkpoints < 0:
        raise ConfigError(f"training.average_checkpoints: 0 (off) or at least 2, got {t.average_checkpoints}")
    if t.push_to_hub:
        check_repo_id(t.push_to_hub, "training.push_to_hub")
    for name in ("max_steps", "batch_size", "eval_steps", "save_steps", "eval_batch_size",
                 "gradient_accumulation_steps", "logging_steps", "num_beams"):
        if getattr(t, name) < 1:
            raise ConfigError(f"training.{name}: must be at least 1, got {getattr(t, name)}")
    for name, value in (("dataloader_workers", t.dataloader_workers), ("save_total_limit", t.save_total_limit),
                        ("eval_subset", t.eval_subset), ("generation_max_length", t.generation_max_length),
                        ("weight_decay", t.weight_decay), ("seed", t.seed)):
        if value < 0:
            raise ConfigError(f"training.{name}: must be at least 0, got {value}")
    if t.seed > 2**32 - 1:  # numpy's seeds, which the Trainer sets
        raise ConfigError(f"training.seed: must be from 0 to {2**32 - 1}, got {t.seed}")
    if t.save_total_limit == 1:  # the Trainer would then delete the newest checkpoint at the end when it is not the best
        raise ConfigError("training.save_total_limit: 1 cannot keep both the newest checkpoint (to resume from) and "
                          "the best check's; use 2 or more, or 0 to keep every checkpoint")
    for name, value in (("dropout", t.dropout), ("lora.dropout", t.lora.dropout),
                        ("spec_augment.mask_time_prob", t.spec_augment.mask_time_prob),
                        ("spec_augment.mask_feature_prob", t.spec_augment.mask_feature_prob)):
        if not 0 <= value < 1:
            raise ConfigError(f"training.{name}: must be in [0, 1), got {value}")
    for name, value in (("lora.rank", t.lora.rank), ("lora.alpha", t.lora.alpha),
                        ("spec_augment.mask_time_length", t.spec_augment.mask_time_length),
                        ("spec_augment.mask_feature_length", t.spec_augment.mask_feature_length)):
        if value < 1:
            raise ConfigError(f"training.{name}: must be at least 1, got {value}")


def is_folder_name(name: str) -> bool:
    """Whether `name` is one folder under its parent: not empty, `.` or `..` (the parent or above
    it) and no path separator."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name


def check_folder_name(name: str, key: str) -> None:
    """`name` is one folder name (`is_folder_name`): else it would point at the parent, where
    --fresh or --overwrite would then delete every folder."""
    if not is_folder_name(name):
        raise ConfigError(f"{key}: must be one folder name (not empty, . or .., no / or \\), got {name!r}; "
                          f"set it with --set {key}=NAME")


def check_folder(path: str | Path, key: str) -> None:
    """`path` is a folder or can be made one: neither it nor a folder above it is a file. Checked
    where the folder is used (the config is loaded by commands that never write there)."""
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            if not p.is_dir():
                where = "" if p == Path(path) else f" (in {path})"
                raise ConfigError(f"{key}: {p}{where} is a file, not a folder; set {key} to a folder")
            return


def check_writable(path: str | Path, key: str) -> None:
    """`path` is a folder this process can write in: made where missing, a probe file written
    there and removed, and the folders it made removed again, since the command may still stop
    at a later check (a read-only mount or a folder of another user would otherwise fail the
    first write, after minutes of loading data and the model)."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]  # the deepest first
    probe = staging_dir(path / "write-probe")  # a killed process's leftover is removed like any other
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{key}: cannot write in {path} ({e.strerror or e}); set {key} to a folder you can write "
                          "in, or make this one writable") from e
    finally:
        for folder in missing:
            try:
                folder.rmdir()
            except FileNotFoundError:  # not made: the error above came first
                continue
            except OSError:  # another process writes in it now
                break


def check_finite(cfg: Any, where: str) -> None:
    """No number of the config is infinite or NaN (`inf` reads as a float and passes `> 0`)."""
    for field in dataclasses.fields(cfg):
        value, key = getattr(cfg, field.name), _join(where, field.name)
        items = value if isinstance(value, tuple) else (value,)
        for i, item in enumerate(items):
            item_key = f"{key}.{i}" if isinstance(value, tuple) else key
            if dataclasses.is_dataclass(item):
                check_finite(item, item_key)
            elif isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{item_key}: must be a finite number, got {item}")


def validate_app(app: AppConfig) -> None:
    """Limits of the app must be positive: a zero would refuse everything, a negative makes no sense."""
    for name in ("max_media_seconds", "max_download_mb", "download_timeout_seconds", "request_timeout_seconds",
                 "translate_timeout_seconds"):
        if getattr(app, name) <= 0:
            raise ConfigError(f"app.{name}: must be above 0, got {getattr(app, name)}")
    for name in ("workers", "queue_size", "beam_size"):
        if getattr(app, name) < 1:
            raise ConfigError(f"app.{name}: must be at least 1, got {getattr(app, name)}")
    if not app.host.strip():  # gradio would bind $GRADIO_SERVER_NAME or 127.0.0.1, not what the warnings name
        raise ConfigError("app.host: expected an address or host name to bind (127.0.0.1: this machine only; "
                          "0.0.0.0: the network), got an empty value")
    if not 1 <= app.port <= 65535:  # 0 would bind a random port that the page's address would not name
        raise ConfigError(f"app.port: must be from 1 to 65535, got {app.port}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", app.device):
        raise ConfigError(f"app.device: expected auto, cpu, cuda or cuda:N, got {app.device!r}")
    check_translate_to(app.translate_to)


WHISPER_SPELLING = {"nb": "no", "iw": "he", "jv": "jw"}  # ISO codes Whisper spells otherwise (Bokmål: "no")


def whisper_code(locale: str) -> str | None:
    """Whisper's code for the language of a locale or language tag ("sv-SE" -> "sv", "nb-NO" ->
    "no"); None for a language Whisper does not know ("gsw")."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    primary = locale.replace("_", "-").split("-")[0].lower()
    code = WHISPER_SPELLING.get(primary, primary)
    return code if code in LANGUAGES else None


def check_language(language: str) -> None:
    """`language` is one of Whisper's 100 language codes (the lists of transformers and of
    faster-whisper, which serves the CTranslate2 export, are the same). A name ("swedish") or a
    locale ("sv-SE", Common Voice's) is refused with the code to use."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    if language in LANGUAGES:
        return
    code = TO_LANGUAGE_CODE.get(language.lower()) or whisper_code(language)
    hint = f" (did you mean {code!r}, {LANGUAGES[code].title()}?)" if code in LANGUAGES else ""
    raise ConfigError(f"model.language: {language!r} is not a Whisper language code{hint}; use one of: "
                      f"{', '.join(sorted(LANGUAGES))}")


def check_translate_to(code: str) -> None:
    """`code` is one of the page's translation targets: the page sends its default with every
    request, and Gradio refuses a value its list lacks, so one unknown code fails every request."""
    from whisper_ft.translate import LANGUAGES  # deep-translator's list, imported only here

    codes = sorted(LANGUAGES.values())
    if code not in codes:
        near = [c for c in codes if c.split("-")[0].lower() == code.split("-")[0].lower()]
        hint = f" (did you mean {' or '.join(near)}?)" if near else ""
        raise ConfigError(f"app.translate_to: {code!r} is not a Google Translate language code{hint}; use one of: "
                          f"{', '.join(codes)}")


def check_repo_id(repo_id: str, key: str) -> None:
    """A Hugging Face Hub repository id with its owner: USER/NAME."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"{key}: {repo_id!r} is not a Hub repository id ({str(e).splitlines()[0]})") from e
    if "/" not in repo_id:
        raise ConfigError(f"{key}: expected USER/NAME (owner, then repository), got {repo_id!r}")


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) of a config, for YAML/JSON beside outputs."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v
    return plain(cfg)


def save_config(cfg: Config, path: str | Path, tag: str = "") -> None:
    """Write the resolved config as YAML (atomically; `tag` names its temporary file: `write_atomic`)."""
    write_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), tag)


def stage1_only(key: str) -> bool:
    """Whether the dotted `key` is a setting of feature_pipeline.py that training never reads."""
    return key.startswith("features.") and key.split(".")[1] not in TRAINING_READS
