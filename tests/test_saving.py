"""Checkpoints written in the background (`whisper_ft.saving`): the same files and contents as
the Trainer's own synchronous save, host copies that training cannot change, a failed write
that surfaces and leaves no folder that looks complete, leftovers removed on the next start."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from test_training import file_modes, overrides, umask_mode
from whisper_ft import checkpoints
from whisper_ft.config import load_config
from whisper_ft.saving import BackgroundSaver, DiskFullError, to_host


def test_host_copy_is_independent_and_keeps_tied_tensors_tied():
    weight = torch.randn(3, 2)
    state = {"a": weight, "b": weight, "opt": {"state": {0: {"exp_avg": torch.ones(2), "step": torch.tensor(3.0)}},
                                               "param_groups": [{"lr": 0.1, "params": [0]}]}}
    copy = to_host(state)
    weight.add_(1.0)  # the next training step
    state["opt"]["state"][0]["exp_avg"].mul_(5)
    assert copy["a"] is copy["b"] and not torch.equal(copy["a"], weight)
    assert copy["opt"]["state"][0]["exp_avg"].tolist() == [1.0, 1.0]
    assert copy["opt"]["param_groups"] == [{"lr": 0.1, "params": [0]}]


def test_host_copy_reuses_the_previous_copy_as_its_buffers():
    state = {"w": torch.randn(4, 3), "groups": [{"lr": 0.1}], "step": torch.tensor(1.0)}
    first = to_host(state)
    state["w"].add_(1.0)
    state["step"].add_(1.0)
    second = to_host(state, reuse=first)
    assert second["w"] is first["w"] and torch.equal(second["w"], state["w"])  # refilled in place
    assert second["step"].item() == 2.0
    third = to_host({"w": torch.randn(2, 2)}, reuse=first)  # another shape: a new buffer
    assert third["w"] is not first["w"]


def test_saver_runs_one_write_at_a_time_and_raises_a_failure_on_wait():
    saver, order = BackgroundSaver(), []
    saver.submit(lambda: order.append(1))
    saver.submit(lambda: order.append(2))  # waits for the first
    saver.wait()
    assert order == [1, 2] and not saver.busy

    def fail():
        raise OSError("No space left on device")

    saver.submit(fail)
    with pytest.raises(RuntimeError, match="writing a checkpoint failed: No space left on device"):
        saver.wait()
    saver.wait()  # raised once

    def full():
        raise DiskFullError("the disk of /runs/r1 is full")

    saver.submit(full)
    with pytest.raises(DiskFullError, match="^the disk of /runs/r1 is full$"):  # says what to do already
        saver.wait()


def _run(tmp_path: Path, features_dir, tiny_model_dir, name: str, **training) -> Path:
    from whisper_ft.train import run_training

    cfg = load_config(ROOT / "config.yaml", overrides(features_dir, tiny_model_dir, tmp_path, run_name=name,
                                                      eval_before_training="false", export_ctranslate2="false",
                                                      **training))
    run_training(cfg)
    return tmp_path / name


def test_background_checkpoint_equals_the_trainers_own(tmp_path, features_dir, tiny_model_dir, monkeypatch):
    import threading

    from safetensors.torch import load_file

    from whisper_ft.trainer import WhisperTrainer

    writers = []
    write = WhisperTrainer._write_checkpoint

    def spy(self, tmp, final, *args):
        writers.append((final.name, threading.current_thread().name))
        return write(self, tmp, final, *args)

    monkeypatch.setattr(WhisperTrainer, "_write_checkpoint", spy)
    runs = {flag: _run(tmp_path, features_dir, tiny_model_dir, f"saves-{flag}", background_saves=flag)
            for flag in ("true", "false")}
    assert writers == [("checkpoint-2", "checkpoint-writer"), ("checkpoint-4", "checkpoint-writer")]  # the "true" run
    bg, sync = (runs["true"] / "checkpoint-4", runs["false"] / "checkpoint-4")
    assert sorted(p.name for p in bg.iterdir()) == sorted(p.name for p in sync.iterdir())
    assert [s for s, _ in checkpoints.checkpoints(runs["true"])] == [s for s, _ in checkpoints.checkpoints(runs["false"])]
    a, b = load_file(bg / "model.safetensors"), load_file(sync / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    opt_a, opt_b = (torch.load(p / "optimizer.pt", weights_only=True) for p in (bg, sync))
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for i in opt_b["state"]:
        for k in opt_b["state"][i]:
            torch.testing.assert_close(opt_a["state"][i][k], opt_b["state"][i][k], rtol=1e-5, atol=1e-6)
    assert torch.load(bg / "scheduler.pt") == torch.load(sync / "scheduler.pt")
    state_a, state_b = (json.loads((p / "trainer_state.json").read_text()) for p in (bg, sync))
    assert state_a["global_step"] == state_b["global_step"] == 4
    assert Path(state_a["best_model_checkpoint"]).name == Path(state_b["best_model_checkpoint"]).name
    assert not list(runs["true"].glob(".checkpoint-*"))  # nothing left staged
    for checkpoint in (bg, sync):  # safetensors writes 0600; the weights are readable like the rest
        assert set(file_modes(checkpoint).values()) == {umask_mode()}, file_modes(checkpoint)
    for flag, run_dir in runs.items():
        saves = [e for e in checkpoints.read_events(run_dir) if e["event"] == "checkpoint"]
        assert [(e["step"], e["background"]) for e in saves] == [(2, flag == "true"), (4, flag == "true")]
        assert all(e["held_s"] >= 0 for e in saves)


def test_a_failed_write_raises_and_leaves_no_checkpoint_then_the_next_start_cleans_up(
        tmp_path, features_dir, tiny_model_dir, monkeypatch):
    from whisper_ft.trainer import WhisperTrainer

    def no_space(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(WhisperTrainer, "_write_checkpoint", lambda self, tmp, *a: no_space(self))
    with pytest.raises(RuntimeError, match="writing a checkpoint failed: No space left on device"):
        _run(tmp_path, features_dir, tiny_model_dir, "full-disk", max_steps=2)
    run_dir = tmp_path / "full-disk"
    assert checkpoints.checkpoints(run_dir) == []
    staged = list(run_dir.glob(".checkpoint-2.tmp-*"))
    assert len(staged) == 1 and (staged[0] / "trainer_state.json").is_file()  # half a checkpoint, hidden
    monkeypatch.undo()
    _run(tmp_path, features_dir, tiny_model_dir, "full-disk", max_steps=2)
    assert [s for s, _ in checkpoints.checkpoints(run_dir)] == [2]
    assert not list(run_dir.glob(".checkpoint-*"))


def _disk_with(free: int):
    """shutil.disk_usage of a disk with `free` bytes left."""
    import shutil

    return lambda path: shutil._ntuple_diskusage(10**9, 10**9 - free, free)


def test_a_failed_write_is_a_full_disk_when_the_disk_has_no_room_for_it(tmp_path, monkeypatch):
    import errno

    from whisper_ft import saving

    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 771072 vs 770964")
    monkeypatch.setattr(saving.shutil, "disk_usage", _disk_with(2_000_000))
    full = saving.disk_full(tmp_path, 47_000_000, torch_error)
    assert isinstance(full, saving.DiskFullError) and str(full) == (
        f"the disk of {tmp_path} is full (2.0 MB free, a checkpoint takes about 47.0 MB): free space there (a save "
        "needs room for one checkpoint more than training.save_total_limit keeps, until rotation removes the oldest), "
        "then rerun the same command to resume from the "
        "last checkpoint saved")
    assert saving.disk_full(tmp_path, 1_000_000, torch_error) is None  # room left: another failure
    assert saving.disk_full(tmp_path, 1_000_000, OSError(errno.ENOSPC, "No space left on device")) is not None
    with pytest.raises(ValueError):  # other failures pass through
        with saving.disk_full_as_user_error(tmp_path, 1_000_000):
            raise ValueError("not the disk")


@pytest.mark.parametrize("background", ["true", "false"])
def test_a_checkpoint_that_does_not_fit_on_the_disk_is_a_one_line_error(tmp_path, features_dir, tiny_model_dir,
                                                                        monkeypatch, capsys, background):
    from test_training import cli_args
    from training_pipeline import main
    from whisper_ft import saving
    from whisper_ft.cli import run

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 771072 vs 770964")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(saving.shutil, "disk_usage", _disk_with(1_000))
    code = run(main, cli_args(overrides(features_dir, tiny_model_dir, tmp_path, max_steps=2,
                                        eval_before_training="false", background_saves=background)))
    err = capsys.readouterr().err
    errors = [line[line.index("error: "):] for line in err.splitlines() if "error: " in line]  # after a progress bar
    assert code == 2 and "Traceback" not in err and len(errors) == 1
    assert errors[0].startswith(f"error: the disk of {tmp_path / 'tiny'} is full (0.0 MB free, a checkpoint takes ")
    assert checkpoints.checkpoints(tmp_path / "tiny") == []


def test_without_room_for_the_host_copy_saves_are_synchronous(tmp_path, features_dir, tiny_model_dir, monkeypatch,
                                                               caplog):
    from whisper_ft import saving, trainer

    monkeypatch.setattr(saving, "available_memory", lambda: 1000)  # 1 kB free
    monkeypatch.setattr(trainer, "available_memory", lambda: 1000)
    writes = []
    monkeypatch.setattr(trainer.WhisperTrainer, "_write_checkpoint", lambda self, *a: writes.append(a))
    with caplog.at_level("WARNING", logger="whisper_ft.trainer"):
        run_dir = _run(tmp_path, features_dir, tiny_model_dir, "low-memory", max_steps=2)
    assert writes == []  # the Trainer's own save
    assert [s for s, _ in checkpoints.checkpoints(run_dir)] == [2]
    assert "checkpoints are saved synchronously" in caplog.text and "free memory (0.0 GB)" in caplog.text


def test_room_for_a_copy_is_half_of_the_free_memory(monkeypatch):
    from whisper_ft import saving

    monkeypatch.setattr(saving, "available_memory", lambda: 8_000)
    assert saving.fits_in_memory(4_000) and not saving.fits_in_memory(4_001)
    monkeypatch.setattr(saving, "available_memory", lambda: None)  # unknown: allowed
    assert saving.fits_in_memory(10**15)
    assert saving.nbytes({"a": torch.zeros(4, dtype=torch.float32), "b": [torch.zeros(2, dtype=torch.bfloat16), 3]}) == 20
    shared = torch.zeros(8, dtype=torch.float32)
    assert saving.nbytes({"embed": shared, "proj_out": shared, "head": shared[:4]}) == 48  # tied: counted once
    assert saving.available_memory() is None or saving.available_memory() > 0


def test_folders_and_files_reach_the_disk_before_their_new_name(tmp_path, monkeypatch):
    """replace_dir and write_atomic flush the data before the rename and the name after it: a
    power loss then leaves the old version or the new one, never a new name on empty files."""
    import os

    from whisper_ft import files

    log: list[str] = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: log.append(f"fsync {Path(os.readlink(f'/proc/self/fd/{fd}')).name}")
                        or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: log.append(f"replace {Path(b).name}") or replace(a, b))
    tmp = tmp_path / ".best.tmp-1"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"w" * 10)
    (tmp / "sub" / "config.json").write_text("{}")
    files.replace_dir(tmp, tmp_path / "best")
    assert log.index("replace best") > max(log.index(f"fsync {n}") for n in ("model.safetensors", "config.json", "sub"))
    assert log[-1] == f"fsync {tmp_path.name}"  # the new name itself
    log.clear()
    files.write_atomic(tmp_path / "metrics.json", "{}")
    assert log == [f"fsync .metrics.json.tmp-{os.getpid()}", "replace metrics.json", f"fsync {tmp_path.name}"]


def test_writes_land_whole_where_a_folder_cannot_be_opened(tmp_path, monkeypatch):
    """Windows refuses to open a folder (PermissionError, which the commands would report as no
    access to it) and has no folder to flush: every atomic write still lands, and whole."""
    import os

    from whisper_ft import files

    real_open = os.open

    def no_folders(path, flags, *args):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_folders)
    monkeypatch.setattr(files, "FLUSH_FOLDERS", False)
    files.write_atomic(tmp_path / "metrics.json", "{}")
    assert files.create_atomic(tmp_path / "plan.json", "plan") is True
    tmp = tmp_path / ".best.tmp-1"
    tmp.mkdir()
    (tmp / "config.json").write_text("{}")
    files.replace_dir(tmp, tmp_path / "best")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "metrics.json", "plan.json"]
    assert (tmp_path / "plan.json").read_text() == "plan" and (tmp_path / "best" / "config.json").read_text() == "{}"


def swaps_in_one_step(folder: Path) -> bool:
    """Whether `files.exchange` swaps two names here (Linux, and a file system that can)."""
    from whisper_ft import files

    a, b = folder / ".probe-a", folder / ".probe-b"
    a.mkdir()
    b.mkdir()
    try:
        return files.exchange(a, b)
    finally:
        a.rmdir()
        b.rmdir()


@pytest.mark.parametrize("one_step", [True, False], ids=["exchanged", "moved-aside"])
def test_replacing_a_folder_leaves_only_the_new_one(tmp_path, monkeypatch, one_step):
    """Each new best/ replaces the old one, which is then removed, so a run that improves fifty
    times does not keep fifty hidden copies of the model beside best/; the same where the two
    cannot be swapped in one step and the old one is moved aside first."""
    from whisper_ft import files

    if one_step and not swaps_in_one_step(tmp_path):
        pytest.skip("this system or file system cannot swap two names in one step (renameat2)")
    if not one_step:
        monkeypatch.setattr(files, "exchange", lambda a, b: False)
    for version in ("old", "new"):
        tmp = files.staging_dir(tmp_path / "best")
        tmp.mkdir()
        (tmp / "model.safetensors").write_text(version)
        files.replace_dir(tmp, tmp_path / "best")
    assert [p.name for p in tmp_path.iterdir()] == ["best"]
    assert (tmp_path / "best" / "model.safetensors").read_text() == "new"


def test_a_folder_another_process_renames_into_place_meanwhile_is_replaced_too(tmp_path, monkeypatch):
    """Two processes of one feature store may write its processor/ at once: when the other's
    folder lands between this one's look and its rename, this one still lands, alone and whole."""
    import os

    from whisper_ft import files

    final = tmp_path / "processor"
    real_replace = os.replace
    raced: list[str] = []

    def other_process_first(src, dst):
        if Path(dst) == final and not raced:
            other = tmp_path / ".processor.tmp-other"
            other.mkdir()
            (other / "tokenizer.json").write_text("other")
            real_replace(other, final)
            raced.append("other")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", other_process_first)
    tmp = files.staging_dir(final)
    tmp.mkdir()
    (tmp / "tokenizer.json").write_text("mine")
    files.replace_dir(tmp, final)
    assert raced and [p.name for p in tmp_path.iterdir()] == ["processor"]
    assert (final / "tokenizer.json").read_text() == "mine"


def test_a_folder_being_replaced_is_there_at_every_moment(tmp_path, monkeypatch):
    """The app picks the newest best/ of all runs: while training replaces a run's best/, that
    name must not be missing for a moment, or the app would serve another run's model."""
    import shutil

    from whisper_ft import files

    if not swaps_in_one_step(tmp_path):
        pytest.skip("this system or file system cannot swap two names in one step (renameat2)")
    final = tmp_path / "best"
    seen = []
    real_replace, real_rmtree = os.replace, shutil.rmtree
    monkeypatch.setattr(os, "replace", lambda a, b: seen.append(final.is_dir()) or real_replace(a, b))
    monkeypatch.setattr(shutil, "rmtree", lambda p, **kw: seen.append(final.is_dir()) or real_rmtree(p, **kw))
    for version in ("old", "new"):
        tmp = files.staging_dir(final)
        tmp.mkdir()
        (tmp / "config.json").write_text(version)
        files.replace_dir(tmp, final)
    assert seen[0] is False and all(seen[1:]) and len(seen) > 1  # missing only before the first one
    assert (final / "config.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["best"]


def test_new_file_mode_follows_the_umask(tmp_path):
    from whisper_ft import files

    mask = os.umask(0o027)
    try:
        assert files.new_file_mode() == 0o640
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "weights").write_bytes(b"w")
        (tmp_path / "a" / "weights").chmod(0o600)
        files.share_like_new_files(tmp_path)
        assert (tmp_path / "a" / "weights").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(mask)


@pytest.mark.parametrize("hard_links", [True, False])
def test_create_atomic_writes_a_file_whole_unless_it_exists(tmp_path, monkeypatch, hard_links):
    """The first writer's content stands; with or without hard links on the file system, and no
    temporary file is left."""
    import errno
    import os

    from whisper_ft import files

    if not hard_links:
        def no_links(src, dst):
            raise OSError(errno.EPERM, "hard links not supported")

        monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "plan.json"
    assert files.create_atomic(path, "first") is True
    assert files.create_atomic(path, "second") is False
    assert path.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_a_checkpoint_written_during_a_forward_pass_on_the_bf16_copy_says_float32(tmp_path, features_dir,
                                                                                   tiny_model_dir, monkeypatch):
    """The writer thread saves from host copies while training goes on, and `save_pretrained`
    reads the dtype of the live model, whose parameters are the bf16 copies for the length of
    each forward pass: written then, a checkpoint's config said bfloat16 over float32 weights,
    and loaded as a bf16 model. Here every write happens during such a pass."""
    from whisper_ft import precision
    from whisper_ft.model import load_model
    from whisper_ft.trainer import WhisperTrainer

    save = WhisperTrainer._save

    def during_a_forward_pass(self, *args, **kwargs):
        plan = precision._plan(self.model)
        with torch.no_grad(), plan.swapped(plan.cast(torch.bfloat16)):
            assert self.model.dtype == torch.bfloat16
            return save(self, *args, **kwargs)

    monkeypatch.setattr(WhisperTrainer, "_save", during_a_forward_pass)
    run = _run(tmp_path, features_dir, tiny_model_dir, "racing", max_steps=2, save_steps=2, eval_steps=2)
    assert json.loads((run / "checkpoint-2" / "config.json").read_text())["dtype"] == "float32"
    assert load_model(str(run / "checkpoint-2")).dtype == torch.float32
