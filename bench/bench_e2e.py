"""End-to-end speed of the training command against the HF blog recipe's Trainer, on a
random-weight Whisper of a real shape and a synthetic feature store (no downloads).

    python bench/bench_e2e.py --recipe pipeline --size small --steps 200      # run_training, as the command runs it
    python bench/bench_e2e.py --recipe pipeline --size small --set training.torch_compile=true
    python bench/bench_e2e.py --recipe blog --size small --steps 60            # the blog notebook's Trainer

pipeline: `whisper_ft.train.run_training` (what `python training_pipeline.py` runs) with the
          config.yaml defaults, evaluation and a checkpoint only at the last step, then the
          final evaluation of best/ on every evaluation clip.
blog:     "Fine-Tune Whisper For Multilingual ASR with Transformers": padded float32 features
          in a datasets.Dataset, its DataCollatorSpeechSeq2SeqWithPadding, Seq2SeqTrainer with
          fp16, gradient checkpointing, batch 16, evaluation batch 8, generation_max_length 225.

Prints a JSON line with `"partial": true` as soon as the timed window ends (training figures
only: a part cut short later keeps them), then the whole line at the end: steady-state
training samples/s and MFU (timed from step --skip to the
last step, or to the last --profile-steps, which are profiled instead; GPU synchronised at both
ends, so data loading, logging and the optimizer count but start-up and compilation do not),
the time to step --skip, evaluation clips/s of the Trainer's evaluation (metrics included),
the generation cap and mean label length, wall-clock seconds, and with --profile-steps how
busy the GPU is in the real command, the host's time per step in each part of the Trainer's
loop, and which lines make the host wait for the GPU (`StepProfiler`), and with
--hotspot-steps the functions the host spends most time in, over that many steps before the
profiled ones (`HostHotspots`), and with --same-process-steps the Trainer's step and the bare
loop's, timed in this process on the run's model after the timed window (`SameProcessSteps`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_training import SIZES, build_model, forward_flops, peak_flops  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
SENTENCES_PER_LABEL = 3  # fixture sentences average 10 text tokens


def make_model(out: Path, size: str) -> Path:
    """A random-weight Whisper of `size` with the real multilingual processor, saved to `out`."""
    from transformers import GenerationConfig, WhisperProcessor

    if (out / "config.json").is_file():
        return out
    model = build_model(size, "sdpa", "cpu")
    gen = json.loads((FIXTURES / "whisper-processor" / "generation_config.json").read_text())
    gen.pop("alignment_heads", None)
    model.generation_config = GenerationConfig(**gen)
    model.save_pretrained(out)
    WhisperProcessor.from_pretrained(FIXTURES / "whisper-processor").save_pretrained(out)
    return out


def make_store(data_dir: Path, model_dir: Path, n_train: int, n_eval: int, seed: int = 0) -> str:
    """A feature store of random log-Mel frames (2-8 s clips) with real Swedish labels of about
    30 text tokens (three fixture sentences each; Common Voice sv-SE averages about 28)."""
    from whisper_ft.config import load_config
    from whisper_ft.features import (PROCESSOR_DIR, Shard, build_manifest, label_ids, load_feature_processor,
                                     manifest_header, store_settings, write_shard)

    name = f"synthetic-x{SENTENCES_PER_LABEL}-{n_train}-{n_eval}"
    root = data_dir / "features" / name
    if (root / "manifest.json").is_file():
        return name
    cfg = load_config(ROOT / "config.yaml", [f"model.name_or_path={model_dir}", f"features.data_dir={data_dir}",
                                             f"features.name={name}"])
    processor = load_feature_processor(str(model_dir))
    sentences = (FIXTURES / "sv-sentences.txt").read_text(encoding="utf-8").splitlines()
    rng = np.random.default_rng(seed)
    shards = []
    for split, n in (("train", n_train), ("validation", 0), ("eval", n_eval)):
        examples = []
        for i in range(n):
            frames = int(rng.integers(200, 800))
            first = SENTENCES_PER_LABEL * (i + (0 if split == "train" else n_train))
            sentence = " ".join(sentences[(first + k) % len(sentences)] for k in range(SENTENCES_PER_LABEL))
            examples.append({"id": f"{split}-{i}", "source": "synthetic", "speaker": f"s{i % 20}", "sentence": sentence,
                             "gender": "", "accents": "", "age": "", "duration": frames / 100,
                             "input_features": rng.normal(size=(frames, 80)).astype(np.float16), "fill": -1.0,
                             "labels": label_ids(processor.tokenizer, sentence)})
        shard = Shard(split, 0, 1, ())
        shard.path(root).parent.mkdir(parents=True, exist_ok=True)
        write_shard(shard.path(root), examples, Counter(), n, 80, "float16")
        shards.append(shard)
    processor.save_pretrained(root / PROCESSOR_DIR)
    build_manifest(root, shards, manifest_header(cfg, processor, store_settings(cfg)))
    return name


class StepTimer(TrainerCallback):
    """Wall time from the end of step `skip` to the end of step `stop` (default: the last),
    GPU synchronised at both."""

    def __init__(self, skip: int, stop: int = 0, on_window=None):
        self.skip, self.stop = skip, stop
        self.begin = self.start = self.end = 0.0
        self.on_window = on_window  # called once the window has ended (a part cut short later keeps it)

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = time.perf_counter()
        self.stop = self.stop or state.max_steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (self.skip, self.stop):
            _sync()
            now = time.perf_counter()
            self.start, self.end = (now, self.end) if state.global_step == self.skip else (self.start, now)
            if state.global_step == self.stop and self.on_window is not None:
                self.on_window(self)


class StepProfiler(TrainerCallback):
    """The steps after step `start` up to the last one (the evaluation and save of the last step
    come after them): how busy the GPU is, where the host's time goes in each step, and on a
    GPU the host's waits for it (`SyncCounter`).

    The GPU's kernels are recorded by torch.profiler without the host's operators (recording
    those, some 5,000 a step, and summing them afterwards took longer than the steps). The
    host's time is split by the Trainer's callbacks (`HOST_PARTS`). If the GPU is busy for
    less than about 95% of a step, the host holds it back and those parts say where; if it is
    busy throughout, the host waits on a full launch queue somewhere in them instead."""

    def __init__(self, start: int):
        self.start = start
        self.prof = None
        self.syncs = SyncCounter()
        self.result: dict = {}
        self.t0 = 0.0
        self.host: Counter = Counter()  # seconds in each host part, over the profiled steps
        self._last: tuple[str, float] | None = None  # the last callback in the window and when

    def _lap(self, event: str) -> None:
        if self._last is not None:
            now = time.perf_counter()
            part = HOST_PARTS.get((self._last[0], event))
            if part:
                self.host[part] += now - self._last[1]
            self._last = (event, now)

    def on_step_begin(self, args, state, control, **kwargs):
        self._lap("step_begin")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._lap("pre_optimizer")

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._lap("optimizer")

    def on_step_end(self, args, state, control, **kwargs):
        from torch.profiler import ProfilerActivity, profile

        if state.global_step == self.start:
            _sync()
            if torch.cuda.is_available():
                self.prof = profile(activities=[ProfilerActivity.CUDA])
                self.prof.__enter__()
            self.syncs.__enter__()
            self.t0 = time.perf_counter()
            self._last = ("step_end", self.t0)
        elif state.global_step == state.max_steps and self._last is not None:
            self._lap("step_end")
            self._last = None
            self.syncs.__exit__(None, None, None)
            _sync()
            wall = time.perf_counter() - self.t0
            steps = state.max_steps - self.start
            kernels = None
            if self.prof is not None:
                self.prof.__exit__(None, None, None)
                kernels = kernel_seconds(self.prof.key_averages())
            self.result = {**profile_summary(kernels, dict(self.host), steps, wall), **self.syncs.summary(steps)}
        else:
            self._lap("step_end")


class HostHotspots(TrainerCallback):
    """The host's hot spots over the steps after step `start` up to step `stop` (cProfile,
    which slows the host, so outside the timed and the profiled windows): the functions with
    the most time of their own per step (`hotspots`). Operators and the autograd engine show as
    the C++ calls they are; a call that waits for the GPU or the CUDA driver shows its wait.
    Also over the check after the last step (`evaluation`; the final evaluation, whose speed is
    reported, runs unprofiled)."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop
        self.prof = None
        self.result: list[str] = []
        self.calls_per_step = 0.0  # Python calls, of every function: the same from run to run, unlike times
        self.evaluation: list[str] = []

    def on_step_end(self, args, state, control, **kwargs):
        import cProfile

        if state.global_step == self.stop and self.prof is not None:
            self.prof.disable()
            self.result = hotspots(self.prof, self.stop - self.start)
            self.calls_per_step = calls_per_step(self.prof, self.stop - self.start)
            self.prof = None
        if state.global_step in (self.start, state.max_steps) and self.prof is None:
            self.prof = cProfile.Profile()
            self.prof.enable()

    def on_evaluate(self, args, state, control, **kwargs):
        if self.prof is not None and state.global_step == state.max_steps:
            self.prof.disable()
            self.evaluation = hotspots(self.prof, 1)
            self.prof = None


def calls_per_step(prof, steps: int) -> float:
    """The Python calls (of functions, and of the C functions they call) that `prof` counted, per step."""
    import pstats

    return sum(calls for calls, *_ in pstats.Stats(prof).stats.values()) / steps


def hotspots(prof, steps: int, n: int = 15) -> list[str]:
    """'<ms per step> ms <calls per step>x <function>' for the `n` functions of `prof` (a
    cProfile.Profile) with the most time of their own."""
    import pstats

    rows = sorted(pstats.Stats(prof).stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    name = lambda f, line, fn: fn if f == "~" else f"{Path(f).name}:{line}({fn})"  # noqa: E731
    return [f"{1000 * own / steps:.2f} ms {calls / steps:.0f}x {name(*where)}"
            for where, (_, calls, own, _, _) in rows]


class SameProcessSteps(TrainerCallback):
    """Where the real command loses against the bare loop, by elimination: at the end of step
    `at` (after the timed window), in this process as the run left it (its data-loading
    workers and pinned-memory thread, torch's settings, the model as `load_model` made it),
    `steps` training steps each way, in `rounds` interleaved rounds:

    - `trainer_step_loader_ms`: the Trainer's own step (`training_step`, gradient clipping, its
      optimizer and schedule, `model.zero_grad()`) on batches from a new data loader made as
      the run makes its own (`get_train_dataloader`: workers, pinned memory, copies to the
      device): the Trainer's loop without its callbacks and logging;
    - `trainer_step_ms`: the same step on a few batches collated ahead and pinned, each copied
      to the device as the data loader copies it: without the data loader either;
    - `bare_step_ms`: `bench_training.py`'s bare-loop step on those batches, with the same
      model and optimizer;
    - `bare_step_no_cudnn_autotune_ms` (on a GPU): the same with `cudnn.benchmark` off, as the
      bare-loop part runs it (the run turns it on).

    Against the timed window's ms per step (`loop_ms`), each step down this list leaves one
    thing out: callbacks and logging, the data loader, the Trainer's step, cuDNN's autotuning;
    the bare loop part's own figure leaves out the process and the model as `load_model` made
    them. The extra steps train the model on (random weights: nothing is lost) and move the
    learning-rate schedule on."""

    def __init__(self, at: int, steps: int, rounds: int = 2):
        self.at, self.steps, self.rounds = at, steps, rounds
        self.trainers: list = []  # every WhisperTrainer the run makes (`capture`)
        self.result: dict = {}

    @contextlib.contextmanager
    def capture(self):
        """While entered, the trainers `run_training` makes are kept in `trainers`."""
        import whisper_ft.train as train

        make = train.make_trainer

        def kept(*a, **k):
            self.trainers.append(make(*a, **k))
            return self.trainers[-1]
        train.make_trainer = kept
        try:
            yield self
        finally:
            train.make_trainer = make

    def on_step_end(self, args, state, control, train_dataloader=None, **kwargs):
        if state.global_step == self.at:
            trainer = next(t for t in self.trainers if t.state is state)
            self.result = self.measure(trainer, train_dataloader, args.per_device_train_batch_size)

    def measure(self, trainer, loader, batch_size: int) -> dict:
        from bench_training import pipeline_loss

        from whisper_ft.collator import expand
        from whisper_ft.train import end_loader_workers

        device = trainer.args.device
        cuda = device.type == "cuda"
        rows = [loader.dataset[i] for i in range(min(4 * batch_size, len(loader.dataset)))]
        batches = [loader.collate_fn(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
        if cuda:
            batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
        model, whisper, optimizer = trainer.model_wrapped, trainer.model, trainer.optimizer
        copy = trainer.weights_dtype is not None
        precision = "bf16" if copy or trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32"
        turn = iter(range(1 << 30))

        def on_device() -> dict:
            batch = batches[next(turn) % len(batches)]
            return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

        loaders: list = []
        loader_batches = iter(())

        def from_loader() -> dict:
            nonlocal loader_batches
            batch = next(loader_batches, None)
            if batch is None:  # the first time, and at the end of each pass
                loaders.append(trainer.get_train_dataloader())
                loader_batches = iter(loaders[-1])
                batch = next(loader_batches)
            return batch

        def trainer_step(inputs=on_device) -> None:
            trainer.training_step(model, inputs())
            if trainer.args.max_grad_norm > 0:
                trainer._clip_grad_norm(model)
            optimizer.step()
            trainer.lr_scheduler.step()
            model.zero_grad()

        def bare_step() -> None:  # bench_training.bench_train's, for the pipeline's recipe
            loss = pipeline_loss(whisper, expand(on_device()), device.type, precision, copy)
            loss.backward()
            optimizer.optimizer.step()
            optimizer.optimizer.zero_grad(set_to_none=True)

        ways = {"trainer_step_loader_ms": partial(trainer_step, from_loader), "trainer_step_ms": trainer_step,
                "bare_step_ms": bare_step}
        if cuda:
            ways["bare_step_no_cudnn_autotune_ms"] = bare_step
        times: dict[str, list[float]] = {k: [] for k in ways}
        autotune = torch.backends.cudnn.benchmark
        try:
            for r in range(self.rounds + 1):  # the first round warms each way up
                for name, step in ways.items():
                    torch.backends.cudnn.benchmark = autotune and name != "bare_step_no_cudnn_autotune_ms"
                    _sync()
                    t0 = time.perf_counter()
                    for _ in range(self.steps if r else 1):
                        step()
                    _sync()
                    if r:
                        times[name].append(1000 * (time.perf_counter() - t0) / self.steps)
        finally:
            torch.backends.cudnn.benchmark = autotune
            end_loader_workers(loaders)  # persistent: they would last until the end of training
            trainer.accelerator._dataloaders[:] = [d for d in trainer.accelerator._dataloaders if d not in loaders]
        model.train()
        return {"at_step": self.at, "steps": self.steps * self.rounds,
                **{name: float(np.median(t)) for name, t in times.items()}}


# (callback before, callback after) -> the host's work between them, in the Trainer's loop
HOST_PARTS = {
    ("step_begin", "pre_optimizer"): "forward_backward_ms",  # forward, backward, gradient clipping
    ("pre_optimizer", "optimizer"): "optimizer_ms",
    ("optimizer", "step_end"): "after_optimizer_ms",  # learning-rate schedule, zeroing the gradients
    ("step_end", "step_begin"): "between_steps_ms",  # logging, the next batch from the data loader to the GPU
}


class SyncCounter:
    """Counts the operations that make the host wait for the GPU (a tensor read by `.item()`,
    `bool()`, `nonzero`, a blocking copy to the host) while it is entered, by source line:
    torch.cuda's sync debug mode warns at each. Off the GPU it counts nothing."""

    def __init__(self):
        self.sites: Counter = Counter()
        self._catch = None

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.caught = self._catch.__enter__()
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)
        self.sites.update(f"{Path(w.filename).name}:{w.lineno}" for w in self.caught
                          if "synchroniz" in str(w.message))

    def summary(self, steps: int) -> dict:
        """Waits per step and the five lines that waited most."""
        if not torch.cuda.is_available() and not self.sites:
            return {}
        return {"host_syncs_per_step": sum(self.sites.values()) / steps,
                "host_sync_sites": [f"{site} x{n}" for site, n in self.sites.most_common(5)]}


def kernel_seconds(events) -> float:
    """GPU kernel time in the profiler's averages (a kernel counts once, not again under the
    operator that launched it)."""
    return sum(e.self_device_time_total for e in events if e.self_device_time_total > 0
               and e.self_cpu_time_total == 0) / 1e6


def profile_summary(kernels: float | None, host: dict[str, float], steps: int, wall: float) -> dict:
    """Per step: wall ms, GPU kernel ms and busy share (None without a GPU), and the host's ms
    in each of `HOST_PARTS`, from `host` (seconds over all `steps`)."""
    per_step = lambda seconds: 1000 * seconds / steps  # noqa: E731
    return {"profiled_steps": steps, "wall_ms": per_step(wall),
            "gpu_kernel_ms": per_step(kernels) if kernels else None,
            "gpu_busy": kernels / wall if kernels else None,
            **{part: per_step(host.get(part, 0.0)) for part in HOST_PARTS.values()}}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_stats(timer: StepTimer, steps: int, batch: int, config, label_len: float, precision: str) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    samples_s = (timer.stop - timer.skip) * batch / (timer.end - timer.start)
    peak, peak_src = peak_flops(device, precision, 0.0)
    return {"train_samples_per_s": samples_s, "mfu": 3 * forward_flops(config, label_len) * samples_s / peak,
            "peak": peak_src, "first_steps_s": timer.start - timer.begin, "skip_steps": timer.skip}


# --------------------------------------------------------------------------- the two recipes


def run_pipeline(model_dir: Path, data_dir: Path, store: str, work: Path, args) -> dict:
    from transformers import WhisperConfig

    from whisper_ft import checkpoints
    from whisper_ft.config import load_config
    from whisper_ft.features import load_split
    from whisper_ft.train import resolve_precision, run_training

    sets = [f"model.name_or_path={model_dir}", f"features.data_dir={data_dir}", f"features.name={store}",
            f"training.output_dir={work}", "training.run_name=pipeline", f"training.max_steps={args.steps}",
            f"training.eval_steps={args.steps}", f"training.save_steps={args.steps}", "training.warmup_steps=10",
            "training.eval_before_training=false", "training.export_ctranslate2=false", *args.set]
    cfg = load_config(ROOT / "config.yaml", sets)
    cuda = torch.cuda.is_available()
    precision = resolve_precision(cfg.training.precision, cuda, cuda and torch.cuda.is_bf16_supported())
    labels = load_split(data_dir / "features" / store, "train")["labels"]
    label_len = float(np.mean([len(x) - 1 for x in labels]))
    config = WhisperConfig.from_pretrained(model_dir)

    def stats(timer: StepTimer) -> dict:
        return train_stats(timer, args.steps, cfg.training.batch_size, config, label_len, precision)

    profiled = args.steps - args.profile_steps  # the profiled steps come last, the hot spots' before them
    timer = StepTimer(args.skip, profiled - args.hotspot_steps, lambda t: emit(args, {**stats(t), "partial": True}))
    # after the timer has closed its window at the same step, before the hot spots open theirs
    same = SameProcessSteps(timer.stop, args.same_process_steps) if args.same_process_steps else None
    profiler = StepProfiler(profiled) if args.profile_steps else None
    spots = HostHotspots(profiled - args.hotspot_steps, profiled) if args.hotspot_steps else None
    t0 = time.perf_counter()
    with same.capture() if same else contextlib.nullcontext():
        summary = run_training(cfg, fresh=True, callbacks=[timer, *(c for c in (same, profiler, spots) if c)])
    wall = time.perf_counter() - t0
    final = summary["final"]
    start = next(e for e in checkpoints.read_events(work / "pipeline") if e["event"] == "start")
    return {**stats(timer), "eval_clips": final["eval_clips"], "eval_clips_per_s": final["clips_per_second"],
            "generation_max_length": start["generation_max_length"], "label_tokens": label_len,
            "train_runtime_s": summary["train_runtime_seconds"], "wall_s": wall,
            **({"profile": profiler.result} if profiler else {}),
            **({"same_process": {"loop_ms": 1000 * (timer.end - timer.start) / (timer.stop - timer.skip),
                                 **same.result}} if same and same.result else {}),
            **({"host_hotspots": spots.result, "host_calls_per_step": spots.calls_per_step,
                "eval_hotspots": spots.evaluation} if spots else {}),
            "settings": {k: v for k, v in vars(cfg.training).items() if isinstance(v, (int, float, str, bool))}}


def emit(args, result: dict) -> None:
    """One JSON line of results (gpu.sh keeps the last): after the timed window with
    `"partial": true`, then whole at the end."""
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print()  # the Trainer's progress bar ends its lines with a carriage return only
    print(json.dumps({"recipe": args.label or args.recipe, "size": args.size, "device": where, "steps": args.steps,
                      **result}), flush=True)


@dataclass
class BlogCollator:
    """The blog's DataCollatorSpeechSeq2SeqWithPadding, as published."""

    processor: Any
    decoder_start_token_id: int

    def __call__(self, features):
        input_features = [{"input_features": feature["input_features"]} for feature in features]
        batch = self.processor.feature_extractor.pad(input_features, return_tensors="pt")
        label_features = [{"input_ids": feature["labels"]} for feature in features]
        labels_batch = self.processor.tokenizer.pad(label_features, return_tensors="pt")
        labels = labels_batch["input_ids"].masked_fill(labels_batch.attention_mask.ne(1), -100)
        if (labels[:, 0] == self.decoder_start_token_id).all().cpu().item():
            labels = labels[:, 1:]
        batch["labels"] = labels
        return batch


def run_blog(model_dir: Path, data_dir: Path, store: str, work: Path, args) -> dict:
    import jiwer
    from datasets import Dataset
    from transformers import (Seq2SeqTrainer, Seq2SeqTrainingArguments, WhisperConfig, WhisperForConditionalGeneration,
                              WhisperProcessor)

    from whisper_ft.features import input_features, load_split

    processor = WhisperProcessor.from_pretrained(model_dir, language="swedish", task="transcribe")
    root = data_dir / "features" / store

    def padded(split: str, limit: int) -> Dataset:  # what the blog's prepare_dataset stores: padded float32 features
        ds = load_split(root, split).with_format("numpy")
        rows = [ds[i] for i in range(min(limit, len(ds)))]
        return Dataset.from_dict({"input_features": [input_features(r) for r in rows],
                                  "labels": [r["labels"].tolist() for r in rows]})

    train, evaluation = padded("train", 256), padded("eval", args.blog_eval_clips)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir)
    model.generation_config.language = "swedish"
    model.generation_config.task = "transcribe"
    model.generation_config.forced_decoder_ids = None

    def compute_metrics(pred):
        pred_ids, label_ids = pred.predictions, pred.label_ids
        label_ids[label_ids == -100] = processor.tokenizer.pad_token_id
        pred_str = processor.batch_decode(pred_ids, skip_special_tokens=True)
        label_str = processor.batch_decode(label_ids, skip_special_tokens=True)
        return {"wer": 100 * jiwer.wer(label_str, [p or "-" for p in pred_str])}

    training_args = Seq2SeqTrainingArguments(
        output_dir=str(work / "blog"), per_device_train_batch_size=16, gradient_accumulation_steps=1,
        learning_rate=1e-5, warmup_steps=10, max_steps=args.steps, gradient_checkpointing=True,
        fp16=torch.cuda.is_available(), eval_strategy="steps", per_device_eval_batch_size=8,
        predict_with_generate=True, generation_max_length=225, save_steps=args.steps, eval_steps=args.steps,
        logging_steps=25, report_to=["tensorboard"], load_best_model_at_end=True, metric_for_best_model="wer",
        greater_is_better=False, push_to_hub=False)
    labels = [len(x) - 1 for x in train["labels"]]
    config = WhisperConfig.from_pretrained(model_dir)
    precision = "fp16" if torch.cuda.is_available() else "fp32"
    timer = StepTimer(args.skip, 0, lambda t: emit(args, {**train_stats(t, args.steps, 16, config, float(np.mean(labels)),
                                                                        precision), "partial": True}))
    trainer = Seq2SeqTrainer(args=training_args, model=model, train_dataset=train, eval_dataset=evaluation,
                             data_collator=BlogCollator(processor, model.config.decoder_start_token_id),
                             compute_metrics=compute_metrics, processing_class=processor.feature_extractor,
                             callbacks=[timer])
    t0 = time.perf_counter()
    result = trainer.train()  # evaluates and saves at the last step
    wall = time.perf_counter() - t0
    metrics = next(m for m in reversed(trainer.state.log_history) if "eval_samples_per_second" in m)
    out = train_stats(timer, args.steps, 16, config, float(np.mean(labels)), precision)
    return {**out, "eval_clips": len(evaluation), "eval_clips_per_s": metrics["eval_samples_per_second"],
            "generation_max_length": training_args.generation_max_length, "label_tokens": float(np.mean(labels)),
            "train_runtime_s": result.metrics["train_runtime"], "wall_s": wall}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", choices=("pipeline", "blog"), required=True)
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--steps", type=int, default=100, help="training steps (the last one evaluates and saves)")
    p.add_argument("--skip", type=int, default=10, help="steps before the timed window (start-up, compilation)")
    p.add_argument("--train-clips", type=int, default=512)
    p.add_argument("--eval-clips", type=int, default=256, help="evaluation clips in the store (the pipeline uses all)")
    p.add_argument("--blog-eval-clips", type=int, default=32, help="evaluation clips for the blog (generate is slow)")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "e2e", help="model, store and runs")
    p.add_argument("--set", action="append", default=[], help="extra config override for the pipeline")
    p.add_argument("--label", default="", help="name of this run in the output")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="pipeline: profile the last N steps (outside the timed window): GPU busy share, host time "
                        "per part of the Trainer's loop, waits for the GPU")
    p.add_argument("--same-process-steps", type=int, default=0,
                   help="pipeline: after the timed window, N steps (in each of 2 rounds) of the Trainer's step alone "
                        "and of the bare loop's, in the same process on the same model (SameProcessSteps)")
    p.add_argument("--hotspot-steps", type=int, default=0,
                   help="pipeline: the host's hot spots (cProfile) over N steps before the profiled ones, outside the "
                        "timed window")
    args = p.parse_args(argv)
    if args.same_process_steps and args.steps - args.profile_steps - args.hotspot_steps <= args.skip:
        p.error("--same-process-steps runs after the timed window: --steps must exceed --skip plus the profiled and "
                "hot-spot steps")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = make_model(args.work / f"model-{args.size}", args.size)
    data_dir = args.work / "data"
    store = make_store(data_dir, model_dir, args.train_clips, args.eval_clips)
    run = run_pipeline if args.recipe == "pipeline" else run_blog
    emit(args, run(model_dir, data_dir, store, args.work / "runs", args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
