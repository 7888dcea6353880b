"""Checkpoints written in the background, so training goes on while they reach the disk.

    saver = BackgroundSaver()
    saver.submit(write_files)         # waits for the previous write first; one write in flight
    saver.wait()                      # at the end; re-raises a failed write

    with disk_full_as_user_error(run_dir, needed=nbytes(weights) + nbytes(optimizer)):
        write_files()                 # a write that fails on a full disk: DiskFullError (exit 2)

A whisper-small checkpoint (float32 weights and AdamW's two moments) is about 3 GB; written by
the training thread, the GPU idles for as long as the disk takes, at every save. The Trainer
subclass (`whisper_ft.trainer.WhisperTrainer`) copies the state to host memory at the save step,
which is what must be consistent, and hands the writing to this thread. The files are those
of an HF Trainer checkpoint, written into `.checkpoint-<step>.tmp-<pid>` (rank 0's pid under
torchrun) and renamed to `checkpoint-<step>` when complete (`whisper_ft.files.replace_dir`),
so a process killed mid-write leaves nothing that looks like a checkpoint. torch.save and
safetensors release the GIL while they write.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from whisper_ft.errors import UserError
from whisper_ft.files import write_atomic


class DiskFullError(UserError):
    """A checkpoint or best/ that did not fit on the disk of its run folder."""


class BackgroundSaver:
    """Runs one write at a time on a thread; `wait` joins it and raises what it raised."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(write,), name="checkpoint-writer")
        self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, UserError):  # says what to do already (a full disk)
                raise error
            raise RuntimeError(f"writing a checkpoint failed: {error}") from error

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


@contextlib.contextmanager
def disk_full_as_user_error(folder: str | Path, needed: int, what: str = "a checkpoint"):
    """Turn a write of `what` into `folder` that fails on a full disk into a DiskFullError
    that says so (torch reports it as "unexpected pos 771072 vs 770964"); other failures pass
    through. `needed`: bytes of the tensors written."""
    try:
        yield
    except UserError:  # says what to do already (a full disk found by an earlier write)
        raise
    except Exception as e:
        full = disk_full(folder, needed, e, what)
        if full is None:
            raise
        raise full from e


def disk_full(folder: str | Path, needed: int, error: BaseException,
              what: str = "a checkpoint") -> DiskFullError | None:
    """The DiskFullError for a write of `what` into `folder` that failed with `error`, when
    the disk reports no space left or has less free than the `needed` bytes; else None."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free >= needed and getattr(error, "errno", None) != errno.ENOSPC:
        return None
    room = (" (a save needs room for one checkpoint more than training.save_total_limit keeps, until rotation "
            "removes the oldest)" if what == "a checkpoint" else "")
    return DiskFullError(f"the disk of {folder} is full ({_size(free)} free, {what} takes about {_size(needed)}): "
                         f"free space there{room}, then rerun the same command to resume from the last checkpoint "
                         "saved")


def _size(n: int) -> str:
    """'3.1 GB', '770.1 MB' of a byte count."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def to_host(obj, reuse=None, _memo: dict | None = None):
    """A copy of a nested dict/list/tuple of tensors with every tensor copied to CPU memory
    (what training may change next step). `reuse`, the copy of the previous save (already
    written), lends its tensors as buffers, so later saves allocate nothing; copies of GPU
    tensors go to pinned memory, and the GPU is synchronised before this returns. Tensors
    sharing storage (tied weights) share their copy too."""
    memo = {} if _memo is None else _memo
    if torch.is_tensor(obj):
        key = _storage_key(obj)
        if key not in memo:
            memo[key] = _copy(obj.detach(), reuse)
        out = memo[key]
    elif isinstance(obj, dict):
        get = reuse.get if isinstance(reuse, dict) else lambda k: None
        out = type(obj)((k, to_host(v, get(k), memo)) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        same = isinstance(reuse, (list, tuple)) and len(reuse) == len(obj)
        out = type(obj)(to_host(v, reuse[i] if same else None, memo) for i, v in enumerate(obj))
    else:
        out = obj
    if _memo is None and torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking copies have landed
    return out


def _storage_key(t: torch.Tensor) -> tuple:
    """What two tensors that are the same memory (tied weights) have in common."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype


def _copy(t: torch.Tensor, reuse) -> torch.Tensor:
    if (isinstance(reuse, torch.Tensor) and reuse.device.type == "cpu" and reuse.shape == t.shape
            and reuse.dtype == t.dtype and reuse.is_contiguous()):
        return reuse.copy_(t, non_blocking=True)
    if t.is_cuda:
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
    return t.to("cpu", copy=True)


def record_weights_dtype(folder: Path, weights: dict) -> None:
    """Set the "dtype" of `folder`'s config.json to that of the `weights` saved there.

    `save_pretrained` takes it from the live model's first parameter, and a checkpoint written
    on a thread from host copies of the weights may be written while the training thread runs
    the model on its bf16 weight copy (`whisper_ft.precision` swaps the copies in for each
    forward pass): that checkpoint said bfloat16 over float32 weights, and loaded as a bf16
    model."""
    dtype = next((t.dtype for t in weights.values() if torch.is_tensor(t) and t.is_floating_point()), None)
    path = Path(folder) / "config.json"
    if dtype is None or not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")
    if config.get("dtype") != name:
        config["dtype"] = name
        write_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def nbytes(obj, _seen: set | None = None) -> int:
    """Bytes of the tensors in a nested dict/list/tuple (what `to_host` copies, and what a save
    writes): tensors sharing storage (tied weights) count once."""
    seen = set() if _seen is None else _seen
    if torch.is_tensor(obj):
        key = _storage_key(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v, seen) for v in obj)
    return 0


def available_memory() -> int | None:
    """Bytes of RAM the system can still give (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def fits_in_memory(size: int, share: float = 0.5) -> bool:
    """Whether a host copy of `size` bytes leaves the system at least half of what it has
    free (a copy that pushes it into swap or the OOM killer would lose the run it protects)."""
    free = available_memory()
    return free is None or size <= share * free


def broadcast(obj):
    """Rank 0's `obj` (picklable) on every rank of the torch.distributed job."""
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
