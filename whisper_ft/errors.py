"""The one base class of errors a user can fix (bad input, a missing file, a model not found
offline). The commands turn it into one line on stderr and exit code 2 (`whisper_ft.cli.run`);
any other exception is a bug and keeps its traceback. A write refused for want of space
(`out_of_space`) is the user's to fix too, whatever raised it."""

import errno
import os


class UserError(Exception):
    """A problem the user can fix; the message says what to do."""


class Stopped(KeyboardInterrupt):
    """Work stopped on a signal after saving what it had done; the message says how to go on.
    An interruption like Ctrl-C (so that no `except Exception` records it as a failure); the
    commands exit with 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def out_of_space(error: BaseException) -> str | None:
    """What to say when `error`, or an error it came from, is a write refused for want of space
    (ENOSPC, or EDQUOT: a quota); else None. Any write of any command: a log line, a report, a
    feature shard. (Checkpoints say how much they need: `whisper_ft.saving.disk_full`.)"""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {error.filename}" if error.filename else ""
            return (f"no space left on the disk{where} ({os.strerror(error.errno)}): free space there, then rerun "
                    "the same command to go on where it stopped")
        error = error.__cause__ or error.__context__
    return None
