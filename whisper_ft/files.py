"""Crash-safe file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shutil
import sys
from pathlib import Path

# Windows opens no folder as a file, so a folder cannot be flushed there; NTFS journals its
# metadata, so a renamed name survives a power loss without it
FLUSH_FOLDERS = os.name != "nt"

# how often `replace_dir` moves aside a folder that other processes keep putting in its place
RENAME_ATTEMPTS = 3
AT_FDCWD, RENAME_EXCHANGE = -100, 2  # renameat2's arguments: <fcntl.h>, <linux/fs.h>


def write_atomic(path: str | Path, text: str, tag: str = "") -> None:
    """Write `text` (UTF-8) to a temporary name beside `path`, then rename it into place.

    The temporary name carries the process id, so concurrent writers never share one and a
    killed writer's leftover can be told apart (`.<name>.tmp-<pid>`; `tag` instead, in a
    folder that processes of several machines write: `staging_dir`). The data reach the disk
    before the rename, so that after a power loss the file is the old one or the new one.
    """
    tmp = staging_dir(path, tag)
    with open(tmp, "w", encoding="utf-8") as f:
        _write_to_disk(f, text)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def create_atomic(path: str | Path, text: str, tag: str = "") -> bool:
    """Write `text` to `path` whole unless `path` exists: False when it does (another process
    created it first, and its content stands). Written under a temporary name (`staging_dir`,
    with `tag`) and hard-linked into place, which fails on an existing name; where the file
    system has no hard links, the file is created exclusively and written in place, so that a
    reader may find it empty for a moment (or for good, if the writer is killed then)."""
    path = Path(path)
    tmp = staging_dir(path, tag)
    with open(tmp, "w", encoding="utf-8") as f:
        _write_to_disk(f, text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some network and FUSE file systems)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            _write_to_disk(f, text)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def _write_to_disk(f, text: str) -> None:
    """Write `text` to the open file `f` and wait until it is on the disk."""
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def staging_dir(final: str | Path, tag: str = "") -> Path:
    """The temporary name beside `final` to write before renaming into place (a file for
    `write_atomic`, a folder for `replace_dir`): `.<name>.tmp-<tag>`, by default the process
    id; in folders that several machines share, `whisper_ft.claims.owner_tag()` (host and pid)."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{tag or os.getpid()}")


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Rename the complete folder `tmp` to `final`, replacing an older `final`: a reader sees
    the old folder or the new one. A directory cannot replace a non-empty one, so the two are
    swapped in one step where Linux can (`exchange`) and the old one removed; elsewhere the old
    one is moved aside first, which leaves `final` missing for a moment. One that another
    process renames into place meanwhile is replaced too: the last to rename wins. The files
    reach the disk before the rename: without that, a power loss or a preempted machine can
    leave the new name on empty files, after the older copies are gone."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    for attempt in range(RENAME_ATTEMPTS):
        if final.exists():
            if exchange(tmp, final):  # `tmp` now names the older folder
                shutil.rmtree(tmp, ignore_errors=True)
                break
            shutil.rmtree(old, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):  # another process moved it meanwhile
                os.replace(final, old)
        try:
            os.replace(tmp, final)
            break
        except OSError:
            # another process put its own `final` in place between the two renames: again
            if attempt == RENAME_ATTEMPTS - 1 or not final.exists():
                raise
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(final.parent)


def exchange(a: str | Path, b: str | Path) -> bool:
    """Swap the names `a` and `b` in one step (Linux's renameat2 with RENAME_EXCHANGE), so that
    a reader of either name finds one of the two at every moment. False where the system or the
    file system cannot (another OS, an old kernel or C library, some network file systems) or
    `b` is gone: the caller then renames in two steps."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOENT):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@functools.cache
def _renameat2():
    """glibc's renameat2 (2.28 and later), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def new_file_mode() -> int:
    """The permission bits `open` gives a new file here: 0o666 less the umask. Read from
    /proc/self/status where Linux has it: setting the umask to read it back would race with the
    thread that writes checkpoints."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            mask = next((int(line.split()[1], 8) for line in f if line.startswith("Umask:")), None)
    except OSError:
        mask = None
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def share_like_new_files(folder: str | Path) -> None:
    """Give every file under `folder` the permissions of a new file here (`new_file_mode`):
    safetensors writes its files 0600, and a model folder whose weights alone are private
    cannot be served, copied or uploaded by another user who reads the rest."""
    mode = new_file_mode()
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.stat(path).st_mode & 0o777 != mode:
                os.chmod(path, mode)


def fsync_tree(folder: str | Path) -> None:
    """Flush every file under `folder`, and the folders themselves, to the disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data to the disk (before renaming it into place)."""
    _fsync(path)


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (new and renamed names) to the disk. Not on Windows
    (`FLUSH_FOLDERS`): it refuses to open a folder, and the PermissionError would read as a
    folder this user may not write."""
    if FLUSH_FOLDERS:
        _fsync(folder)


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
