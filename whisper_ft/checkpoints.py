"""Run folders: finding the checkpoint to resume from, exporting the best model atomically,
and the append-only `metrics.jsonl` event log.

Layout of `<training.output_dir>/<training.run_name>/`:

    checkpoint-<step>/   HF Trainer checkpoints (model, processor, optimizer, scheduler, RNG, state)
    .checkpoint-<step>.tmp-<pid>/   one being written in the background (`whisper_ft.saving`)
    best/                best model by training.select_metric (WER by default) + processor + best.json +
                         model card; replaced atomically; best/ct2/: its CTranslate2 export
    averaging/           weights of the checks a checkpoint average may use (`whisper_ft.averaging`)
    metrics.jsonl        one JSON object per event: start, train, eval, average, checkpoint, trained
                         (append-only)
    metrics.json         final summary; predictions.jsonl, wer_breakdown.json: the final test scoring;
                         config.yaml; runs/ (TensorBoard); training_curves.png; README.md (model card)

What each file holds: docs/training.md, "What a run writes".
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path

from whisper_ft import averaging
from whisper_ft.errors import first_line
from whisper_ft.files import replace_dir, share_like_new_files, staging_dir

SELECTION, REPORT = "selection", "report"  # purposes of an `eval` event: pick checkpoints, or report
BEST_DIR = "best"
BEST_INFO = "best.json"
METRICS_LOG = "metrics.jsonl"
log = logging.getLogger("whisper_ft.checkpoints")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# HF Trainer writes trainer_state.json last, after model, optimizer, scheduler and RNG state.
_COMPLETE_MARK = "trainer_state.json"


def checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete `checkpoint-<step>` folders of a run, oldest first."""
    return [(step, p) for step, p in _checkpoint_folders(run_dir) if _complete(p)]


def _checkpoint_folders(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Every `checkpoint-<step>` folder of a run, complete or not, oldest first."""
    run_dir = Path(run_dir)
    found = [(int(m.group(1)), p) for p in (run_dir.iterdir() if run_dir.is_dir() else ())
             if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted(found)


def incomplete(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The `checkpoint-<step>` folders of a run that `checkpoints` skips (no whole
    trainer_state.json), oldest first."""
    return [(step, p) for step, p in _checkpoint_folders(run_dir) if not _complete(p)]


# the Trainer's layouts of model weights (not its training_args.bin, in every checkpoint)
WEIGHTS_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "adapter_model.bin", "pytorch_model_fsdp*", "global_step*")


def damage(checkpoint: Path) -> str | None:
    """What makes a complete-looking checkpoint unloadable, found without reading its tensors: no
    weights in any layout the Trainer writes (safetensors, .bin, a LoRA adapter, FSDP's sharded
    `pytorch_model_fsdp_0/`, DeepSpeed's `global_step<N>/`), a weights file whose header or
    length is wrong, a torch file whose zip directory is cut (a folder copied in part, or a
    synchronous save cut short); None when it looks whole."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    weights = sorted(checkpoint.glob("*.safetensors"))
    if not any(next(checkpoint.glob(pattern), None) for pattern in WEIGHTS_PATTERNS):
        return "no model weights in it"
    for path in weights:
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            return f"{path.name}: {first_line(e)}"
    for path in sorted([*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth")]):
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError) as e:
            return f"{path.name}: {e}"
    return None


def _complete(checkpoint: Path) -> bool:
    """Whether the Trainer finished writing `checkpoint`: its last file is there and whole (an
    empty or cut one is what a machine that lost power before flushing leaves behind)."""
    try:
        json.loads((checkpoint / _COMPLETE_MARK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def remove_leftovers(run_dir: str | Path) -> list[Path]:
    """Delete what a killed process left half-written: staging folders and files
    (`.<name>.tmp-<pid>`, as `whisper_ft.files` names them) and folders moved aside to be
    replaced (`.<name>.old-<pid>`), in the run folder and its averaging/ folder; a run folder
    has one writer at a time. A kill between the two renames of replacing `best/` (where they
    are two: `whisper_ft.files.replace_dir`) leaves no `best/`: the complete new one (or else
    the old one) is put back first. Returns what was deleted."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    best = run_dir / BEST_DIR
    if not best.exists():
        candidates = [p for p in run_dir.glob(f".{BEST_DIR}.tmp-*") if (p / BEST_INFO).is_file()]
        candidates += sorted(run_dir.glob(f".{BEST_DIR}.old-*"))
        if candidates:
            os.replace(candidates[0], best)
    found = [p for folder in (run_dir, run_dir / averaging.FOLDER) for pattern in (".*.tmp-*", ".*.old-*")
             for p in folder.glob(pattern)]
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, skipping one a killed process left half-written."""
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def read_best(run_dir: str | Path) -> dict | None:
    """{"step", "wer", ...} of the exported best model, or None before the first export (and
    for a best/ whose info is gone or damaged: a resume then exports its check again)."""
    try:
        info = json.loads((Path(run_dir) / BEST_DIR / BEST_INFO).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def export_best(model, processor, run_dir: str | Path, info: dict) -> Path:
    """Save a standalone model + processor as `best/`, complete before it appears.

    Written to a temporary folder and renamed, because the inference app picks the newest
    `*/best/` by modification time and must never see a half-written one. A LoRA model is
    saved merged, so the folder loads with plain `from_pretrained`. Its weights get the
    permissions of the other files (safetensors writes them 0600). A full disk is a
    DiskFullError.
    """
    from whisper_ft.saving import disk_full_as_user_error, nbytes

    final = Path(run_dir) / BEST_DIR
    tmp = staging_dir(final)
    shutil.rmtree(tmp, ignore_errors=True)
    model = standalone(model)
    with disk_full_as_user_error(run_dir, nbytes(list(model.parameters())), "best/"):
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    (tmp / BEST_INFO).write_text(json.dumps(info, indent=1))
    share_like_new_files(tmp)
    replace_dir(tmp, final)
    return final


def standalone(model):
    """The plain Whisper model to save: a LoRA (peft) model merged into a copy of its base."""
    if hasattr(model, "merge_and_unload"):
        import copy

        return copy.deepcopy(model).merge_and_unload()
    return model


def append_event(run_dir: str | Path, event: dict) -> None:
    """Append one event (with a wall-clock time) to metrics.jsonl; NaN/inf become null. After a
    line cut short (a process killed while writing it, a full disk) the event starts a new line."""
    record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in event.items()}
    record.setdefault("time", round(time.time(), 3))
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    with open(Path(run_dir) / METRICS_LOG, "a+b") as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)


def read_events(run_dir: str | Path) -> list[dict]:
    """Events of metrics.jsonl, describing one trajectory: a `start` at step k (a resume from
    checkpoint-k, or a start from scratch) drops the events logged before it past step k, which
    belong to the abandoned steps (a resume with another check or logging cadence would not
    repeat them all), and the final phase's (the test score of best/, the checkpoint average),
    which the run does again at its end, for a best/ that may then be another; for a repeated
    (event, split, purpose, step) only the last one is kept. A line cut short by a killed
    process is skipped with a warning."""
    path = Path(run_dir) / METRICS_LOG
    if not path.is_file():
        return []
    latest: dict[tuple, dict] = {}
    unreadable = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            unreadable += 1
            continue
        if e.get("event") == "start":
            latest = {key: v for key, v in latest.items() if (v.get("step") or 0) <= (e.get("step") or 0)
                      and not v.get("final") and v.get("event") != "average"}
        latest[(e.get("event"), e.get("split"), e.get("purpose"), e.get("step"), e.get("final", False))] = e
    if unreadable:
        log.warning("%s: skipped %d line(s) cut short by a process killed while writing", path, unreadable)
    return sorted(latest.values(), key=lambda e: (e.get("step", 0), e.get("time", 0)))


def selection_checks(events: list[dict]) -> list[dict]:
    """The periodic checks among metrics.jsonl `events`: the evaluations that choose (purpose
    `selection`; logs older than that field hold no others) other than the final one."""
    return [e for e in events if e.get("event") == "eval" and e.get("purpose", SELECTION) == SELECTION
            and not e.get("final")]
