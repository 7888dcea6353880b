"""Crash-safe file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to a temporary name beside `path`, then rename it into place.

    The temporary name carries the process id, so concurrent writers never share one and a
    killed writer's leftover can be told apart (`.<name>.tmp-<pid>`).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
