"""Command-line plumbing shared by the three entry scripts: `--config`, `--set`, and
one-line errors with exit code 2 instead of tracebacks for problems the user can fix."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from whisper_ft.config import Config, load_config, stage1_only
from whisper_ft.errors import Stopped, UserError, machine_problem

__all__ = ["UserError", "base_parser", "config_from_args", "path_arg", "refuse_native_windows", "run", "summary",
           "warn_stage1_sets"]

MIN_TORCH = "2.6.0"  # transformers 5.23's own minimum (a pre-release of it, 2.6.0a0, is below)


def check_torch() -> None:
    """One line and exit code 2 where the installed torch is older than MIN_TORCH: pip installs
    requirements.txt beside an older torch (Colab's, a workstation's), since transformers states
    its minimum only in an extra, and transformers then switches PyTorch off, which the commands
    met as a NameError deep in an import. Run when an entry script imports this module."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import InvalidVersion, Version

    try:
        found = version("torch")
        too_old = Version(found) < Version(MIN_TORCH)
    except (PackageNotFoundError, InvalidVersion):
        return  # the import of torch, or transformers' own check, says so
    if too_old:
        print(f"error: torch {found} is too old: transformers needs torch {MIN_TORCH} or newer "
              f"(pip install -U 'torch>={MIN_TORCH}')", file=sys.stderr)
        sys.exit(2)


check_torch()


NATIVE_WINDOWS = os.name == "nt"  # Windows itself; WSL2 is Linux


class NativeWindows(UserError):
    """A command that needs Linux (or macOS) started on native Windows."""


def refuse_native_windows(command: str) -> None:
    """Stop `command` (feature_pipeline.py, training_pipeline.py, sweep.py) with one line on
    native Windows, which lacks what the feature pipeline's claims on its shards are built on
    (`os.pwrite`, a process probe by signal 0: `whisper_ft.claims`); training and sweeps, which
    read its stores, are not tested there either. WSL2 runs them all; the app (inference_app.py)
    runs on Windows itself."""
    if NATIVE_WINDOWS:
        raise NativeWindows(f"{command} does not run on native Windows: run it in WSL2 (Windows Subsystem for "
                            "Linux); only the app, inference_app.py, runs on Windows itself")


def summary(doc: str) -> str:
    """The first paragraph of a script's docstring as one line: its --help description."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def path_arg(text: str) -> str:
    """A path flag's value (argparse `type=`) with `~` expanded: the shell leaves `--flag=~/x`
    alone, and config values such as `features.data_dir=~/x` are expanded too."""
    return os.path.expanduser(text)


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=path_arg, default="config.yaml", help="YAML config (default: config.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set training.learning_rate=3e-5 (repeatable)")
    parser.set_defaults(values=[])
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The config file, its `--set` overrides (read as YAML), then `args.values`: the (dotted
    key, value) pairs of a script's own flags, taken as they are (`--host ::` is a string)."""
    return load_config(args.config, args.overrides, args.values)


def warn_stage1_sets(args: argparse.Namespace, trains_on: str) -> None:
    """A warning for each `--set` of a feature_pipeline.py setting given to a command that only
    reads built stores: it changes nothing there. `trains_on` says which store is read."""
    keys = (item.partition("=")[0].strip() for item in args.overrides)
    for key in dict.fromkeys(filter(stage1_only, keys)):
        logging.getLogger("whisper_ft.cli").warning(
            "--set %s changes nothing here: it is a setting of feature_pipeline.py, and %s as it was built (build "
            "another store under a new features.name to change it)", key, trains_on)


RESUMABLE = "interrupted; rerun the same command to go on from what it saved"
# libraries whose INFO lines come once per item: a clip decoded, a font cache built, an HTTP request
CHATTY = ("faster_whisper", "matplotlib", "httpx")


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None, *,
        interrupted: str = RESUMABLE) -> int:
    """Run an entry point; user-fixable errors (a full disk and a read-only folder included)
    become `error: ...` on stderr and exit code 2, Ctrl-C the line `interrupted` and 130."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return main(argv) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if (problem := machine_problem(e)) is None:
            raise
        print(f"error: {problem}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(e, file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
