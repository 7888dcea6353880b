"""Crash-safe file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to a temporary name beside `path`, then rename it into place.

    The temporary name carries the process id, so concurrent writers never share one and a
    killed writer's leftover can be told apart (`.<name>.tmp-<pid>`).
    """
    tmp = staging_dir(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def staging_dir(final: str | Path) -> Path:
    """The temporary name beside `final` to write before renaming into place (a file for
    `write_atomic`, a folder for `replace_dir`): `.<name>.tmp-<pid>`."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Rename the complete folder `tmp` to `final`, replacing an older `final`: a reader sees
    the old folder or the new one (a directory cannot replace a non-empty one, so the old
    one is moved aside first)."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
