"""The GPU benchmark's parts run on CPU too: the training loop (`bench/bench_training.py`), its
recipes and one step of each bf16 variant of the pipeline, and the save timing (`bench/bench_saves.py`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import bench_training  # noqa: E402

# A Whisper of toy width and tiny's four layers a stack: the benchmarks' code paths (and per-layer
# counts such as layout copies) without the minutes bf16 arithmetic of real width takes on a CPU.
MICRO = "micro"


@pytest.fixture(autouse=True)
def micro_size(monkeypatch):
    monkeypatch.setitem(bench_training.SIZES, MICRO, (64, 4, 2, 256))


def test_bf16_pipeline_is_timed_on_the_weight_copy_and_under_autocast():
    rows = bench_training.examples(8, 10)
    by_name = {r.name: r for r in bench_training.recipes("cpu", rows, compile_model=False, precision="bf16")}
    assert set(by_name) == {"blog", "pipeline", "pipeline+autocast", "pipeline+stock-layout"}
    assert by_name["pipeline"].weight_copy and not by_name["pipeline+autocast"].weight_copy
    assert by_name["pipeline"].contiguous_layout and not by_name["pipeline+stock-layout"].contiguous_layout
    assert not by_name["blog"].contiguous_layout  # the blog runs transformers' own attention
    fp32 = {r.name for r in bench_training.recipes("cpu", rows, compile_model=False)}
    assert fp32 == {"blog", "pipeline", "pipeline+stock-layout"}


@pytest.mark.parametrize("name", ["pipeline", "pipeline+autocast", "pipeline+stock-layout"])
def test_one_bf16_training_step_of_each_pipeline_variant(name):
    import dataclasses

    rows = bench_training.examples(4, 10)
    recipe = next(r for r in bench_training.recipes("cpu", rows, False, "bf16") if r.name == name)
    result = bench_training.bench_train(dataclasses.replace(recipe, batch_size=2), MICRO, "cpu", rows, steps=1,
                                       warmup=1)
    assert result["train_samples_per_s"] > 0 and result["warmup_steps"] == 1


def test_save_benchmark_times_both_modes(tmp_path):
    import bench_saves

    out = tmp_path / "saves.json"
    assert bench_saves.main(["--size", "tiny", "--device", "cpu", "--saves", "2", "--out", str(tmp_path),
                             "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"synchronous", "background"}
    for r in results.values():
        assert len(r["held_s"]) == 2 and r["checkpoint_bytes"] > 0
        assert all(h <= c for h, c in zip(r["held_s"], r["complete_s"]))
    assert [p.name for p in tmp_path.iterdir()] == ["saves.json"]  # the checkpoints are removed


def test_end_to_end_benchmark_builds_a_store_the_pipeline_reads(tmp_path, tiny_model_dir):
    """bench/bench_e2e.py's synthetic store has every column of the current store format."""
    import bench_e2e

    from whisper_ft.features import FeatureStore, load_split

    name = bench_e2e.make_store(tmp_path / "data", tiny_model_dir, n_train=4, n_eval=2)
    root = tmp_path / "data" / "features" / name
    assert len(load_split(root, "train")) == 4 and len(load_split(root, "eval")) == 2
    assert FeatureStore(root).manifest()["name"] == name


def test_profile_summary_per_step():
    from types import SimpleNamespace as Event

    import bench_e2e

    events = [Event(key="void gemm_kernel<...>", self_cpu_time_total=0, self_device_time_total=150_000),
              Event(key="aten::mm", self_cpu_time_total=500, self_device_time_total=150_000)]
    kernels = bench_e2e.kernel_seconds(events)  # a kernel counts once, not again under its operator
    out = bench_e2e.profile_summary(kernels, {"optimizer_ms": 0.002, "between_steps_ms": 0.004}, steps=2, wall=0.2)
    assert out == pytest.approx({"profiled_steps": 2, "wall_ms": 100.0, "gpu_kernel_ms": 75.0, "gpu_busy": 0.75,
                                 "forward_backward_ms": 0.0, "optimizer_ms": 1.0, "after_optimizer_ms": 0.0,
                                 "between_steps_ms": 2.0})
    assert bench_e2e.profile_summary(None, {}, steps=2, wall=0.2)["gpu_busy"] is None  # no GPU


def test_step_profiler_splits_the_host_time_of_each_step_by_the_trainers_callbacks(monkeypatch):
    """Each profiled step adds once to each part, from the end of step `start` to the last step."""
    from types import SimpleNamespace

    import bench_e2e

    clock = iter(range(100))
    monkeypatch.setattr(bench_e2e.time, "perf_counter", lambda: float(next(clock)))
    prof = bench_e2e.StepProfiler(start=1)
    state = SimpleNamespace(global_step=0, max_steps=3)
    for step in range(1, 4):  # each callback one second after the one before
        for event in ("on_step_begin", "on_pre_optimizer_step", "on_optimizer_step"):
            getattr(prof, event)(None, state, None)
        state.global_step = step
        prof.on_step_end(None, state, None)
    out = prof.result
    assert out["profiled_steps"] == 2
    assert {k: out[k] for k in bench_e2e.HOST_PARTS.values()} == {
        "forward_backward_ms": 1000.0, "optimizer_ms": 1000.0, "after_optimizer_ms": 1000.0, "between_steps_ms": 1000.0}
    assert out["wall_ms"] >= 4000.0  # the four parts cover each step whole


def test_sync_counter_counts_waits_for_the_gpu_by_source_line():
    import warnings

    import bench_e2e

    with bench_e2e.SyncCounter() as counter:
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("something else")
    sites = dict(site.rsplit(" x", 1) for site in counter.summary(steps=2)["host_sync_sites"])
    assert counter.summary(steps=2)["host_syncs_per_step"] == 1.5
    assert list(sites.values()) == ["3"] and next(iter(sites)).startswith("test_bench.py:")


def test_end_to_end_benchmark_times_and_profiles_the_real_command(tmp_path, capsys):
    """The part of bench/gpu.sh that runs `run_training`: its JSON line has the timed window,
    the evaluation, the host's hot spots, the profile of the last steps and the steps timed
    in the same process after the window."""
    import bench_e2e

    assert bench_e2e.main(["--recipe", "pipeline", "--size", MICRO, "--steps", "6", "--skip", "1",
                           "--profile-steps", "2", "--hotspot-steps", "2", "--same-process-steps", "1",
                           "--train-clips", "24", "--eval-clips", "4",
                           "--work", str(tmp_path), "--set", "training.batch_size=4",
                           "--set", "training.dataloader_workers=0"]) == 0
    text = capsys.readouterr().out
    lines = [json.loads(line) for line in text.splitlines() if line.startswith('{"recipe"')]
    assert text.count('\n{"recipe"') == 2  # each on a line of its own: gpu.sh reads them from logs full of \r
    partial, out = lines  # the timed window as soon as it ends (a part cut short keeps it), then everything
    assert partial["partial"] is True and partial["train_samples_per_s"] == out["train_samples_per_s"]
    assert out["steps"] == 6 and out["skip_steps"] == 1 and out["train_samples_per_s"] > 0
    assert out["eval_clips"] == 4 and out["eval_clips_per_s"] > 0 and "partial" not in out
    assert 25 < out["label_tokens"] < 40 and out["generation_max_length"] > out["label_tokens"]  # ~28 like CV
    prof = out["profile"]
    assert prof["profiled_steps"] == 2 and prof["wall_ms"] > 0 and prof["optimizer_ms"] > 0
    assert prof["forward_backward_ms"] > prof["optimizer_ms"] and prof["between_steps_ms"] > 0
    assert prof["gpu_busy"] is None and "host_syncs_per_step" not in prof  # no GPU here
    spots = out["host_hotspots"]  # per step, the most time of their own first
    assert len(spots) == 15 and any("run_backward" in s for s in spots)
    own = [float(s.split(" ms ")[0]) for s in spots]
    assert own == sorted(own, reverse=True) and own[0] > 0
    listed = sum(int(s.split(" ms ")[1].split("x ")[0]) for s in spots)  # the hot spots' own calls per step
    assert out["host_calls_per_step"] > listed
    # and over the check after the last step
    assert any("GreedyDecoder" in s or "decoding.py" in s for s in out["eval_hotspots"])
    # the Trainer's step alone and the bare loop's, on the run's model, after the timed window
    same = out["same_process"]
    assert same["at_step"] == 2 and same["steps"] == 2 and "bare_step_no_cudnn_autotune_ms" not in same  # no GPU
    assert all(same[k] > 0 for k in ("loop_ms", "trainer_step_loader_ms", "trainer_step_ms", "bare_step_ms"))



def test_same_process_steps_end_the_data_loader_workers_they_start(tmp_path, monkeypatch):
    """The data loader that the Trainer's step is timed on keeps persistent workers, as the
    run's does: they end with the measurement, not with the run."""
    import multiprocessing

    import bench_e2e

    children = []
    measure = bench_e2e.SameProcessSteps.measure

    def counted(self, *a, **k):
        children.append(len(multiprocessing.active_children()))
        result = measure(self, *a, **k)
        children.append(len(multiprocessing.active_children()))
        return result

    monkeypatch.setattr(bench_e2e.SameProcessSteps, "measure", counted)
    assert bench_e2e.main(["--recipe", "pipeline", "--size", MICRO, "--steps", "4", "--skip", "1",
                           "--same-process-steps", "1", "--train-clips", "16", "--eval-clips", "4",
                           "--work", str(tmp_path), "--set", "training.batch_size=4",
                           "--set", "training.dataloader_workers=2"]) == 0
    assert children[0] == children[1] == 2  # the run's own two, before and after

def test_profile_kinds_tell_the_weight_casts_from_the_optimizer():
    import profile_step

    cast = "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::" \
           "TensorListMetadata<2>, at::native::(anonymous namespace)::CopyFunctor<c10::BFloat16, float, 2, 1, 1>>"
    adam = "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>"
    assert profile_step.kind(cast) == "copy/cast" and profile_step.kind(adam) == "optimizer"
    assert profile_step.kind("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>") \
        == "copy/cast"
    assert profile_step.kind("nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN") == "gemm"


def test_gpu_report_prints_every_result_of_a_run(tmp_path, capsys):
    import shutil

    import gpu_report

    shutil.copytree(ROOT / "bench" / "results" / "h200-2026-11-26", tmp_path, dirs_exist_ok=True)
    e2e = json.loads((tmp_path / "e2e-pipeline.json").read_text())
    e2e["profile"] = {"profiled_steps": 20, "wall_ms": 60.0, "gpu_kernel_ms": 57.0, "gpu_busy": 0.95,
                      "forward_backward_ms": 50.0, "optimizer_ms": 1.5, "after_optimizer_ms": 0.3,
                      "between_steps_ms": 0.4, "host_syncs_per_step": 0.05,
                      "host_sync_sites": ["trainer.py:2249 x1"]}
    e2e["host_hotspots"] = [f"{9 - i}.00 ms 1x f{i}" for i in range(8)]
    e2e["host_calls_per_step"] = 35150.0
    e2e["eval_hotspots"] = ["900.00 ms 1x g"]
    e2e["same_process"] = {"loop_ms": 115.9, "at_step": 164, "steps": 12, "trainer_step_loader_ms": 101.0,
                           "trainer_step_ms": 80.25,
                           "bare_step_ms": 72.0, "bare_step_no_cudnn_autotune_ms": 71.5}
    (tmp_path / "e2e-pipeline.json").write_text(json.dumps(e2e))
    (tmp_path / "saves.json").write_text(json.dumps({"results": {
        "synchronous": {"checkpoint_bytes": 2.89e9, "held_s": [5.2, 5.0]},
        "background": {"checkpoint_bytes": 2.89e9, "held_s": [0.3, 0.2]}}}))
    (tmp_path / "gpu.txt").write_text("NVIDIA H200, 143771 MiB, 580.95\ntorch 2.11.0 transformers 5.23.0\n"
                                      "2026-11-26 10:00 UTC\n")
    (tmp_path / "e2e-broken.json").write_text('{"recipe": "e2e-bro')  # a part cut short, with nothing whole
    partial = {**json.loads((tmp_path / "e2e-blog.json").read_text()), "recipe": "e2e-cut", "partial": True}
    (tmp_path / "e2e-cut.json").write_text(json.dumps(partial))
    assert gpu_report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H200, 143771 MiB, 580.95; torch 2.11.0 transformers 5.23.0; 2026-11-26 10:00 UTC" in out
    assert "MFU peak: NVIDIA H200 datasheet" in out and "(e2e-broken.json: no result" in out
    assert "| e2e-cut | end to end, 60 steps, batch 16 | 25.8 | 3.1% | 10.0 (10 steps) | (cut short after training) |" in out
    assert "| pipeline | bare loop | 168.3 | 20.3% |" in out and "| e2e-blog | end to end, 60 steps, batch 16 | 25.8 |" in out
    assert "394.3 (423.1 at batch 128)" in out
    assert "GPU busy 95% (57.0 ms of kernels); host ms per step: forward+backward 50.0, optimizer 1.5" in out
    assert "GPU busy 95%" in out and "waits for the GPU: 0.05 per step (trainer.py:2249 x1)" in out
    assert "e2e-pipeline, the host's hot spots per step (35150 Python calls): 9.00 ms 1x f0; 8.00 ms 1x f1; " in out
    assert "4.00 ms 1x f5" in out and "f6" not in out
    assert ("e2e-pipeline, ms per step in the same process after step 164: the Trainer's loop 115.9; its step on "
            "a new data loader 101.0; on batches collated ahead 80.2; the bare loop's step on them 72.0; the same, "
            "cuDNN autotuning off 71.5 (12 steps each)") in out
    assert "e2e-pipeline, the host's hot spots in the check after the last step: 900.00 ms 1x g" in out
    assert "checkpoint saves (2.89 GB): training held synchronous 5.20 5.00 s; background 0.30 0.20 s" in out


def test_agreement_only_checks_the_decoders_without_timing_them(tmp_path, capsys):
    out = tmp_path / "agreement.json"
    assert bench_training.main(["--size", MICRO, "--device", "cpu", "--agreement", "4", "--agreement-only",
                                "--label-tokens", "6", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["results"] == {} and 0 <= data["agreement_fp32"] <= 1 and "agreement_bf16" in data
    assert "train" not in capsys.readouterr().out


def test_gpu_sh_passes_each_benchmark_arguments_it_accepts_within_one_device_call():
    """bench/gpu.sh runs on a lent GPU machine, one 10-minute call: an argument a script does
    not know would lose that part of the run, so each command line is parsed here."""
    import importlib
    import re
    import shlex

    text = (ROOT / "bench" / "gpu.sh").read_text().replace("\\\n", " ")
    commands = [shlex.split(line) for line in text.splitlines() if re.match(r"(step|e2e) ", line)]
    assert len(commands) >= 6
    for words in commands:
        kind, name, limit = words[:3]
        if kind == "step":
            assert words[3] == "$py" and words[4].startswith("bench/")
            script, argv = Path(words[4]).stem, words[5:]
        else:
            script, argv = "bench_e2e", ["--size", "small", "--work", "w", "--label", name, *words[3:]]
        importlib.import_module(script).parse_args(argv)  # exits on an unknown argument
    assert sum(int(words[2]) for words in commands) <= 560  # time limits, within the device's 600 s per call


def test_host_step_times_each_variant(capsys):
    import re

    import host_step

    assert host_step.main(["--size", "tiny", "--rounds", "1", "--steps", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("host time per training step, tiny's 8 layers")
    rows = {m[1]: (float(m[2]), int(m[3]), int(m[4])) for m in (
        re.match(r"  (.+?) +([\d.]+) ms .*, (\d+) operators, (\d+) Python calls", line) for line in lines[1:-1])}
    assert list(rows) == list(host_step.VARIANTS) and all(ms > 0 for ms, _, _ in rows.values())
    assert rows["bf16 weight copy"][1] > rows["fp32"][1]  # its casts and their gradients
    assert rows["bf16 weight copy"][1] < rows["bf16 functional_call"][1]  # one buffer a layer, not a tensor a weight
    assert rows["bf16 weight copy"][2] < rows["bf16 functional_call"][2]
    # the Trainer's step: the same operators give or take its schedule's, more Python (module walks)
    assert abs(rows["bf16 WhisperTrainer"][1] - rows["bf16 weight copy"][1]) < 20
    assert rows["bf16 WhisperTrainer"][2] > rows["bf16 weight copy"][2]
    assert re.fullmatch(r"gradient clipping alone: torch.nn.utils.clip_grad_norm_ [\d.]+ ms, "
                        r"whisper_ft.trainer.clip_gradients [\d.]+ ms", lines[-1])


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                          ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835),
                                          ("NVIDIA A100-SXM4-80GB", 312)])
def test_mfu_peak_is_the_cards_own(monkeypatch, name, tflops):
    """The PCIe and NVL cards have lower bf16 peaks than the SXM ones whose names they contain."""
    import bench_training
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    peak, source = bench_training.peak_flops("cuda", "bf16", 0.0)
    assert peak == tflops * 1e12 and f"{tflops:g} TFLOP/s bf16" in source


def test_evaluation_timing_keeps_the_warm_up_decoder(monkeypatch):
    """The warm-up builds the decoder (caches, CUDA graph) that the timed run then uses."""
    import bench_training

    built = []
    real = bench_training.GreedyDecoder
    monkeypatch.setattr(bench_training, "GreedyDecoder", lambda *a, **k: built.append(1) or real(*a, **k))
    rows = bench_training.examples(6, 5)
    pipeline = {r.name: r for r in bench_training.recipes("cpu", rows, compile_model=False, precision="fp32")}["pipeline"]
    assert bench_training.bench_eval(pipeline, "tiny", "cpu", rows, new_tokens=4, batch_size=4) > 0
    assert built == [1]


def test_layout_copies_counts_the_copies_whisper_ft_layout_removes():
    import layout_copies

    stock = layout_copies.copies(MICRO, 1, "cpu", contiguous=False, min_elements=1500 * 64)
    ours = layout_copies.copies(MICRO, 1, "cpu", contiguous=True, min_elements=1500 * 64)
    callers = lambda found: {caller for _, caller in found}  # noqa: E731
    assert "aten::native_layer_norm" in callers(stock) and "aten::native_layer_norm" not in callers(ours)
    assert sum(ours.values()) <= sum(stock.values()) - 30  # 4 encoder layers: 18 norm copies, 16+ attention copies


def test_app_device_times_the_apps_transcriber_on_one_window_and_long_form(tmp_path, capsys):
    import app_device

    assert app_device.main(["--size", MICRO, "--device", "cpu", "--seconds", "1", "31", "--work", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["device"], result["backend"]) == ("cpu", "transformers") and result["load_seconds"] > 0
    assert result["short"]["audio_seconds"] == 1.0 and result["long"]["audio_seconds"] == 31.0
    long = result["long"]
    assert long["seconds"] > 0 and long["rtf"] == pytest.approx(long["seconds"] / 31, abs=0.01)
