"""A training run stopped by SIGTERM or Ctrl-C saves its step first. SIGTERM is the signal a
preempted cloud or spot machine, `scancel` or a job's time limit (SLURM), Kubernetes, `docker
stop` and `kill` send; Ctrl-C (SIGINT) is how a run in a terminal or a notebook cell is
stopped. By default either ends the process on the spot and loses every step since the last
checkpoint (up to `training.save_steps`); `StopOnSignal` lets the current step finish, saves a
checkpoint there (in the background writer, waited for; at a check step before the check, by
`WhisperTrainer`), and the run raises `Stopped`: exit status 128 + the signal's number (143,
130), and the same command resumes at that step. A second signal of the same kind ends the
process at once.

    stopper = StopOnSignal()
    trainer = WhisperTrainer(..., callbacks=[..., stopper])
    trainer.train()
    stopper.raise_if_stopped(trainer.state.global_step)

Data-loading workers ignore both (`in_workers`): sent to every process of the job, as SLURM
does and a terminal's Ctrl-C does, they would end them and fail the run before it saved; they
stop with their loader.

Under torchrun every process gets the signal (torchrun, whose processes run in sessions of
their own, passes the one it got on and waits 30 s), maybe one step apart: they agree to stop
at a step that is a multiple of `every`, with one all-reduce there (a host synchronisation
every `every` steps, not every step).
"""

from __future__ import annotations

import os
import signal
import threading
from functools import partial

from transformers import TrainerCallback

from whisper_ft.errors import Stopped
from whisper_ft.processes import is_main_process

SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}  # each with its name in messages


class StopOnSignal(TrainerCallback):
    """Catches SIGTERM and SIGINT during `Trainer.train` (from `on_train_begin` to
    `on_train_end`, in the main thread of this process) and turns the first into a save and a
    stop at the end of a step."""

    def __init__(self, every: int = 10):
        self.every = every
        self.signals: list[int] = []  # those received, in order
        self.stopped_at: int | None = None
        self._before: dict = {}

    @property
    def received(self) -> bool:
        return bool(self.signals)

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            # a signal ignored on entry stays ignored: a shell starts `command &` ignoring Ctrl-C
            self._before = {signum: signal.signal(signum, self._receive) for signum in SIGNALS
                            if signal.getsignal(signum) is not signal.SIG_IGN}

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        """Give back the handlers found at `on_train_begin` (also after a `train` that raised)."""
        for signum, handler in self._before.items():
            signal.signal(signum, handler)
        self._before = {}

    def _receive(self, signum, frame) -> None:
        if signum in self.signals:  # the second of a kind: as if it had never been caught
            self.restore()
            signal.raise_signal(signum)
            return
        self.signals.append(signum)
        if len(self.signals) == 1 and is_main_process():  # a handler does not log: logging locks
            name = SIGNALS[signum]
            os.write(2, f"{name}: saving a checkpoint at the end of this step, then stopping (a second {name} stops "
                        "at once, losing the steps since the last checkpoint)\n".encode())

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is None and self._agreed(args, state.global_step):
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step

    def _agreed(self, args, step: int) -> bool:
        """Whether every process has had the signal (by this step, a multiple of `every` under torchrun)."""
        import torch
        import torch.distributed as dist

        if args.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return self.received
        if step % self.every:
            return False
        flag = torch.tensor([int(self.received)], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def raise_if_stopped(self, step: int) -> None:
        """After `Trainer.train` returned: raise `Stopped` when the signal came, whether it stopped
        the loop or arrived after its last step (that step's checkpoint is saved either way)."""
        self.restore()
        if self.signals:
            at = self.stopped_at if self.stopped_at is not None else step
            raise Stopped(f"stopped by {SIGNALS[self.signals[0]]} after step {at}, its checkpoint saved: rerun the same "
                          "command to go on from there", self.signals[0])


def in_workers(init_fn=None):
    """A DataLoader `worker_init_fn` that makes the worker ignore SIGTERM and SIGINT, then runs `init_fn`."""
    return partial(_ignore_in_worker, init_fn)


def _ignore_in_worker(init_fn, worker_id: int) -> None:
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if init_fn is not None:
        init_fn(worker_id)
