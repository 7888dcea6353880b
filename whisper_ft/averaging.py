"""Checkpoint averaging, the cheap ensemble: the weights of several of a run's periodic checks
averaged into one model, which is then scored on the validation split like any other
candidate and becomes `best/` only if it beats the best single check there.

While training, `Keeper` saves the model of each check after step 0 and keeps only the ones
the average may use (`last`: the newest N checks; `best`: the N best by validation score in
training.select_metric, WER by default):

    <run>/averaging/step-<N>.safetensors   the model at check N (float32, LoRA merged)
    <run>/averaging/candidates.json        {"mode": the mode they were kept for,
                                            "scores": {"<N>": validation score} of the files kept}

Separate from the Trainer's `checkpoint-*/` folders, whose rotation keeps the newest and the
single best, and which also hold optimizer state the average does not need.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from transformers import TrainerCallback

from whisper_ft.errors import UserError, first_line
from whisper_ft.files import fsync_dir, fsync_file, new_file_mode, write_atomic

FOLDER = "averaging"
INDEX = "candidates.json"


class AveragingError(UserError):
    """A file of averaging/ that cannot be read (emptied, cut, or edited by hand)."""


def _read(folder: Path) -> dict:
    path = folder / INDEX
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(data, dict):
            raise ValueError(f"a {type(data).__name__}, not a mapping")
    except ValueError as e:
        raise AveragingError(f"{path} is damaged ({e}): delete the folder {folder} to go on, the average then taking "
                             "only the checks from here on") from e
    return data if "scores" in data else {"mode": None, "scores": data}  # an index written without its mode


def read_index(folder: Path) -> dict[int, float]:
    """{step: validation score} of the saved candidates whose weights are on disk (a process killed
    between deleting a dropped candidate and rewriting the index leaves it named there)."""
    index = {int(k): v for k, v in _read(folder)["scores"].items()}
    return {step: wer for step, wer in index.items() if weights_path(folder, step).is_file()}


def kept_mode(folder: Path) -> str | None:
    """The mode (`last` or `best`) the saved candidates were kept for; None without any, or for an
    index written without its mode. Another mode would need checks that were dropped."""
    return _read(folder)["mode"] if read_index(folder) else None


def write_index(folder: Path, index: dict[int, float], mode: str | None) -> None:
    write_atomic(folder / INDEX, json.dumps({"mode": mode, "scores": {str(s): index[s] for s in sorted(index)}}))


def select(index: dict[int, float], n: int, mode: str) -> list[int]:
    """The steps an average of `n` uses, oldest first: the newest `n` (`last`) or the `n` with
    the lowest score (`best`; a tie goes to the later step). A NaN score never counts as best."""
    if mode == "last":
        chosen = sorted(index)[-n:]
    else:
        key = lambda s: (index[s] if math.isfinite(index[s]) else math.inf, -s)  # noqa: E731
        chosen = sorted(index, key=key)[:n]
    return sorted(chosen)


def weights_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step}.safetensors"


def average(paths: list[Path]) -> dict:
    """The element-wise mean of the floating-point tensors of several saved state dicts (in
    float32, one file in memory at a time); other tensors are taken from the last file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    total: dict = {}
    for path in paths:
        try:
            weights = load_file(str(path))
        except SafetensorError as e:
            raise AveragingError(f"{path} is damaged ({first_line(e)}): "
                                 "delete it and rerun; the average then leaves its check out") from e
        for name, tensor in weights.items():
            if not tensor.is_floating_point():
                total[name] = tensor
            elif name in total:
                total[name] += tensor.float()
            else:
                total[name] = tensor.float().clone()
    return {name: t / len(paths) if t.is_floating_point() else t for name, t in total.items()}


def save_weights(model, path: Path) -> None:
    """The plain Whisper weights of `model` (a LoRA model merged first) as float32
    safetensors, written under a temporary name and renamed, readable like the run's other
    files (safetensors writes 0600)."""
    from safetensors.torch import save_file

    from whisper_ft.checkpoints import standalone

    state = {k: v.detach().float().cpu().contiguous().clone() for k, v in standalone(model).state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(state, str(tmp))
    os.chmod(tmp, new_file_mode())
    fsync_file(tmp)  # on the disk before its name: a power loss never leaves a cut file named as whole
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Keeper(TrainerCallback):
    """Saves the model of every periodic check after step 0 into `<run>/averaging/` and keeps
    only the `n` an average in `mode` would use (see `select`), scored in `metric`
    (training.select_metric)."""

    def __init__(self, run_dir: Path, n: int, mode: str, metric: str = "wer"):
        self.folder = Path(run_dir) / FOLDER
        self.n = n
        self.mode = mode
        self.metric = metric

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        score = (metrics or {}).get(f"eval_{self.metric}")
        if state.global_step == 0 or score is None or not state.is_world_process_zero:
            return
        index = read_index(self.folder)
        index[state.global_step] = float(score)
        keep = set(select(index, self.n, self.mode))
        if state.global_step not in keep:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        save_weights(model, weights_path(self.folder, state.global_step))
        for step in set(index) - keep:
            weights_path(self.folder, step).unlink(missing_ok=True)
        write_index(self.folder, {s: index[s] for s in keep}, self.mode)
