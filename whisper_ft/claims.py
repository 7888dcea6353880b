"""Claims on units of work in a folder that several processes share, on one machine or on
several machines mounting the same file system (the feature store's shards).

    with ClaimSet(stale_seconds=300) as claims:
        if claims.take(path):            # False while a running process holds it
            ...                          # do the work
            claims.confirm(path)         # raises ClaimError if the claim was lost meanwhile
            ...                          # commit it
            claims.release(path)

A claim is a file created exclusively (O_CREAT | O_EXCL) that holds JSON: the holder's host,
pid, a random token, when it started and its latest heartbeat (Unix time, the holder's clock),
padded to a fixed width so that a heartbeat never leaves the tail of a longer one to a reader.
A thread rewrites the heartbeat every quarter of `stale_seconds` through the open file (never
by name, so it cannot overwrite a claim that replaced this one). A claim is stale, and may be
taken over, once its heartbeat is older than `stale_seconds`, or at once when it was made on
this host by a process that is gone. The host is WHISPER_FT_HOST when set, else
`socket.gethostname()`.

A claim file is removed (released, or taken over when stale) only by the holder of its lock
(`<claim>.lock`, also created exclusively, held for a moment), after reading it again: so no
process removes a claim other than the one it judged, and of several takers of a stale claim
one wins. A lock left by a process that died while holding it goes stale like a claim.

Hand-written because POSIX locks over NFS depend on its lock daemon and say nothing about a
dead machine's lock, and lock-file packages (filelock) have no heartbeat or safe takeover.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from whisper_ft.errors import UserError

HOST_ENV = "WHISPER_FT_HOST"
BEATS_PER_STALE = 4  # heartbeats within one stale limit: a live holder never looks stale
CLOCK_TOLERANCE = 0.1  # of the stale limit: how far this clock may be from the file system's
HEARTBEAT_ROOM = 32  # bytes a time in a claim may take beyond "0.0" (repr of a float: at most 24)


class ClaimError(UserError, RuntimeError):
    """A claim that was lost while working, or a clock that makes claims untrustworthy."""


def host_name() -> str:
    """This machine's name in claims: WHISPER_FT_HOST when set, else the system's host name."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


def owner_tag() -> str:
    """`<host>-<pid>` of this process; it names this process's temporary files."""
    return f"{host_name()}-{os.getpid()}"


def gone_here(tag: str) -> bool:
    """Whether `tag` (an `owner_tag`) names a process of this machine that no longer runs; False
    for another machine's, whose processes cannot be looked up from here."""
    host, _, pid = tag.rpartition("-")
    return host == host_name() and pid.isdigit() and not pid_alive(int(pid))


# On Windows signal 0 is CTRL_C_EVENT: os.kill(pid, 0) would interrupt the console instead of probing
PROBE_PIDS = os.name != "nt"


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine. Always True where no signal probes a
    process (Windows, `PROBE_PIDS`): a claim of a process gone there goes stale by its
    heartbeat's age, as another machine's does."""
    if pid <= 0:
        return False
    if not PROBE_PIDS:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


@dataclass(frozen=True)
class Holder:
    """What a claim file says."""

    host: str
    pid: int
    token: str
    started: float
    heartbeat: float

    @property
    def tag(self) -> str:
        """`<host>-<pid>`, as in the names of the holder's temporary files."""
        return f"{self.host}-{self.pid}"

    @property
    def who(self) -> str:
        return f"{self.host or 'an unknown host'} pid {self.pid}"

    def age(self) -> float:
        """Seconds since the last heartbeat, by this machine's clock."""
        return time.time() - self.heartbeat

    def is_stale(self, stale_seconds: float) -> bool:
        if self.host == host_name() and not pid_alive(self.pid):
            return True
        return self.age() > stale_seconds


def read_holder(path: Path) -> Holder | None:
    """The claim at `path`, or None when there is none. A claim read while it is being written
    counts as held by an unknown process whose heartbeat is the file's modification time."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
            mtime = os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None
    try:
        return Holder(**json.loads(text))
    except (ValueError, TypeError):
        return Holder("", 0, "", mtime, mtime)


def live_claims(paths: Iterable[Path], stale_seconds: float) -> dict[Path, Holder]:
    """The claims among `paths` whose holders are running."""
    holders = {path: read_holder(path) for path in paths}
    return {path: h for path, h in holders.items() if h is not None and not h.is_stale(stale_seconds)}


class ClaimSet:
    """The claims one process holds, kept fresh by a heartbeat thread until `close`.

    `setting` names the stale limit in error messages (the config key that sets it).
    """

    def __init__(self, stale_seconds: float, setting: str = "the stale limit"):
        self.stale_seconds = stale_seconds
        self.setting = setting
        self._held: dict[Path, tuple[int, Holder]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="claim-heartbeat", daemon=True)
        self._clock_checked = False

    def __enter__(self) -> ClaimSet:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def take(self, path: Path) -> bool:
        """Claim `path`: True when this process now holds it, False while a running process
        holds it (or another taker of the same stale claim wins)."""
        if self._try_create(path):
            return True
        seen = read_holder(path)
        if seen is not None and not seen.is_stale(self.stale_seconds):
            return False
        lock = _lock_file(path)
        if not _take_lock(lock, self.stale_seconds):
            return False
        try:
            current = read_holder(path)
            if current is not None:
                if seen is None or current.token != seen.token or not current.is_stale(self.stale_seconds):
                    return False
                path.unlink()
            return self._try_create(path)
        finally:
            lock.unlink(missing_ok=True)

    def confirm(self, path: Path) -> None:
        """Raise ClaimError unless `path` is still this process's claim: call it just before
        committing the work, so that a process that lost its claim commits nothing."""
        with self._lock:  # not in the middle of this process's own heartbeat
            holder = read_holder(path)
        if holder is None or holder.token != self._held[path][1].token:
            now = f" (now held by {holder.who})" if holder else ""
            raise ClaimError(f"lost the claim {path}{now}: this process was stalled longer than {self.setting} "
                             f"({self.stale_seconds:g} s) or the folder was removed; rerun to continue")

    def release(self, path: Path) -> None:
        """Give the claim up, removing its file unless another process has taken it over (or is
        taking it over right now)."""
        with self._lock:
            fd, holder = self._held.pop(path)
        os.close(fd)
        lock = _lock_file(path)
        if not _take_lock(lock, self.stale_seconds):
            return
        try:
            current = read_holder(path)
            if current is not None and current.token == holder.token:
                path.unlink()
        finally:
            lock.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop the heartbeat and release every claim still held."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        for path in list(self._held):
            self.release(path)

    def _try_create(self, path: Path) -> bool:
        """Create the claim `path` for this process; False if the file exists."""
        try:
            fd, holder = _create(path)
        except FileExistsError:
            return False
        try:
            self._check_clock(fd)
        except ClaimError:
            os.close(fd)
            path.unlink()
            raise
        with self._lock:
            self._held[path] = (fd, holder)
        return True

    def _check_clock(self, fd: int) -> None:
        """Refuse when this machine's clock is far from the file system's (the new claim's
        modification time), since heartbeats of machines are compared across clocks."""
        if self._clock_checked:
            return
        skew = time.time() - os.fstat(fd).st_mtime
        if abs(skew) > CLOCK_TOLERANCE * self.stale_seconds:
            raise ClaimError(f"this machine's clock is {skew:+.1f} s off the file system's, more than "
                             f"{CLOCK_TOLERANCE:.0%} of {self.setting} ({self.stale_seconds:g} s): synchronize "
                             f"the clocks (NTP) or raise {self.setting}")
        self._clock_checked = True

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_seconds / BEATS_PER_STALE):
            with self._lock:
                for fd, holder in self._held.values():
                    try:
                        _write(fd, replace(holder, heartbeat=time.time()))
                    except OSError:  # the file was removed under us (NFS: stale handle); confirm() tells
                        pass


def _create(path: Path) -> tuple[int, Holder]:
    """Create `path` exclusively (FileExistsError if it exists) holding a new claim of this
    process; returns the open file and the claim. A file that cannot be written (a full disk) is
    removed: left empty, it would read as held by an unknown process until it goes stale."""
    now = time.time()
    holder = Holder(host_name(), os.getpid(), secrets.token_hex(8), now, now)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
        _write(fd, holder)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return fd, holder


def _write(fd: int, holder: Holder) -> None:
    """(Re)write the claim in the open file `fd`, padded with spaces to a width of its own
    (`claim_width`) so that every heartbeat has the same length: a shorter one written over a
    longer one would leave its tail behind until the truncation, and a reader in between would
    find no JSON, taking a live claim for one of an unknown process."""
    data = json.dumps(asdict(holder)).encode()
    data = data.ljust(claim_width(holder))
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def claim_width(holder: Holder) -> int:
    """The padded length of `holder`'s claims: room for the longest heartbeat after its fixed fields."""
    fixed = json.dumps(asdict(replace(holder, started=0.0, heartbeat=0.0))).encode()
    return len(fixed) + 2 * HEARTBEAT_ROOM


def _lock_file(claim: Path) -> Path:
    return claim.with_name(f"{claim.name}.lock")


def _take_lock(lock: Path, stale_seconds: float, patience: float = 1.0) -> bool:
    """Create the lock exclusively, waiting up to `patience` seconds while another process holds
    it (for a moment); False if it is still held then. A stale lock (its holder died in that
    moment) is removed."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        try:
            fd, _holder = _create(lock)
        except FileExistsError:
            left = read_holder(lock)
            if left is not None and left.is_stale(stale_seconds):
                lock.unlink(missing_ok=True)
            else:
                time.sleep(0.01)
            continue
        os.close(fd)
        return True
    return False
