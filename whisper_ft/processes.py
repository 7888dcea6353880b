"""Which process of a run this is, before the Trainer starts: torchrun and accelerate set RANK
and WORLD_SIZE in each process they launch; a plain `python` run is rank 0 of 1."""

from __future__ import annotations

import os


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a single process: the one that writes the run's shared files."""
    return os.environ.get("RANK", "0") == "0"


def world_size() -> int:
    """Processes of this run (1 without torchrun or accelerate)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
