"""Claims on shared work (whisper_ft.claims): exclusive, kept fresh by a heartbeat, taken over
only when stale and by one taker, never removed from under the process that holds them."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from whisper_ft import claims
from whisper_ft.claims import HOST_ENV, ClaimError, ClaimSet, gone_here, host_name, read_holder
from whisper_ft.config import ConfigError, load_config


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant_claim(path: Path, host: str, pid: int, age: float) -> None:
    """A claim as another process would have left it, its last heartbeat `age` seconds ago."""
    beat = time.time() - age
    path.write_text(json.dumps({"host": host, "pid": pid, "token": f"{host}-{pid}", "started": beat - 1,
                                "heartbeat": beat}))


def test_a_claim_is_exclusive_and_says_who_holds_it(tmp_path, monkeypatch):
    monkeypatch.setenv(HOST_ENV, "host-a")
    path = tmp_path / ".shard.claim"
    with ClaimSet(60) as mine, ClaimSet(60) as other:
        assert mine.take(path)
        assert not other.take(path)
        holder = read_holder(path)
        assert (holder.host, holder.pid, holder.tag) == ("host-a", os.getpid(), f"host-a-{os.getpid()}")
        mine.confirm(path)
        mine.release(path)
        assert not path.exists()
        assert other.take(path)
    assert list(tmp_path.iterdir()) == []  # closing released it


def test_the_heartbeat_keeps_a_claim_alive_past_the_stale_limit(tmp_path):
    path = tmp_path / ".shard.claim"
    with ClaimSet(0.4) as mine:
        assert mine.take(path)
        first = read_holder(path).heartbeat
        time.sleep(0.6)
        assert read_holder(path).heartbeat > first
        assert not ClaimSet(0.4).take(path)


def test_the_heartbeat_goes_on_after_a_write_that_failed(tmp_path, monkeypatch):
    """A heartbeat write can fail for a moment (an NFS server restarting): the next beats must
    still be written, or the claim goes stale under a live holder and another process takes
    over its shard."""
    path = tmp_path / ".shard.claim"
    real, failed = claims._write, []

    def fail_once(fd, holder):
        if not failed:
            failed.append(holder.heartbeat)
            raise OSError(errno.ESTALE, "Stale file handle")
        real(fd, holder)

    with ClaimSet(0.4) as mine:
        assert mine.take(path)
        monkeypatch.setattr(claims, "_write", fail_once)
        deadline = time.monotonic() + 10
        while not (failed and read_holder(path).heartbeat > failed[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert failed and read_holder(path).heartbeat > failed[0]  # a beat after the failed one


def test_a_claim_read_while_a_shorter_heartbeat_is_written_over_it_still_names_its_holder(tmp_path, monkeypatch):
    """A heartbeat is written over the last one, then the file is cut to its length: a reader
    in between (another process cleaning up, or this one confirming before a commit) must not
    find the longer one's tail behind the shorter one and take a live claim for an unknown one."""
    path = tmp_path / ".shard.claim"
    with ClaimSet(60) as mine:
        assert mine.take(path)
    holder = claims.Holder("host-a", 7, "token", 1795869353.0, 1795869353.2385948)
    fd = os.open(path, os.O_CREAT | os.O_RDWR)
    seen = []
    real_truncate = os.ftruncate
    try:
        claims._write(fd, holder)
        monkeypatch.setattr(os, "ftruncate", lambda f, n: seen.append(read_holder(path)) or real_truncate(f, n))
        claims._write(fd, claims.replace(holder, heartbeat=1795869354.5))
    finally:
        os.close(fd)
    assert [(h.tag, h.token, h.heartbeat) for h in seen] == [("host-a-7", "token", 1795869354.5)]
    assert read_holder(path).heartbeat == 1795869354.5


def test_another_hosts_claim_is_taken_over_only_when_its_heartbeat_is_stale(tmp_path):
    path = tmp_path / ".shard.claim"
    plant_claim(path, "host-b", dead_pid(), age=10)  # its pid means nothing on this machine
    assert not ClaimSet(60).take(path)
    assert read_holder(path).host == "host-b"
    with ClaimSet(5) as mine:
        assert mine.take(path)
        assert read_holder(path).host == host_name()


def test_a_process_of_another_host_never_counts_as_gone(monkeypatch):
    """A pid names a process only on its own machine: another host's writer whose pid has
    ended here may still be writing there, and its temporary files must stay."""
    monkeypatch.setenv(HOST_ENV, "host-a")
    pid = dead_pid()
    assert gone_here(f"host-a-{pid}")
    assert not gone_here(f"host-b-{pid}")
    assert not gone_here(f"host-a-{os.getpid()}")


def test_a_claim_of_a_dead_process_on_this_host_is_stale_at_once(tmp_path):
    path = tmp_path / ".shard.claim"
    plant_claim(path, host_name(), dead_pid(), age=0)
    with ClaimSet(60) as mine:
        assert mine.take(path)


def test_no_signal_probes_a_process_where_signal_0_is_ctrl_c(tmp_path, monkeypatch):
    """On Windows os.kill(pid, 0) sends Ctrl-C to the console: there every process counts as
    alive, and a claim of one that is gone waits for its heartbeat to go stale, as another host's does."""
    gone = dead_pid()

    def no_signals(pid, sig):
        raise AssertionError(f"signal {sig} sent to pid {pid}")

    monkeypatch.setattr(claims, "PROBE_PIDS", False)
    monkeypatch.setattr(os, "kill", no_signals)
    assert claims.pid_alive(gone) and claims.pid_alive(os.getpid())
    path = tmp_path / ".shard.claim"
    plant_claim(path, host_name(), gone, age=0)
    with ClaimSet(60) as mine:
        assert not mine.take(path)
    plant_claim(path, host_name(), gone, age=120)
    with ClaimSet(60) as mine:
        assert mine.take(path)


def test_a_taker_that_judged_a_claim_stale_too_late_leaves_the_new_one(tmp_path, monkeypatch):
    path = tmp_path / ".shard.claim"
    plant_claim(path, "host-b", 1, age=100)
    stale = read_holder(path)
    with ClaimSet(5) as first, ClaimSet(5) as late:
        assert first.take(path)
        real = claims.read_holder
        views = [stale]  # what `late` read before `first` took the claim over
        monkeypatch.setattr(claims, "read_holder", lambda p: views.pop() if views else real(p))
        assert not late.take(path)
        first.confirm(path)
    assert list(tmp_path.iterdir()) == []


def test_no_second_taker_gets_in_between_the_check_and_the_takeover(tmp_path, monkeypatch):
    path = tmp_path / ".shard.claim"
    plant_claim(path, "host-b", 1, age=100)
    real = claims.read_holder
    reads, second = [], []
    with ClaimSet(5) as first, ClaimSet(5) as other:

        def read_and_let_the_other_try(p: Path):
            holder = real(p)
            reads.append(p)
            if len(reads) == 2:  # `first` checked the stale claim once more and is about to replace it
                second.append(other.take(path))
            return holder

        monkeypatch.setattr(claims, "read_holder", read_and_let_the_other_try)
        assert first.take(path) and second == [False]
        first.confirm(path)


def take_at_once(sets: list[ClaimSet], path: Path) -> list[bool]:
    """Every claim set tries to take `path`, all let go at the same moment."""
    start = threading.Barrier(len(sets))

    def take(claim_set: ClaimSet) -> bool:
        start.wait()
        return claim_set.take(path)

    with ThreadPoolExecutor(len(sets)) as pool:
        return list(pool.map(take, sets))


def test_of_many_takers_of_a_stale_claim_one_wins(tmp_path):
    for attempt in range(10):
        path = tmp_path / f".shard-{attempt}.claim"
        plant_claim(path, "host-b", 1, age=100)
        sets = [ClaimSet(5) for _ in range(8)]
        assert take_at_once(sets, path).count(True) == 1
        assert sorted(tmp_path.glob(f"{path.name}*")) == [path]
        for s in sets:
            s.close()


def test_a_lock_left_by_a_taker_that_died_does_not_block_takeover(tmp_path):
    path = tmp_path / ".shard.claim"
    plant_claim(path, "host-b", 1, age=100)
    plant_claim(tmp_path / ".shard.claim.lock", host_name(), dead_pid(), age=0)
    with ClaimSet(5) as mine:
        assert mine.take(path)
    assert list(tmp_path.iterdir()) == []


def test_a_lost_claim_is_refused_and_its_new_holder_keeps_it(tmp_path):
    path = tmp_path / ".shard.claim"
    with ClaimSet(60) as mine:
        assert mine.take(path)
        path.unlink()  # taken over while this process was stalled
        plant_claim(path, "host-b", 7, age=0)
        with pytest.raises(ClaimError, match="lost the claim .* host-b pid 7"):
            mine.confirm(path)
    assert read_holder(path).host == "host-b"


def test_a_claim_whose_file_was_removed_is_lost(tmp_path):
    """The store's folder was removed (or the claim deleted by hand) while this process worked:
    it holds nothing any more and must not commit."""
    path = tmp_path / ".shard.claim"
    with ClaimSet(60) as mine:
        assert mine.take(path)
        path.unlink()
        with pytest.raises(ClaimError, match=rf"^lost the claim {re.escape(str(path))}: this process was stalled"):
            mine.confirm(path)


@pytest.mark.parametrize("offset, shown", [(120, r"\+1[12]\d\.\d"), (-120, r"-1[12]\d\.\d")])
def test_a_clock_far_from_the_file_systems_is_refused(tmp_path, monkeypatch, offset, shown):
    """Ahead or behind: either way heartbeats compared across machines mean nothing."""
    real = time.time
    monkeypatch.setattr(claims.time, "time", lambda: real() + offset)
    path = tmp_path / ".shard.claim"
    with ClaimSet(300, "features.claim_stale_seconds") as mine:
        with pytest.raises(ClaimError, match=rf"clock is {shown} s off .* features.claim_stale_seconds"):
            mine.take(path)
    assert not path.exists()


def test_a_full_disk_leaves_no_empty_claim_or_lock_behind(tmp_path, monkeypatch):
    path = tmp_path / ".shard.claim"
    mine = ClaimSet(300)
    assert mine.take(path)
    write = claims._write

    def disk_full(fd, holder):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(claims, "_write", disk_full)
    with pytest.raises(OSError, match="No space"):
        mine.close()  # releasing takes the claim's lock
    with pytest.raises(OSError, match="No space"):
        ClaimSet(300).take(tmp_path / ".other.claim")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    monkeypatch.setattr(claims, "_write", write)  # space freed, the process gone: a rerun goes on at once
    plant_claim(path, host_name(), dead_pid(), age=0)
    with ClaimSet(300) as again:
        assert again.take(path)


def test_the_stale_limit_must_be_positive():
    assert load_config(None).features.claim_stale_seconds == 300
    with pytest.raises(ConfigError, match="features.claim_stale_seconds"):
        load_config(None, ["features.claim_stale_seconds=0"])
