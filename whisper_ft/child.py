"""Run one network job of the app (a yt-dlp download, a translation) in a child process that is
killed at its deadline.

deep-translator sets no socket timeout, a server that sends a byte now and then defeats yt-dlp's
per-read timeout, and a Python thread cannot be stopped: a job run in a thread could block it
for the life of the app. A child process can be killed, and then leaves no thread, socket or
memory behind. The request and the reply travel as JSON on stdin and stdout.

    reply = child.run("whisper_ft.translate", {"chunks": [...], ...}, timeout=60)   # the app's side
    child.serve(handle)                                      # the module's `if __name__ == "__main__"`
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path

PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])  # `python -m whisper_ft.x` works from any folder


class ChildFailed(RuntimeError):
    """The child process crashed: a bug rather than bad input; the message ends with its last stderr line."""


def run(module: str, request: dict, timeout: float) -> dict:
    """Run `python -m module` with `request` on stdin and return the JSON reply it prints. Raises
    TimeoutError when it has not finished after `timeout` seconds; it is killed then."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}
    if sys.dont_write_bytecode:  # as the parent: a Space's app.py writes no __pycache__ beside the code it uploads
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    try:
        proc = subprocess.run([sys.executable, "-m", module], input=json.dumps(request), capture_output=True,
                              text=True, timeout=max(timeout, 0.01), env=env, check=False)
    except subprocess.TimeoutExpired as e:  # subprocess.run has killed and reaped the child
        raise TimeoutError(f"no answer within {timeout:.3g} s") from e
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()
        raise ChildFailed(f"python -m {module} exited with {proc.returncode}: {tail[-1] if tail else 'no output'}")
    return json.loads(lines[-1])


def serve(handle: Callable[[dict], dict]) -> None:
    """The child's side: read the request from stdin and print `handle(request)` as one JSON line.
    Whatever `handle` prints goes to stderr, so that stdout holds the reply alone."""
    request = json.loads(sys.stdin.read())
    with redirect_stdout(sys.stderr):
        reply = handle(request)
    print(json.dumps(reply), flush=True)
