"""Config loading: typed values, dotted overrides, and one-line command-line errors (exit 2)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from conftest import PROCESSOR_DIR, ROOT, run_cli

from whisper_ft.config import ConfigError, load_config, load_yaml

CONFIG = str(ROOT / "config.yaml")


def test_defaults_file_loads_and_floats_parse():
    cfg = load_config(CONFIG, ["training.learning_rate=1e-5", "features.max_seconds=20"])
    assert cfg.training.learning_rate == 1e-5 and isinstance(cfg.training.learning_rate, float)
    assert cfg.features.max_seconds == 20.0 and isinstance(cfg.features.max_seconds, float)


def test_dotted_overrides_reach_list_elements():
    cfg = load_config(CONFIG, ["features.sources.0.path=/x/cv/sv-SE", "features.sources.0.train_splits=[train]",
                               "features.sources.1.name=extra", "features.sources.1.kind=hf",
                               "features.sources.1.path=/y", "features.sources.1.text_column=text"])
    assert [s.name for s in cfg.features.sources] == ["sample", "extra"]
    assert cfg.features.sources[0].path == "/x/cv/sv-SE"
    assert cfg.features.sources[0].train_splits == ("train",)
    assert cfg.features.sources[1].kind == "hf" and cfg.features.sources[1].text_column == "text"
    assert cfg.features.sources[1].eval_splits == ("test",)  # defaults fill the rest


def test_an_empty_list_override_is_no_splits():
    """`--set ...eval_splits=` is no test split, as `=[]` is (and as an empty validation_from is
    no carving), not a split named ""."""
    keys = ("train_splits", "eval_splits", "validation_splits")
    cfg = load_config(CONFIG, [f"features.sources.0.{k}=" for k in keys] + ["features.sources.0.validation_from="])
    src = cfg.features.sources[0]
    assert [getattr(src, k) for k in keys] == [(), (), ()] and src.validation_from == ""
    assert load_config(CONFIG, ["features.sources.0.eval_splits= test , "]).features.sources[0].eval_splits == ("test",)


@pytest.mark.parametrize("overrides, key", [
    (["features.nmae=x"], "features.nmae"),
    (["features.shard_size=many"], "features.shard_size"),
    (["training.gradient_checkpointing=maybe"], "training.gradient_checkpointing"),
    (["features.sources.0.colour=red"], "features.sources.0.colour"),
    (["features.sources.3.path=/x"], "features.sources.3"),
    (["features.dtype=int8"], "features.dtype"),
    (["features.sources.0.limit=-5"], "features.sources.0.limit"),
    (["features.sources.0.validation_max_clips=-1"], "features.sources.0.validation_max_clips"),
    (["features.sources.0.validation_fraction=1"], "features.sources.0.validation_fraction"),  # nothing left to train
    (["features.sources.0.validation_fraction=-0.1"], "features.sources.0.validation_fraction"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIG, overrides)


def test_unknown_key_in_file(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("features:\n  name: x\n  shard_sise: 3\n")
    with pytest.raises(ConfigError, match=r"features\.shard_sise"):
        load_config(bad)


def test_a_key_written_twice_in_the_file_is_refused_with_its_line(tmp_path):
    """PyYAML keeps the last of two values silently: the first may be the one the user reads."""
    twice = tmp_path / "c.yaml"
    twice.write_text("training:\n  learning_rate: 1.0e-5\n  batch_size: 16\n  learning_rate: 3.0e-5\n")
    with pytest.raises(ConfigError, match=r"c.yaml is not valid YAML \(line 4\): key 'learning_rate' is written twice"):
        load_config(twice)
    merged = tmp_path / "m.yaml"  # a `<<` merge's keys may be overridden
    merged.write_text("x: &d {learning_rate: 1.0e-5, batch_size: 8}\ntraining:\n  <<: *d\n  batch_size: 4\n")
    assert yaml.safe_load(merged.read_text()) == load_yaml(merged.read_text())


@pytest.mark.parametrize("args, needle", [
    (["--config", CONFIG, "--set", "features.shard_sise=3"], "features.shard_sise"),
    (["--config", CONFIG, "--set", "features.batch_size=lots"], "features.batch_size"),
    (["--config", CONFIG, "--set", "features.batch_size"], "features.batch_size"),
    (["--config", CONFIG, "--set", "features.sources.0.kind=ftp"], "features.sources.0.kind"),
    (["--config", "/nonexistent/config.yaml"], "/nonexistent/config.yaml"),
])
def test_cli_config_errors_are_one_line_exit_2(args, needle, tmp_path):
    proc = run_cli("feature_pipeline.py", *args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_path_arguments_expand_a_tilde_the_shell_left(tmp_path, monkeypatch, capsys):
    """`--config=~/c.yaml` (bash expands ~ only at a word's start) in every entry script, and
    sweep.py's sweep file, as config values such as features.data_dir=~/x are."""
    import sweep as entry

    from whisper_ft import cli

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text("features:\n  name: from-home\n")
    args = cli.base_parser("x").parse_args(["--config=~/c.yaml"])
    assert args.config == str(tmp_path / "c.yaml") and cli.config_from_args(args).features.name == "from-home"
    (tmp_path / "lr.yaml").write_text((ROOT / "sweeps" / "lr.yaml").read_text())
    out = tmp_path / "runs"
    assert cli.run(entry.main, ["~/lr.yaml", "--report-only", "--config=~/c.yaml", "--set",
                                f"training.output_dir={out}"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --report-only: no trials in {out}")  # the file was read


def test_config_file_that_is_not_utf8_is_one_line_exit_2(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("features:\n  name: x  # Malmö\n".encode("latin-1"))
    proc = run_cli("feature_pipeline.py", "--config", str(latin1), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr == f"error: {latin1} is not UTF-8 text (line 2): save it as UTF-8\n"


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    from whisper_ft import cli
    from whisper_ft.errors import UserError
    from whisper_ft.features import FeaturesError
    from whisper_ft.model import ModelNotFound

    for error in (FeaturesError("no features"), ModelNotFound("no model"), ConfigError("bad key")):
        assert isinstance(error, UserError)

        def fails(argv, error=error):
            raise error

        assert cli.run(fails, []) == 2
        assert capsys.readouterr().err == f"error: {error}\n"

    def bug(argv):
        raise ValueError("a bug, not the user's mistake")

    with pytest.raises(ValueError, match="a bug"):
        cli.run(bug, [])



def test_a_model_whose_weights_are_cut_short_is_a_one_line_error(tiny_model_dir, tmp_path):
    import shutil

    from whisper_ft.model import ModelNotFound, load_model

    model = shutil.copytree(tiny_model_dir, tmp_path / "best")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50_000])  # a copy cut short
    with pytest.raises(ModelNotFound, match=rf"^cannot load a Whisper model from {model}: .+$"):
        load_model(str(model))

@pytest.mark.parametrize("value", ["1", "on", "YES", "true"])
def test_a_hub_id_not_in_the_cache_is_refused_at_once_when_hf_hub_offline_is_set(monkeypatch, value):
    from whisper_ft.model import ModelNotFound, resolve

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.setattr("requests.head", lambda *a, **k: pytest.fail("asked the Hub although offline"))
    with pytest.raises(ModelNotFound, match="someone/no-such-whisper is not in the local Hugging Face cache and "
                                            "HF_HUB_OFFLINE is set"):
        resolve("someone/no-such-whisper")

def test_a_full_disk_anywhere_is_one_line_and_other_os_errors_keep_their_traceback(capsys):
    import errno

    from whisper_ft import cli

    def full_log(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl")

    assert cli.run(full_log, []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no space left on the disk writing /runs/x/metrics.jsonl (")
    assert "rerun the same command" in err and err.count("\n") == 1

    def wrapped(argv):  # a library that re-raises the write's failure as its own
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as e:
            raise RuntimeError("export failed") from e

    assert cli.run(wrapped, []) == 2
    assert "no space left on the disk (Disk quota exceeded): free space on the disk of the folder written (the " \
           "config's data_dir or output_dir, or the command's output folder)" in capsys.readouterr().err  # no name

    def bad_descriptor(argv):  # a bug
        raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(OSError, match="Bad file descriptor"):
        cli.run(bad_descriptor, [])


def test_a_folder_the_user_may_not_write_is_one_line(capsys):
    import errno

    from whisper_ft import cli

    def denied(argv):
        raise PermissionError(errno.EACCES, "Permission denied", "/runs")

    assert cli.run(denied, []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no access to /runs (Permission denied): give this user access, or write to a "
                          "folder it may write in (the config's data_dir or output_dir, or the command's output folder)")
    assert "rerun the same command" in err and err.count("\n") == 1

    def tokenizer_save(argv):  # the Rust tokenizers raise a bare Exception for a failed write
        raise Exception("Read-only file system (os error 30)")

    assert cli.run(tokenizer_save, []) == 2 and "no access (Read-only file system)" in capsys.readouterr().err

    def tokenizer_full(argv):
        raise Exception("No space left on device (os error 28)")

    assert cli.run(tokenizer_full, []) == 2 and "no space left on the disk (" in capsys.readouterr().err


def test_learning_rate_is_a_number_or_auto_and_warmup_a_count_or_null():
    t = load_config(CONFIG).training
    assert (t.learning_rate, t.warmup_steps, t.warmup_fraction) == ("auto", None, 0.1)
    t = load_config(CONFIG, ["training.learning_rate=2e-5", "training.warmup_steps=50"]).training
    assert (t.learning_rate, t.warmup_steps) == (2e-5, 50)
    with pytest.raises(ConfigError, match=r"training\.learning_rate: expected a number or auto, got 'fast'"):
        load_config(CONFIG, ["training.learning_rate=fast"])
    for bad in ("training.learning_rate=0", "training.warmup_fraction=1.5", "training.warmup_steps=-1",
                "training.average_checkpoints=1", "training.average_mode=median"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config(CONFIG, [bad])


@pytest.mark.parametrize("language, hint", [
    ("sv-SE", " (did you mean 'sv', Swedish?)"),  # Common Voice's locale
    ("nb", " (did you mean 'no', Norwegian?)"),  # Bokmål: Whisper's "no"
    ("Norwegian", " (did you mean 'no', Norwegian?)"),  # a name: faster-whisper takes codes only
    ("xx", ""),
])
def test_model_language_is_a_whisper_code_and_a_near_miss_names_it(language, hint):
    for ok in ("sv", "no", "nn", "yue"):
        assert load_config(CONFIG, [f"model.language={ok}"]).model.language == ok
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, [f"model.language={language}"])
    message = str(e.value)
    assert message.startswith(f"model.language: {language!r} is not a Whisper language code{hint}; use one of: af, ")
    assert "\n" not in message and ", sv, " in message


def test_typed_values_come_after_overrides_and_keep_their_type():
    lora = {"enabled": True}
    cfg = load_config(CONFIG, ["training.learning_rate=1e-4", "features.sources.0.path=/x"],
                      [("training.learning_rate", 1e-5), ("app.cookies_file", "yes"),
                       ("features.sources.0.train_splits", ["train"]),
                       ("features.sources.1", {"name": "extra", "kind": "hf", "path": "/y"}),
                       ("training.lora", lora), ("training.lora.rank", 8)])
    assert cfg.training.learning_rate == 1e-5 and cfg.app.cookies_file == "yes"
    assert cfg.features.sources[0].path == "/x" and cfg.features.sources[0].train_splits == ("train",)
    assert [s.name for s in cfg.features.sources] == ["sample", "extra"]
    assert (cfg.training.lora.enabled, cfg.training.lora.rank) == (True, 8)
    assert lora == {"enabled": True}  # the caller's value is copied, not set inside


@pytest.mark.parametrize("values, key", [
    ({"features.nmae": "x"}, "features.nmae"),
    ({"features.shard_size": "many"}, "features.shard_size"),
    ({"training.gradient_checkpointing": "yes"}, "training.gradient_checkpointing"),  # a string, not YAML's true
    ({"features.sources.0.colour": "red"}, "features.sources.0.colour"),
    ({"features.sources.3.path": "/x"}, "features.sources.3"),
])
def test_bad_typed_values_name_the_key(values, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIG, values=values)


def test_set_values_keep_the_text_typed_for_strings():
    """YAML 1.1 would read no, 010, 1:30 and ~ as false, 8, 90 and null; string keys keep the text."""
    cfg = load_config(CONFIG, ["features.name=010", "training.run_name=1:30", "model.language=no",
                               "training.lora.target_modules=q_proj,v_proj", "training.learning_rate=1e-5",
                               "training.warmup_steps=null", "features.data_dir=~/feat", "app.cookies_file=~/c.txt"])
    assert (cfg.features.name, cfg.training.run_name, cfg.model.language) == ("010", "1:30", "no")
    assert cfg.training.lora.target_modules == ("q_proj", "v_proj") and cfg.training.learning_rate == 1e-5
    assert cfg.training.warmup_steps is None
    home = str(Path.home())
    assert cfg.features.data_dir == f"{home}/feat" and cfg.app.cookies_file == f"{home}/c.txt"  # ~ as a shell would


@pytest.mark.parametrize("override, message", [
    ("training.max_steps.x=1", "training.max_steps.x: training.max_steps is a value, not a section"),
    ("training.lr_scheduler=cosin", "training.lr_scheduler: expected one of linear, cosine"),
    ("training.lr_scheduler=cosine_with_min_lr", "training.lr_scheduler: expected one of"),  # needs min_lr
    ("training.lr_scheduler=warmup_stable_decay", "training.lr_scheduler: expected one of"),  # needs decay steps
    ("training.precision=true", "training.precision: expected one of auto, bf16, fp16, fp32, got True"),  # YAML's bool
    ("training.average_mode=1", "training.average_mode: expected last or best, got 1"),
    ("features.sources.0.kind=tsv", "features.sources.0.kind: expected one of common_voice, mdc, hf, got 'tsv'"),
    ("training.save_total_limit=1", "training.save_total_limit: 1 cannot keep both the newest checkpoint"),
    ("training.dataloader_workers=-1", "training.dataloader_workers: must be at least 0"),
    ("training.seed=-1", "training.seed: must be at least 0"),
    ("training.seed=4294967296", "training.seed: must be from 0 to 4294967295, got 4294967296"),
    ("app.host=", "app.host: expected an address or host name to bind"),
    ("features.workers=-1", "features.workers: must be at least 0"),
    ("features.served_clips=-5", "features.served_clips: must be at least 0, got -5"),
    ("training.dropout=1.5", r"training.dropout: must be in \[0, 1\)"),
    ("training.lora.rank=0", "training.lora.rank: must be at least 1"),
    ("training.learning_rate=.inf", "training.learning_rate: must be a finite number"),
    ("features.claim_stale_seconds=.inf", "features.claim_stale_seconds: must be a finite number"),
])
def test_values_that_would_fail_late_are_refused_with_their_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, [override])


@pytest.mark.parametrize("override", ["training.run_name=", "training.run_name=.", "training.run_name=..",
                                      "training.run_name=a/b", "training.run_name=/tmp/x", r"training.run_name=a\b",
                                      "features.name=", "features.name=.", "features.name=../x",
                                      "training.eval_features=..", "training.eval_features=x/y"])
def test_run_and_store_names_are_one_folder_name(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}: must be one folder name"):
        load_config(CONFIG, [override])


def test_only_the_app_runs_on_native_windows_and_the_other_commands_point_to_wsl2(tmp_path, monkeypatch, capsys):
    """The feature pipeline, training and sweeps stop in one line before any work, saying where they
    run; the app's Space export, which writes without flushing folders there, still works."""
    import feature_pipeline
    import inference_app
    import sweep as entry
    import training_pipeline

    from whisper_ft import cli, files

    monkeypatch.setattr(cli, "NATIVE_WINDOWS", True)
    monkeypatch.setattr(files, "FLUSH_FOLDERS", False)
    out = tmp_path / "runs"
    for script, main, args in (("feature_pipeline.py", feature_pipeline.main, []),
                               ("training_pipeline.py", training_pipeline.main, []),
                               ("sweep.py", entry.main, [str(ROOT / "sweeps" / "lr.yaml")])):
        assert cli.run(main, ["--config", CONFIG, "--set", f"training.output_dir={out}", *args]) == 2
        assert capsys.readouterr().err == (f"error: {script} does not run on native Windows: run it in WSL2 (Windows "
                                           "Subsystem for Linux); only the app, inference_app.py, runs on Windows "
                                           "itself\n")
    assert not out.exists()
    space = tmp_path / "space"
    assert cli.run(inference_app.main, ["--config", CONFIG, "--export-space", str(space), "--model", "me/whisper"]) == 0
    assert (space / "app.py").is_file() and capsys.readouterr().err == ""


def test_an_empty_run_or_store_name_deletes_nothing(tmp_path, cv_release, capsys):
    """An empty name pointed at the parent folder, so that --fresh or --overwrite deleted every run or store there."""
    import feature_pipeline
    import training_pipeline

    from whisper_ft import cli

    for other in ("runs/other-run", "features/other-store"):
        (tmp_path / other).mkdir(parents=True)
        (tmp_path / other / "keep.txt").write_text("keep")
    sets = ["--config", CONFIG, "--set", f"features.data_dir={tmp_path}", "--set", f"model.name_or_path={PROCESSOR_DIR}",
            "--set", f"features.sources.0.path={cv_release}"]
    code = cli.run(training_pipeline.main, [*sets, "--set", f"training.output_dir={tmp_path / 'runs'}",
                                            "--set", "training.run_name=", "--fresh"])
    assert (tmp_path / "runs/other-run/keep.txt").is_file()
    assert code == 2 and capsys.readouterr().err.startswith("error: training.run_name: must be one folder name")
    code = cli.run(feature_pipeline.main, [*sets, "--set", "features.name=", "--overwrite", "--workers", "1"])
    assert (tmp_path / "features/other-store/keep.txt").is_file()
    assert code == 2 and capsys.readouterr().err.startswith("error: features.name: must be one folder name")


def test_training_says_a_feature_pipeline_setting_given_to_it_changes_nothing(tmp_path, capsys, caplog):
    import training_pipeline

    from whisper_ft import cli

    code = cli.run(training_pipeline.main, [
        "--config", CONFIG, "--set", f"features.data_dir={tmp_path}", "--set", "features.name=cv-sv",
        "--set", "features.max_seconds=3", "--set", "features.sources.0.limit=20", "--set", "features.on_overlap=keep",
        "--set", f"training.output_dir={tmp_path / 'runs'}"])
    assert code == 2 and "no finished features in" in capsys.readouterr().err  # the store is not built here
    warned = [r.getMessage() for r in caplog.records if r.name == "whisper_ft.cli"]
    assert [w.split(" changes nothing")[0] for w in warned] == ["--set features.max_seconds",
                                                                "--set features.sources.0.limit"]
    assert warned[0].endswith("trains on the store cv-sv as it was built (build another store under a new "
                              "features.name to change it)")


def test_a_config_of_an_earlier_version_loads_with_a_warning_for_each_retired_key(tmp_path, caplog):
    """A sweep's saved config.yaml, or a user's older copy, still sets the app's window settings."""
    old = tmp_path / "config.yaml"
    text = Path(CONFIG).read_text()
    old.write_text(text.replace("\n  max_media_seconds:", "\n  chunk_seconds: 20.0\n  stride_seconds: 4.0\n  max_media_seconds:"))
    with caplog.at_level("WARNING", logger="whisper_ft.config"):
        cfg = load_config(str(old), ["app.stride_seconds=3", "app.batch_size=4"])
    assert cfg == load_config(CONFIG)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 3 and all("is no longer a setting and is ignored" in m for m in warned)
    assert {m.split()[0] for m in warned} == {"app.chunk_seconds", "app.stride_seconds", "app.batch_size"}
    with pytest.raises(ConfigError, match="unknown config key: app.chunk_secs"):
        load_config(CONFIG, ["app.chunk_secs=20"])  # a typo is still refused
    with pytest.raises(ConfigError, match="unknown config key: training.chunk_seconds"):
        load_config(CONFIG, ["training.chunk_seconds=20"])  # retired in the app section only
    assert load_config(CONFIG, ["features.batch_size=4"]).features.batch_size == 4


@pytest.mark.parametrize("script", ["feature_pipeline.py", "training_pipeline.py", "inference_app.py", "sweep.py",
                                    "scripts/make_sample.py"])
def test_help_describes_the_command_in_whole_sentences(script):
    """--help's description is the docstring's first paragraph, not its first line cut mid-sentence."""
    import ast
    import subprocess
    import sys

    from whisper_ft import cli

    out = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**os.environ, "COLUMNS": "100"}).stdout
    described = "".join(out.split("\n\n")[1].split())  # after the usage lines; argparse wraps at hyphens too
    doc = ast.get_docstring(ast.parse((ROOT / script).read_text(encoding="utf-8")), clean=False)
    assert described == "".join(cli.summary(doc).split()) and described.endswith(".")


def test_the_commands_keep_libraries_per_item_info_lines_out_of_the_log(caplog):
    """faster-whisper logged "Processing audio with duration ..." once per clip of the final
    phase's served scoring, between the run's summary lines."""
    import logging

    from whisper_ft import cli

    caplog.set_level(logging.INFO)
    seen = {}

    def main(argv):
        seen.update({name: logging.getLogger(name).isEnabledFor(logging.INFO)
                     for name in ("faster_whisper", "httpx", "whisper_ft.train")})

    assert cli.run(main, []) == 0
    assert seen == {"faster_whisper": False, "httpx": False, "whisper_ft.train": True}


@pytest.mark.parametrize("found, refused", [("2.5.1+cu124", True), ("2.4.1", True), ("2.6.0a0+ecf3bae40a", True),
                                            ("2.6.0", False), ("2.13.0+cpu", False), ("2.14.0a0+git1234", False)])
def test_a_torch_older_than_transformers_needs_is_one_line(monkeypatch, capsys, found, refused):
    """pip keeps an older torch beside transformers 5.23, which then switches PyTorch off: the
    training command died in a NameError inside transformers' import."""
    import importlib.metadata

    from whisper_ft import cli

    monkeypatch.setattr(importlib.metadata, "version", lambda name: found)
    if not refused:
        cli.check_torch()
        return
    with pytest.raises(SystemExit) as stop:
        cli.check_torch()
    assert stop.value.code == 2
    assert capsys.readouterr().err == (f"error: torch {found} is too old: transformers needs torch 2.6.0 or newer "
                                       "(pip install -U 'torch>=2.6.0')\n")
