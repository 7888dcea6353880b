"""The one base class of errors a user can fix (bad input, a missing file, a model not found
offline). The commands turn it into one line on stderr and exit code 2 (`whisper_ft.cli.run`);
any other exception is a bug and keeps its traceback. A write refused for want of space
(`out_of_space`) or access (`no_access`) is the user's to fix too, whatever raised it
(`machine_problem`)."""

import errno
import os
import re


def first_line(e: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none), for one-line errors
    that quote a library's."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class UserError(Exception):
    """A problem the user can fix; the message says what to do."""


class TrainingError(UserError, ValueError):
    """A training setup or run folder that cannot be used (a precision the device lacks, a resume
    with other settings, a damaged checkpoint)."""


class Stopped(KeyboardInterrupt):
    """Work stopped on a signal after saving what it had done; the message says how to go on.
    An interruption like Ctrl-C (so that no `except Exception` records it as a failure); the
    commands exit with 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def chain(error: BaseException | None):
    """`error` and the errors it was raised from or while handling, each once."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _os_errors(error: BaseException):
    """`error` and the errors it came from, each as (errno, file name) where it is an OSError or
    an error of a Rust library (the tokenizers' `save` raises a bare Exception whose message
    ends in "(os error 28)")."""
    for e in chain(error):
        if isinstance(e, OSError) and e.errno is not None:
            yield e.errno, e.filename
        elif (found := re.search(r"\(os error (\d+)\)$", str(e))) is not None:
            yield int(found.group(1)), None


def out_of_space(error: BaseException) -> str | None:
    """What to say when `error`, or an error it came from, is a write refused for want of space
    (ENOSPC, or EDQUOT: a quota); else None. Any write of any command: a log line, a report, a
    feature shard. (Checkpoints say how much they need: `whisper_ft.saving.disk_full`.)"""
    for code, filename in _os_errors(error):
        if code in (errno.ENOSPC, errno.EDQUOT):
            where, there = ((f" writing {filename}", "there") if filename else
                            ("", "on the disk of the folder written (the config's data_dir or output_dir, or the "
                                 "command's output folder)"))
            return (f"no space left on the disk{where} ({os.strerror(code)}): free space {there}, then rerun the "
                    "same command to go on where it stopped")
    return None


def no_access(error: BaseException) -> str | None:
    """What to say when `error`, or an error it came from, is a file or folder this process may
    not write or read (a read-only mount, another user's folder); else None."""
    for code, filename in _os_errors(error):
        if code in (errno.EROFS, errno.EACCES):
            where = f" to {filename}" if filename else ""
            return (f"no access{where} ({os.strerror(code)}): give this user access, or write to a folder it may "
                    "write in (the config's data_dir or output_dir, or the command's output folder); then rerun the "
                    "same command")
    return None


def machine_problem(error: BaseException) -> str | None:
    """What to say when `error` comes from the machine rather than the code (`out_of_space`,
    `no_access`): every later step would fail alike, and the user can fix it; else None."""
    return out_of_space(error) or no_access(error)
