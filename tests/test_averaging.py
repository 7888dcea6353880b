"""Checkpoint averaging: which checks an average uses, the mean of saved weights, and the
callback that keeps only the candidates on disk (the whole flow runs in test_training)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from whisper_ft.averaging import Keeper, average, kept_mode, read_index, save_weights, select, weights_path
from whisper_ft.config import load_config, save_config
from whisper_ft.errors import UserError
from whisper_ft.reruns import check_average_mode

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mode, n, expected", [
    ("last", 3, [300, 400, 500]),
    ("last", 9, [100, 200, 300, 400, 500]),
    ("best", 2, [200, 400]),  # 0.30 and 0.31; NaN never counts as best
    ("best", 3, [200, 400, 500]),  # the tie at 0.40 goes to the later check
])
def test_select_takes_the_newest_or_the_best_checks(mode, n, expected):
    index = {100: 0.40, 200: 0.30, 300: math.nan, 400: 0.31, 500: 0.40}
    assert select(index, n, mode) == expected


def test_a_nan_score_is_never_best_wherever_it_stands():
    """NaN compares as neither lower nor higher than a number, so the order a sort leaves it in
    depends on where it stands: at the oldest check it came first, as the best."""
    assert select({100: math.nan, 200: 0.30, 300: 0.40}, 1, "best") == [200]


def test_average_is_the_elementwise_mean_in_float32(tmp_path):
    from safetensors.torch import save_file

    for i, w in enumerate((1.0, 2.0, 6.0)):
        save_file({"w": torch.full((2, 2), w, dtype=torch.bfloat16), "step": torch.tensor([i])},
                  str(tmp_path / f"{i}.safetensors"))
    mean = average([tmp_path / f"{i}.safetensors" for i in range(3)])
    assert mean["w"].dtype == torch.float32 and torch.equal(mean["w"], torch.full((2, 2), 3.0))
    assert torch.equal(mean["step"], torch.tensor([2]))  # integers are not averaged: the last file's


def test_keeper_keeps_only_what_the_average_uses(tmp_path):
    model = torch.nn.Linear(3, 2)
    keeper = Keeper(tmp_path, n=2, mode="best")
    control = SimpleNamespace()
    for step, wer in ((0, 0.9), (10, 0.5), (20, 0.7), (30, 0.4), (40, 0.6)):
        with torch.no_grad():
            model.weight.fill_(step)
        keeper.on_evaluate(None, SimpleNamespace(global_step=step, is_world_process_zero=True), control,
                           metrics={"eval_wer": wer}, model=model)
    folder = tmp_path / "averaging"
    assert read_index(folder) == {10: 0.5, 30: 0.4}  # step 0 (the base model) is never a candidate
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["step-10.safetensors", "step-30.safetensors"]
    assert json.loads((folder / "candidates.json").read_text()) == {"mode": "best", "scores": {"10": 0.5, "30": 0.4}}
    mean = average([weights_path(folder, 10), weights_path(folder, 30)])
    assert torch.equal(mean["weight"], torch.full((2, 3), 20.0))
    weights_path(folder, 10).unlink()  # killed between deleting a dropped candidate and rewriting the index
    assert read_index(folder) == {30: 0.4}


@pytest.mark.parametrize("mode", ["best", "last"])
def test_the_base_model_is_never_kept_however_it_scores(tmp_path, mode):
    """Step 0 is the model before training: averaged in, it pulls the fine-tuned weights back
    toward it. It stays out even when it scores best, or when the average has room for more
    checks than the run made."""
    keeper = Keeper(tmp_path, n=3, mode=mode)
    for step, wer in ((0, 0.1), (10, 0.5), (20, 0.4)):
        keeper.on_evaluate(None, SimpleNamespace(global_step=step, is_world_process_zero=True), SimpleNamespace(),
                           metrics={"eval_wer": wer}, model=torch.nn.Linear(3, 2))
    folder = tmp_path / "averaging"
    assert read_index(folder) == {10: 0.5, 20: 0.4}
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["step-10.safetensors", "step-20.safetensors"]


def test_saved_weights_are_float32_even_from_a_bf16_model(tmp_path):
    from safetensors.torch import load_file

    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    save_weights(model, tmp_path / "w.safetensors")
    assert {t.dtype for t in load_file(str(tmp_path / "w.safetensors")).values()} == {torch.float32}
    assert not list(tmp_path.glob(".*tmp*"))


def test_a_run_is_averaged_only_in_the_mode_its_checks_were_kept_for(tmp_path):
    """`last` deletes the checks `best` would average (and the other way round), so a resume or a
    rerun with the other average_mode is refused, not averaged from the wrong checks."""
    model = torch.nn.Linear(3, 2)
    keeper = Keeper(tmp_path, n=2, mode="last")
    for step, wer in ((2, 0.2), (4, 0.3), (6, 0.5), (8, 0.6)):
        keeper.on_evaluate(None, SimpleNamespace(global_step=step, is_world_process_zero=True), SimpleNamespace(),
                           metrics={"eval_wer": wer}, model=model)
    folder = tmp_path / "averaging"
    assert read_index(folder) == {6: 0.5, 8: 0.6} and kept_mode(folder) == "last"
    config = lambda *sets: load_config(ROOT / "config.yaml", [f"training.{s}" for s in sets])  # noqa: E731
    check_average_mode(config("average_checkpoints=2", "average_mode=last"), tmp_path)
    check_average_mode(config("average_checkpoints=0", "average_mode=best"), tmp_path)  # averaging off: nothing kept
    with pytest.raises(UserError, match=r"keeps the checks average_mode last averages, not those best would"):
        check_average_mode(config("average_checkpoints=2", "average_mode=best"), tmp_path)
    (folder / "candidates.json").write_text(json.dumps({"6": 0.5, "8": 0.6}))  # an index written without its mode
    assert read_index(folder) == {6: 0.5, 8: 0.6} and kept_mode(folder) is None
    save_config(config("average_checkpoints=2", "average_mode=last"), tmp_path / "config.yaml")  # the run's mode
    with pytest.raises(UserError, match=r"keeps the checks average_mode last averages, not those best would"):
        check_average_mode(config("average_checkpoints=2", "average_mode=best"), tmp_path)
    check_average_mode(config("average_checkpoints=2", "average_mode=last"), tmp_path)


@pytest.mark.parametrize("text", ["", '{"mode": "la', "[6, 8]"])
def test_a_damaged_index_is_a_one_line_error_naming_the_folder_to_delete(tmp_path, text):
    folder = tmp_path / "averaging"
    folder.mkdir()
    (folder / "candidates.json").write_text(text)
    config = load_config(ROOT / "config.yaml", ["training.average_checkpoints=2"])
    with pytest.raises(UserError, match=rf"^{folder / 'candidates.json'} is damaged \(.*\): delete the folder "
                                        rf"{folder} to go on"):
        check_average_mode(config, tmp_path)


def test_a_cut_weights_file_is_a_one_line_error_naming_it(tmp_path):
    save_weights(torch.nn.Linear(300, 200), tmp_path / "step-2.safetensors")
    save_weights(torch.nn.Linear(300, 200), tmp_path / "step-4.safetensors")
    (tmp_path / "step-4.safetensors").write_bytes((tmp_path / "step-4.safetensors").read_bytes()[:100_000])
    with pytest.raises(UserError, match=rf"^{tmp_path / 'step-4.safetensors'} is damaged \(.+\): delete it and rerun; "
                                        "the average then leaves its check out$"):
        average([tmp_path / "step-2.safetensors", tmp_path / "step-4.safetensors"])
