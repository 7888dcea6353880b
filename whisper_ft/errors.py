"""The one base class of errors a user can fix (bad input, a missing file, a model not found
offline). The commands turn it into one line on stderr and exit code 2 (`whisper_ft.cli.run`);
any other exception is a bug and keeps its traceback."""


class UserError(Exception):
    """A problem the user can fix; the message says what to do."""
