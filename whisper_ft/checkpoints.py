"""Run folders: finding the checkpoint to resume from, exporting the best model atomically,
and the append-only `metrics.jsonl` event log.

Layout of `<training.output_dir>/<training.run_name>/`:

    checkpoint-<step>/   HF Trainer checkpoints (model, processor, optimizer, scheduler, RNG, state)
    .checkpoint-<step>.tmp-<pid>/   one being written in the background (`whisper_ft.saving`)
    best/                best model by WER + processor + best.json; replaced atomically
    metrics.jsonl        one JSON object per event: start, train, eval (append-only)
    metrics.json         final summary; config.yaml; runs/ (TensorBoard); plot; README.md
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path

from whisper_ft.files import replace_dir, staging_dir

BEST_DIR = "best"
BEST_INFO = "best.json"
METRICS_LOG = "metrics.jsonl"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# HF Trainer writes trainer_state.json last, after model, optimizer, scheduler and RNG state.
_COMPLETE_MARK = "trainer_state.json"


def checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete `checkpoint-<step>` folders of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _CHECKPOINT.match(p.name)
        if m and p.is_dir() and (p / _COMPLETE_MARK).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def remove_leftovers(run_dir: str | Path) -> list[Path]:
    """Delete the staging folders a killed process left behind (`.checkpoint-<step>.tmp-<pid>`,
    `.best.tmp-<pid>`, `.best.old-<pid>`); a run folder has one writer at a time. Returns them."""
    run_dir = Path(run_dir)
    found = [p for pattern in (".checkpoint-*.tmp-*", f".{BEST_DIR}.tmp-*", f".{BEST_DIR}.old-*")
             for p in run_dir.glob(pattern) if p.is_dir()] if run_dir.is_dir() else []
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return found


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, skipping one a killed process left half-written."""
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def read_best(run_dir: str | Path) -> dict | None:
    """{"step", "wer", ...} of the exported best model, or None before the first export."""
    path = Path(run_dir) / BEST_DIR / BEST_INFO
    return json.loads(path.read_text()) if path.is_file() else None


def export_best(model, processor, run_dir: str | Path, info: dict) -> Path:
    """Save a standalone model + processor as `best/`, complete before it appears.

    Written to a temporary folder and renamed, because the inference app picks the newest
    `*/best/` by modification time and must never see a half-written one. A LoRA model is
    saved merged, so the folder loads with plain `from_pretrained`.
    """
    final = Path(run_dir) / BEST_DIR
    tmp = staging_dir(final)
    shutil.rmtree(tmp, ignore_errors=True)
    standalone(model).save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / BEST_INFO).write_text(json.dumps(info, indent=1))
    replace_dir(tmp, final)
    return final


def standalone(model):
    """The plain Whisper model to save: a LoRA (peft) model merged into a copy of its base."""
    if hasattr(model, "merge_and_unload"):
        import copy

        return copy.deepcopy(model).merge_and_unload()
    return model


def append_event(run_dir: str | Path, event: dict) -> None:
    """Append one event (with a wall-clock time) to metrics.jsonl; NaN/inf become null."""
    record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in event.items()}
    record.setdefault("time", round(time.time(), 3))
    with open(Path(run_dir) / METRICS_LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_events(run_dir: str | Path) -> list[dict]:
    """Events of metrics.jsonl; a resumed run repeats steps after its checkpoint, and for a
    repeated (event, split, purpose, step) only the last one is kept, so the list describes one
    trajectory."""
    path = Path(run_dir) / METRICS_LOG
    if not path.is_file():
        return []
    latest: dict[tuple, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            e = json.loads(line)
            latest[(e.get("event"), e.get("split"), e.get("purpose"), e.get("step"), e.get("final", False))] = e
    return sorted(latest.values(), key=lambda e: (e.get("step", 0), e.get("time", 0)))
