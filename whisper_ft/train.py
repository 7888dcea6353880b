"""Fine-tuning Whisper on the feature store with the HF `Seq2SeqTrainer`.

    summary = run_training(load_config("config.yaml"))      # resumes from the last checkpoint
    summary = run_training(cfg, fresh=True, callbacks=[MyPruningCallback()])

The Trainer brings mixed precision, gradient accumulation, DDP under `torchrun`, resumption
and checkpoint rotation; this module adds what it lacks for Whisper: compact batches padded
on the GPU, compiled layers, fast greedy evaluation (`whisper_ft.decoding`), language/task
forcing, WER metrics, an atomic `best/` export, the event log, and the end-of-run reports.
Run folder layout: `whisper_ft.checkpoints`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from transformers import Seq2SeqTrainer, TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME

from whisper_ft import averaging, breakdown, checkpoints, report, served, stopping
from whisper_ft.collator import IGNORE_INDEX, SpeechCollator, expand
from whisper_ft.config import (MAX_TARGET_POSITIONS, Config, ConfigError, check_folder, check_writable, lookup,
                               read_mapping, save_config, to_dict)
from whisper_ft.errors import UserError, first_line, out_of_space
from whisper_ft.features import (EVAL, ROLE, TRAIN, VALIDATION, FeatureStore, FeaturesError, find_overlap,
                                 stored_rows)
from whisper_ft.files import replace_dir, share_like_new_files, staging_dir, write_atomic
from whisper_ft.metrics import scores
from whisper_ft.model import load_model, resolve
from whisper_ft.precision import forward, seq2seq_loss, with_causal_mask
from whisper_ft.saving import (BackgroundSaver, available_memory, broadcast, disk_full_as_user_error, fits_in_memory,
                               nbytes, to_host)

log = logging.getLogger("whisper_ft.train")

MODEL_COLUMNS = ["input_features", "fill", "labels"]  # what the collator reads
# The seed of the training.eval_subset draw, fixed rather than training.seed: runs and sweep
# trials that differ in their seed are still checked on the same clips.
EVAL_SUBSET_SEED = 0


class TrainingError(UserError, ValueError):
    """A training setup that cannot work (a precision the device lacks, an unknown language)."""


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.training.output_dir) / cfg.training.run_name


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a single process (valid before the Trainer starts)."""
    return os.environ.get("RANK", "0") == "0"


def world_size() -> int:
    """Processes of this run (torchrun and accelerate set WORLD_SIZE; 1 without them)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# --------------------------------------------------------------------------- data


def longest_first(split):
    """`split` sorted by duration, longest first: clips of a batch then generate similar lengths,
    and memory peaks at once."""
    with warnings.catch_warnings():  # datasets' call into pyarrow, nothing a user can change
        warnings.filterwarnings("ignore", "Specifying null_placement", FutureWarning)
        return split.sort("duration", reverse=True)


@dataclass(frozen=True)
class Data:
    """The splits of a feature store, by role: training, selection (the periodic checks,
    `best/`, early stopping and sweep objectives: the validation split, or the test split in
    stores without one) and test (scored before training and on `best/` at the end).
    `*_model` views hold only the collator's columns."""

    manifest: dict
    processor: object
    train: object
    test: object  # all test clips, longest first
    selection_split: str  # "validation" or "test"
    selection_model: object  # the training.eval_subset clips of the selection split, longest first
    train_model: object
    test_model: object
    # training rows sharing a clip or a sentence with validation or test rows, and validation
    # rows sharing one with test rows (features.on_overlap: keep; across stores, sentences)
    overlapping_training_rows: int = 0
    overlapping_validation_rows: int = 0


def load_data(cfg: Config, subset_seed: int = EVAL_SUBSET_SEED) -> Data:
    """Read and check the feature store of `cfg`; FeaturesError says which command to run.
    With `training.eval_features`, validation and test come from that store; `subset_seed`
    draws the `training.eval_subset` clips (`eval_subset_seed`)."""
    store = FeatureStore.of(cfg)
    manifest = store.manifest()
    processor = store.processor(cfg.model.language, cfg.model.task)
    held_out = FeatureStore.held_out_of(cfg)
    held_manifest = held_out.manifest()
    check_same_encoding(manifest, held_manifest)
    train, test = store.load("train"), held_out.load(EVAL)
    if len(train) == 0 or len(test) == 0:
        raise FeaturesError(f"{store.root} has {len(train)} training and {len(test)} test clips; both are "
                            "needed: check features.sources (train_splits, eval_splits) and rerun python feature_pipeline.py")
    if held_out.root != store.root:  # stage 1 checked the splits of one store, not these
        overlapping = check_disjoint_stores(store, held_out, train, cfg.features.on_overlap)
    else:
        overlapping = manifest.get("overlap", {}).get("kept_overlapping_training_rows", 0)
    test = longest_first(test)
    if held_out.has(VALIDATION):
        split, selection = ROLE[VALIDATION], longest_first(held_out.load(VALIDATION))
    else:
        log.warning("%s has no validation split: checkpoints are picked on the test split, so its final WER is "
                    "optimistic (rebuild the features to get one)", held_out.root)
        split, selection = ROLE[EVAL], test
    n = cfg.training.eval_subset
    if 0 < n < len(selection):
        picked = np.random.default_rng(subset_seed).choice(len(selection), n, replace=False)
        selection = selection.select(sorted(picked.tolist()))
    return Data(manifest, processor, train, test, split, _model_view(selection), _model_view(train), _model_view(test),
                overlapping, held_manifest.get("overlap", {}).get("kept_overlapping_validation_rows", 0))


def check_same_encoding(train_manifest: dict, eval_manifest: dict) -> None:
    """Training and evaluation stores must share feature extractor and tokenizer settings."""
    for key in ("feature_extractor", "tokenizer"):
        if train_manifest[key] != eval_manifest[key]:
            raise FeaturesError(f"features {train_manifest['name']} and {eval_manifest['name']} (training.eval_features) "
                                f"differ in {key.replace('_', ' ')}: build both with the same model.name_or_path")


def check_disjoint_stores(store: FeatureStore, held_out: FeatureStore, train, policy: str) -> int:
    """Training clips of `store` (`train`) that are validation or test clips of the
    training.eval_features store `held_out`: a FeaturesError (features.on_overlap=keep: a
    warning; `drop` refuses too, as rows cannot be dropped from built stores). Clips that share
    only a sentence are a warning: stage 1 drops such training rows, across stores only a rebuild
    can. Returns how many training rows share a clip or a sentence with `held_out`'s."""
    rows = stored_rows(train, TRAIN)
    found = [find_overlap(rows, stored_rows(held_out.load(split), split), split)
             for split in (VALIDATION, EVAL) if held_out.has(split)]
    clips, sentences = _counts(found, "clips"), _counts(found, "sentences")
    where = f"the training clips of features {store.name} include {clips} clips of {held_out.name} (training.eval_features)"
    if clips and policy != "keep":
        raise FeaturesError(f"{where}, so their scores would not be held-out scores: build the two stores from "
                            "disjoint sources or splits, or use another training.eval_features "
                            "(features.on_overlap=keep trains anyway)")
    if clips:
        log.warning("%s (features.on_overlap=keep): the validation and test scores are not held-out scores", where)
    elif sentences:
        log.warning("%s clips of %s (training.eval_features) share a sentence with training clips of %s: stage 1 "
                    "drops such training rows within a store, across stores only rebuilding %s without them can; "
                    "the validation and test scores may be optimistic", sentences, held_out.name, store.name, store.name)
    return len(frozenset().union(*(o.involved for o in found)))


def _counts(found, attr: str) -> str:
    """'6 validation and 10 test' for the Overlap counts `attr` that are not zero."""
    return " and ".join(f"{getattr(o, attr):,} {ROLE[o.split]}" for o in found if getattr(o, attr))


def _model_view(ds):
    return ds.with_format("numpy", columns=MODEL_COLUMNS)


def generation_max_length(cfg: Config, longest_label: int) -> int:
    """Token cap for generation: the configured one, or the longest label + 10% (`longest_label`:
    of the training and selection splits, never of the test split's references where the store
    has a validation split, so that the test WER owes nothing to them).

    A model that loops (common early in fine-tuning) would otherwise generate 448 tokens for
    every clip and stretch an evaluation from minutes into hours.
    """
    if cfg.training.generation_max_length > 0:
        return min(cfg.training.generation_max_length, MAX_TARGET_POSITIONS)
    return min(MAX_TARGET_POSITIONS, math.ceil((longest_label or MAX_TARGET_POSITIONS) * 1.1) + 1)


def longest_label(*splits) -> int:
    """Tokens in the longest label of these datasets (read as Arrow, not as Python lists)."""
    import pyarrow.compute as pc

    return max((pc.max(pc.list_value_length(ds.with_format("arrow")["labels"])).as_py() or 0 for ds in splits
                if len(ds)), default=0)


# --------------------------------------------------------------------------- model


def prepare_model(cfg: Config, tokenizer):
    """Load the model with dropout/SpecAugment set, check it fits the features, then apply
    the freezing/LoRA switches. Language and task are forced in its generation config."""
    from transformers import WhisperConfig

    t = cfg.training
    sa = t.spec_augment
    # Dropout and SpecAugment are read when the layers are built, so they go into the config
    # the model is built from rather than onto the loaded model.
    config = WhisperConfig.from_pretrained(resolve(cfg.model.name_or_path), dropout=t.dropout,
                                           apply_spec_augment=sa.enabled, mask_time_prob=sa.mask_time_prob,
                                           mask_time_length=sa.mask_time_length, mask_feature_prob=sa.mask_feature_prob,
                                           mask_feature_length=sa.mask_feature_length)
    FeatureStore.of(cfg).check_model(config, tokenizer)  # before minutes of loading weights
    check_spec_augment(sa, config)
    model = load_model(cfg.model.name_or_path, cfg.model.language, cfg.model.task, config=config,
                       attn_implementation="sdpa")
    if t.freeze_encoder:
        model.freeze_encoder()
    if t.lora.enabled:
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        set_seed(t.seed)  # the adapters' random start: the Trainer seeds only after the model is built
        try:
            # with the encoder frozen, adapters go on the decoder's layers only
            model = get_peft_model(model, LoraConfig(r=t.lora.rank, lora_alpha=t.lora.alpha,
                                                     lora_dropout=t.lora.dropout,
                                                     target_modules=list(t.lora.target_modules), bias="none",
                                                     exclude_modules=r".*\.encoder\..*" if t.freeze_encoder else None))
        except ValueError as e:  # peft's NoMatchingPeftModuleError among them
            raise TrainingError(f"training.lora.target_modules {list(t.lora.target_modules)}: {first_line(e)} "
                                "(Whisper's attention projections are q_proj, k_proj, v_proj, out_proj; its "
                                "feed-forward layers fc1, fc2)") from e
    if t.torch_compile:
        compile_layers(model)
    return model


def check_spec_augment(sa, config) -> None:
    """SpecAugment's mask lengths fit the model's input (transformers fails at the first training
    step otherwise, after the zero-shot scoring): under its frames and its mel bins."""
    if not sa.enabled:
        return
    for key, prob, length, limit, what in (
            ("mask_time_length", sa.mask_time_prob, sa.mask_time_length, 2 * config.max_source_positions, "frames"),
            ("mask_feature_length", sa.mask_feature_prob, sa.mask_feature_length, config.num_mel_bins, "mel bins")):
        if prob > 0 and length >= limit:
            raise TrainingError(f"training.spec_augment.{key}: must be under the model's {limit} {what}, got {length}")


def compile_layers(model, dynamic_decoder: bool = True) -> int:
    """`torch.compile` each encoder and decoder layer in place ("regional" compilation).

    All layers of a stack share one compiled graph, so start-up costs two compilations
    instead of one of the whole model, and parameter names (checkpoints) stay the same.
    Decoder layers are compiled for any length from the start: the label length changes from
    batch to batch, and torch.compile would otherwise compile them for the first length, then
    once more for any (`dynamic_decoder=False`, for comparison). Returns the number of layers
    compiled.
    """
    from transformers.models.whisper.modeling_whisper import WhisperDecoderLayer, WhisperEncoderLayer

    layers = [m for m in model.modules() if isinstance(m, (WhisperEncoderLayer, WhisperDecoderLayer))]
    for layer in layers:
        layer.compile(dynamic=True if dynamic_decoder and isinstance(layer, WhisperDecoderLayer) else None)
    return len(layers)


# --------------------------------------------------------------------------- trainer

# Whisper's peak pre-training learning rate by model width (d_model): Radford et al. 2022,
# "Robust Speech Recognition via Large-Scale Weak Supervision", appendix F. Fine-tuning at a
# fortieth of it is the rule of thumb behind `learning_rate: auto` (docs/improving.md).
PRETRAINING_LEARNING_RATE = {384: 1.5e-3, 512: 1.0e-3, 768: 5.0e-4, 1024: 2.5e-4, 1280: 1.75e-4}
FINE_TUNING_DIVISOR = 40


def auto_learning_rate(d_model: int) -> float:
    """The fine-tuning rate for a Whisper of this width (the nearest listed size)."""
    width = min(PRETRAINING_LEARNING_RATE, key=lambda w: abs(w - d_model))
    return PRETRAINING_LEARNING_RATE[width] / FINE_TUNING_DIVISOR


def schedule(t, d_model: int) -> tuple[float, int]:
    """(peak learning rate, warm-up steps) of a run: `auto` resolved by model width, warm-up
    from `warmup_fraction` of the run unless `warmup_steps` is set."""
    lr = auto_learning_rate(d_model) if t.learning_rate == "auto" else float(t.learning_rate)
    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_fraction * t.max_steps)
    return lr, warmup


def resolve_precision(precision: str, cuda: bool, bf16_ok: bool) -> str:
    """auto -> bf16 where the GPU supports it, fp16 on other GPUs, fp32 on CPU."""
    if precision == "auto":
        return ("bf16" if bf16_ok else "fp16") if cuda else "fp32"
    if precision == "fp16" and not cuda:
        raise TrainingError("training.precision: fp16 needs a GPU; use fp32 or bf16 on CPU")
    if precision == "bf16" and cuda and not bf16_ok:
        raise TrainingError("training.precision: this GPU has no bf16; use fp16 or auto")
    return precision


def precision_of(cfg: Config) -> str:
    """`training.precision` resolved for the device torch sees."""
    import torch

    cuda = torch.cuda.is_available()
    return resolve_precision(cfg.training.precision, cuda, cuda and torch.cuda.is_bf16_supported())


def uses_weight_copy(precision: str, t) -> bool:
    """Whether a run in the resolved `precision` computes on a bf16 weight copy
    (`whisper_ft.precision`) rather than with the Trainer's own precision handling: autocast
    for fp16 (its loss scaling lives in the Trainer), with gradient checkpointing (the
    recomputation in the backward pass runs outside the copy) or when `training.autocast`
    asks for it; nothing for fp32."""
    return precision == "bf16" and not t.autocast and not t.gradient_checkpointing


def weights_dtype(cfg: Config):
    """The dtype of the weight copy the model runs on, or None (`uses_weight_copy`)."""
    import torch

    return torch.bfloat16 if uses_weight_copy(precision_of(cfg), cfg.training) else None


def mixed_precision(cfg: Config) -> str:
    """How a run computes, in words (the start event, the log, the model card)."""
    precision = precision_of(cfg)
    if precision == "fp32":
        return "fp32"
    return f"{precision} weight copy" if weights_dtype(cfg) is not None else f"{precision} autocast"


def training_arguments(cfg: Config, run_dir: Path, max_gen_length: int, eval_on_start: bool, d_model: int,
                       warmup_steps: int | None = None):
    """Seq2SeqTrainingArguments for the config on the device torch sees (`d_model`: the
    model's width, for `learning_rate: auto`; `warmup_steps`: a resumed run's own, instead of
    the config's). With a bf16 weight copy the Trainer's own mixed precision is off:
    `WhisperTrainer` runs the model in bf16 itself."""
    import torch
    from transformers import Seq2SeqTrainingArguments

    t = cfg.training
    cuda = torch.cuda.is_available()
    precision = "fp32" if weights_dtype(cfg) is not None else precision_of(cfg)
    learning_rate, warmup = schedule(t, d_model)
    warmup_steps = warmup if warmup_steps is None else warmup_steps
    if cuda:
        torch.backends.cudnn.benchmark = True  # the encoder's convolutions always see 3000 frames
    return Seq2SeqTrainingArguments(
        output_dir=str(run_dir), run_name=t.run_name, seed=t.seed,
        max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=learning_rate, lr_scheduler_type=t.lr_scheduler, warmup_steps=warmup_steps,
        weight_decay=t.weight_decay, optim="adamw_torch_fused" if cuda else "adamw_torch",
        bf16=precision == "bf16", fp16=precision == "fp16",
        tf32=True if cuda and torch.cuda.get_device_capability()[0] >= 8 else None,
        activation_checkpointing=t.gradient_checkpointing,
        eval_strategy="steps", eval_steps=t.eval_steps, eval_on_start=eval_on_start,
        per_device_eval_batch_size=t.eval_batch_size, predict_with_generate=True,
        generation_max_length=max_gen_length, generation_num_beams=t.num_beams,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        metric_for_best_model=t.select_metric, greater_is_better=False,  # rotation keeps the best checkpoint too
        logging_strategy="steps", logging_steps=t.logging_steps, report_to=["tensorboard"],
        dataloader_num_workers=t.dataloader_workers, dataloader_pin_memory=cuda,
        dataloader_persistent_workers=t.dataloader_workers > 0,
        accelerator_config={"non_blocking": cuda},  # copy pinned batches without waiting for the GPU
        # The NaN/Inf filter reads the loss on the host every step, which stalls the GPU queue;
        # a NaN now shows in the logged loss instead of being averaged away.
        logging_nan_inf_filter=False,
        remove_unused_columns=False, label_names=["labels"],
        ddp_find_unused_parameters=False,
        # Per-process mean loss, averaged by DDP: the token-weighted variant logs the loss times
        # the number of processes in transformers 5.23.
        average_tokens_across_devices=False,
        # Without a GPU, say so: only then does accelerate start multi-process CPU training under torchrun.
        use_cpu=not cuda,
    )


def decode(tokenizer, ids: np.ndarray) -> list[str]:
    """Token ids (padded with -100 by the Trainer) -> text without special tokens."""
    ids = np.where(np.asarray(ids) == IGNORE_INDEX, tokenizer.pad_token_id, ids)
    return [s.strip() for s in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def compute_metrics(tokenizer, pred) -> dict:
    """Trainer hook: WER, normalized WER, CER and clip count of one evaluation."""
    return scores(decode(tokenizer, pred.label_ids), decode(tokenizer, pred.predictions))


class WhisperTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer for the compact feature batches, with fast greedy evaluation.

    - Batches arrive compact (`whisper_ft.collator`) and are padded on the device.
    - With `weights_dtype` (bf16), training and evaluation run on a copy of the weights in that
      dtype (`whisper_ft.precision`) instead of under autocast.
    - With `background_saves`, checkpoints are written on a thread while training goes on
      (`whisper_ft.saving`), by rank 0 under torchrun; for LoRA models saves stay synchronous.
    - With `fast_generation`, greedy evaluation runs the encoder once per batch for both the
      loss and `whisper_ft.decoding.GreedyDecoder`; beam search and LoRA models use `generate`.
    - SIGTERM saves the step it arrives in and stops (`whisper_ft.stopping`); data-loading
      workers ignore it.
    - Evaluation under torchrun keeps each clip once: the last batch of each process is padded
      with repeated clips, which Seq2SeqTrainer gathers with `gather` (not
      `gather_for_metrics`) and would count twice in WER and in predictions.jsonl. The loss
      is taken over each clip's label tokens once too (`evaluation_loop`).
    """

    def __init__(self, *args, fast_generation: bool = False, weights_dtype=None, background_saves: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.weights_dtype = weights_dtype
        self.background_saves = background_saves
        self.saver = BackgroundSaver()
        self._host: tuple = (None, None)  # host copies of weights and optimizer state of the last save
        self._room: bool | None = None  # room in host memory for them (decided at the first save)
        # Whisper's loss is already the mean over a batch's label tokens (it ignores
        # num_items_in_batch); counting them would also copy a scalar to the GPU every step, a
        # host synchronisation, and skip dividing the loss by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.fast_generation = fast_generation
        self._decoder = None
        self._clip_losses: list = []  # each evaluated clip's (summed token loss, tokens), gathered

    @property
    def gather_function(self):
        return self.accelerator.gather_for_metrics

    @gather_function.setter
    def gather_function(self, _fn) -> None:
        pass  # keep gather_for_metrics

    def _get_dataloader(self, *args, **kwargs):
        loader = super()._get_dataloader(*args, **kwargs)
        base = getattr(loader, "base_dataloader", loader)  # accelerate's wrapper iterates the DataLoader it holds
        if base.num_workers:  # a SIGTERM to every process of the job is the main process's to handle
            base.worker_init_fn = stopping.in_workers(base.worker_init_fn)
        return loader

    def _prepare_inputs(self, inputs):
        return expand(super()._prepare_inputs(inputs))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.weights_dtype is None:
            return super().compute_loss(model, with_causal_mask(inputs), return_outputs, num_items_in_batch)
        config = self.accelerator.unwrap_model(model).config
        loss, outputs = seq2seq_loss(model, inputs, self.weights_dtype, config.decoder_start_token_id,
                                     config.pad_token_id)
        return (loss, outputs) if return_outputs else loss

    def _autocast(self):
        """Autocast for the paths that run the model as it is (`generate`): in the weight
        copy's dtype when there is one, else the Trainer's own."""
        import torch

        if self.weights_dtype is None:
            return self.accelerator.autocast()
        return torch.autocast(self.args.device.type, dtype=self.weights_dtype)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """The checkpoint's optimizer and schedule, with each group's learning rate taken from
        the schedule as this run defines it: the optimizer's saved rate is the old schedule's,
        which for a run resumed with more `max_steps` would train the first step at the rate of
        the old end (0 after a linear decay) before the schedule takes over."""
        super()._load_optimizer_and_scheduler(checkpoint)
        from torch.optim.lr_scheduler import LambdaLR

        sched = self.lr_scheduler
        if checkpoint is None or not isinstance(sched, LambdaLR):
            return
        for group, base, factor in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * factor(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _init_training_state(self, max_steps, *args, **kwargs):
        """The Trainer's state, with the check, save and logging cadence of this run's arguments:
        a resumed state carries the checkpoint's, which transformers reads over the arguments'."""
        resumed = super()._init_training_state(max_steps, *args, **kwargs)
        self.state.compute_steps(self.args, max_steps)
        return resumed

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.saver.wait()  # the last checkpoint is on disk when training returns

    def _finalize_training(self, *args, **kwargs):
        self.saver.wait()  # the last checkpoint is on disk before the Trainer's cleanup looks at the folder
        return super()._finalize_training(*args, **kwargs)

    def _evaluate(self, trial, ignore_keys_for_eval, skip_scheduler: bool = False):
        """As the Trainer's; its `eval_on_start` in a resumed run is the check owed at the step
        it resumes from (`owed_check`), which counts as that step's: it steps a plateau schedule
        and may make its checkpoint the best one that rotation keeps."""
        owed = skip_scheduler and self.state.global_step > 0
        metrics = super()._evaluate(trial, ignore_keys_for_eval, skip_scheduler=skip_scheduler and not owed)
        if owed:
            self._determine_best_metric(metrics=metrics, trial=trial)
        return metrics

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, *args, **kwargs):
        """As the Trainer's, but a run stopped by a signal at a check step saves before it checks:
        the check (a whole validation pass) may outlast the grace period a SIGTERM gives, and
        the steps are on disk by then."""
        stopping_here = any(isinstance(cb, stopping.StopOnSignal) and cb.stopped_at == self.state.global_step
                            for cb in self.callback_handler.callbacks)
        if stopping_here and self.control.should_save and self.control.should_evaluate:
            self._save_checkpoint(model, trial)
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)  # should_save now off
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, *args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        """The HF checkpoint of this step, in the background where it can be; a `checkpoint`
        event in metrics.jsonl says how and for how long training was held. Either way its
        weights get the permissions of its other files (safetensors writes them 0600), and a
        write that fails on a full disk is a DiskFullError, here or at the next save."""
        start = time.perf_counter()
        background = self._saves_in_background()
        # about the weights and AdamW's two moments (a state_dict() may be collective under FSDP)
        with disk_full_as_user_error(self.args.output_dir, 3 * nbytes(list(self.model.parameters()))):
            if background:
                self._save_checkpoint_in_background(trial)
            else:
                super()._save_checkpoint(model, trial)
                folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
                if self.args.should_save and folder.is_dir():
                    share_like_new_files(folder)
        if self.args.should_save:
            checkpoints.append_event(self.args.output_dir, {
                "event": "checkpoint", "step": self.state.global_step, "background": background,
                "held_s": round(time.perf_counter() - start, 3)})

    def _save_checkpoint_in_background(self, trial) -> None:
        """The HF checkpoint of this step, its weights and optimizer state written on a thread.

        Under torchrun (DDP) rank 0 writes, as in the Trainer; every rank writes its own RNG
        state into the staging folder first, and the ranks wait for each other around that, so
        the folder is complete before rank 0 renames it."""
        import torch

        main, distributed = self.args.should_save, self.args.world_size > 1
        if main:
            self.saver.wait()  # the previous checkpoint is on disk before this one starts
        self.store_flos()
        run_dir = Path(self._get_output_dir(trial=trial))
        final = run_dir / f"checkpoint-{self.state.global_step}"
        name = staging_dir(final).name  # under torchrun rank 0's, for every rank
        tmp = final.with_name(broadcast(name) if distributed else name)
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if distributed:
            torch.distributed.barrier()  # the folder exists, the previous checkpoint is complete
        if self.state.best_global_step:  # as the Trainer does: protects the best checkpoint from rotation
            best = run_dir / f"checkpoint-{self.state.best_global_step}"
            if best == final or best.exists():
                self.state.best_model_checkpoint = str(best)
        # The small files now, the large ones from host copies of this step's state later.
        self._save_small_checkpoint_files(tmp)
        if distributed:
            torch.distributed.barrier()  # every rank's RNG state is in the folder
        if not main:
            return
        # The previous save's host copies (written by now) are reused as buffers.
        self._host = weights, optimizer = (to_host(self.model.state_dict(), self._host[0]),
                                           to_host(self.optimizer.state_dict(), self._host[1]))
        self.saver.submit(partial(self._write_checkpoint, tmp, final, weights, optimizer, self.state.best_model_checkpoint))

    def _saves_in_background(self) -> bool:
        """Whether this save goes to the writer thread: `background_saves`, a full model (not
        LoRA), DDP or a single process, and room in host memory for the copy (decided by rank
        0 at the first save, for every rank)."""
        from transformers import PreTrainedModel

        if not (self.background_saves and isinstance(self.model, PreTrainedModel)
                and not (self.is_fsdp_enabled or self.is_deepspeed_enabled)):
            return False
        if self._room is None:  # the first save
            room = self._room_for_host_copies() if self.args.should_save else True
            self._room = broadcast(room) if self.args.world_size > 1 else room
        return self._room

    def _room_for_host_copies(self) -> bool:
        size = nbytes(self.model.state_dict()) + nbytes(self.optimizer.state_dict())
        if fits_in_memory(size):
            return True
        log.warning("checkpoints are saved synchronously: a host copy of the training state (%.1f GB) would take "
                    "more than half of the free memory (%.1f GB)", size / 1e9, (available_memory() or 0) / 1e9)
        return False

    def _save_small_checkpoint_files(self, folder: Path) -> None:
        """This rank's RNG state; on rank 0 also the scheduler, the scaler and the trainer state."""
        import torch
        from transformers.trainer import SCHEDULER_NAME
        from transformers.trainer_callback import ExportableState

        self._save_rng_state(str(folder))
        if not self.args.should_save:
            return
        torch.save(self.lr_scheduler.state_dict(), folder / SCHEDULER_NAME)
        self._save_scaler(str(folder))
        for cb in [cb for cb in [*self.callback_handler.callbacks, self.control] if isinstance(cb, ExportableState)]:
            name, state = cb.__class__.__name__, cb.state()
            if isinstance(self.state.stateful_callbacks[name], list):
                self.state.stateful_callbacks[name].append(state)
            else:
                self.state.stateful_callbacks[name] = state
        self.state.save_to_json(str(folder / TRAINER_STATE_NAME))

    def _write_checkpoint(self, tmp: Path, final: Path, weights: dict, optimizer: dict, best: str | None) -> None:
        import torch
        from transformers.trainer import OPTIMIZER_NAME
        from transformers.trainer_utils import rotate_checkpoints

        with disk_full_as_user_error(final.parent, nbytes(weights) + nbytes(optimizer)):
            self._save(str(tmp), state_dict=weights)
            torch.save(optimizer, tmp / OPTIMIZER_NAME)
        share_like_new_files(tmp)
        replace_dir(tmp, final)
        rotate_checkpoints(output_dir=str(final.parent), save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=best, use_mtime=True)

    def evaluation_loop(self, *args, **kwargs):
        """The Trainer's loop, with the loss taken over the label tokens of every clip once
        (`_count_loss`): the Trainer's own is a mean of batch means, and under torchrun those of
        the last batches include the clips repeated to pad them."""
        import torch

        self._decoder = None  # built from the weights as they are at this evaluation
        self._clip_losses = []
        try:
            output = super().evaluation_loop(*args, **kwargs)
        finally:
            self._decoder = None  # its caches and CUDA graph go back to training
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        if self._clip_losses and f"{prefix}_loss" in output.metrics:
            total, tokens = torch.cat(self._clip_losses).double().sum(0).tolist()
            output.metrics[f"{prefix}_loss"] = total / max(tokens, 1)
        self._clip_losses = []
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        import torch
        from transformers import WhisperForConditionalGeneration

        whisper = self.accelerator.unwrap_model(model)
        generate = self.args.predict_with_generate and not prediction_loss_only
        fast = (generate and self.fast_generation and type(whisper) is WhisperForConditionalGeneration
                and (self.args.generation_num_beams or 1) == 1)
        inputs = self._prepare_inputs(inputs)
        dtype = self.weights_dtype
        with torch.no_grad(), self._autocast() if dtype is None else contextlib.nullcontext():
            if fast:  # the encoder once, for the loss and the transcripts
                encoded = encode(whisper, inputs["input_features"], dtype)
                loss, outputs = self.compute_loss(model, {"encoder_outputs": (encoded,), "labels": inputs["labels"]},
                                                  return_outputs=True)
                tokens = self._greedy_decoder(whisper).generate(encoded)
            else:
                loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        self._count_loss(outputs.logits, inputs["labels"])
        if not generate:
            return loss.detach(), None if prediction_loss_only else outputs.logits, inputs["labels"]
        if not fast:  # beam search, LoRA: the model's own generate, suppressing what the fast decoder does
            from whisper_ft.decoding import suppressed_tokens

            gen_kwargs = {**(gen_kwargs or getattr(self, "_gen_kwargs", {})),  # empty: the Trainer's own
                          "suppress_tokens": suppressed_tokens(whisper, self.processing_class.tokenizer.prefix_tokens)}
            with self._autocast():
                _, tokens, _ = super().prediction_step(model, {k: v for k, v in inputs.items() if k != "labels"},
                                                       False, ignore_keys, **gen_kwargs)
        return loss.detach(), tokens, inputs["labels"]

    def _count_loss(self, logits, labels) -> None:
        """Keep each clip's summed token loss and token count, gathered from every process with
        the clips repeated to pad the last batches dropped (`gather_for_metrics`)."""
        import torch
        import torch.nn.functional as F

        # a few clips at a time: float32 logits of a whole batch of 64 are ~800 MB for Whisper's vocabulary
        summed = torch.cat([F.cross_entropy(x.float().transpose(1, 2), y, ignore_index=IGNORE_INDEX,
                                            reduction="none").sum(1) for x, y in zip(logits.split(8), labels.split(8))])
        counted = (labels != IGNORE_INDEX).sum(1).to(summed.dtype)
        self._clip_losses.append(self.accelerator.gather_for_metrics(torch.stack([summed, counted], 1)))

    def _greedy_decoder(self, whisper):
        import torch

        from whisper_ft.decoding import GreedyDecoder, max_new_tokens

        if self._decoder is None:
            prefix = list(self.processing_class.tokenizer.prefix_tokens)
            dtype = self.weights_dtype or (torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None)
            self._decoder = GreedyDecoder(whisper, prefix, max_new_tokens(self.args.generation_max_length, len(prefix),
                                                                          whisper.config.max_target_positions), dtype)
        return self._decoder


def encode(whisper, features, dtype):
    """The encoder's output for `features`: on a `dtype` copy of the weights, or with the
    weights as they are (`dtype` None; under autocast where the caller sets it)."""
    if dtype is None:
        return whisper.model.encoder(features).last_hidden_state
    return forward(whisper.model.encoder, dtype, input_features=features).last_hidden_state


def make_trainer(model, args, data: Data, eval_dataset, callbacks: Sequence = (),
                 fast_generation: bool = True, weights_dtype=None, background_saves: bool = False) -> Seq2SeqTrainer:
    return WhisperTrainer(
        model=model, args=args, data_collator=SpeechCollator(model.config.decoder_start_token_id),
        train_dataset=data.train_model, eval_dataset=eval_dataset, processing_class=data.processor,
        compute_metrics=partial(compute_metrics, data.processor.tokenizer), callbacks=list(callbacks),
        fast_generation=fast_generation, weights_dtype=weights_dtype, background_saves=background_saves)


class EventLog(TrainerCallback):
    """Writes each Trainer log as a `train` or `eval` event to metrics.jsonl, plus a log line;
    exports `best/` when a periodic check (on the selection `split`) after step 0 beats the
    best score so far in `metric` (training.select_metric); makes sure the last step is
    evaluated and saved."""

    def __init__(self, run_dir: Path, processor, meta: dict, split: str, metric: str = "wer"):
        self.run_dir = run_dir
        self.processor = processor
        self.meta = meta
        self.split = split
        self.metric = metric
        # never an earlier final phase's average: checks compete with checks
        best = best_single_check(run_dir, metric)
        self.best_score = best[metric] if best.get(metric) is not None else math.inf

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_evaluate = control.should_save = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "eval_wer" in logs:
            event = eval_event(logs, "eval", state.global_step, self.split, SELECTION)
            log.info("%s check at step %d: %s", self.split, state.global_step, scores_line(event))
        elif "loss" in logs:
            event = {"event": "train", "step": state.global_step, "epoch": logs.get("epoch"), "loss": logs["loss"],
                     "learning_rate": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm")}
        else:
            return
        checkpoints.append_event(self.run_dir, event)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        score = (metrics or {}).get(f"eval_{self.metric}", math.nan)
        if state.global_step == 0 or not score < self.best_score:  # NaN never wins
            return
        self.best_score = score
        if state.is_world_process_zero:
            info = {**self.meta, "step": state.global_step, "split": self.split, "wer": metrics.get("eval_wer"),
                    "wer_normalized": metrics.get("eval_wer_normalized"), "cer": metrics.get("eval_cer"),
                    "eval_clips": metrics.get("eval_clips")}
            checkpoints.export_best(model, self.processor, self.run_dir, info)
            log.info("new best %s %s %.2f%% at step %d: exported %s", self.split, report.METRIC_NAMES[self.metric],
                     100 * score, state.global_step, self.run_dir / checkpoints.BEST_DIR)


def scores_line(event: dict) -> str:
    """'WER 12.34%, normalized WER ..., CER ... on N clips' of an `eval` event (None shows as nan)."""
    pct = lambda k: 100 * (math.nan if event[k] is None else float(event[k]))  # noqa: E731
    return (f"WER {pct('wer'):.2f}%, normalized WER {pct('wer_normalized'):.2f}%, CER {pct('cer'):.2f}% "
            f"on {event['eval_clips']} clips")


SELECTION, REPORT = "selection", "report"  # purposes of an evaluation: pick checkpoints, or report


def eval_event(metrics: dict, prefix: str, step: int, split: str, purpose: str) -> dict:
    """A metrics.jsonl `eval` event on `split` (validation or test) for `purpose` from Trainer
    metrics named `<prefix>_wer` etc."""
    get = lambda k: metrics.get(f"{prefix}_{k}")  # noqa: E731
    return {"event": "eval", "step": step, "split": split, "purpose": purpose, "wer": get("wer"),
            "wer_normalized": get("wer_normalized"), "cer": get("cer"), "eval_clips": get("clips"), "loss": get("loss"), "runtime": get("runtime"),
            "clips_per_second": get("samples_per_second")}


# --------------------------------------------------------------------------- the run


def run_training(cfg: Config, fresh: bool = False, callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """One whole training run: resume (or start over), score the base model on the test split,
    train with periodic checks on the validation split, score `best/` on the test split, write
    the reports. Returns the summary also saved as metrics.json.

    `callbacks` are extra Trainer callbacks; one that sets `control.should_training_stop`
    after an evaluation ends the run early (the best model so far is still exported).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    run_dir = run_dir_of(cfg)
    check_folder(cfg.training.output_dir, "training.output_dir")  # now, not in the Trainer after loading everything
    check_folder(run_dir, "training.run_name")
    if is_main_process():
        check_writable(run_dir, "training.output_dir")
        # before looking at best/: a best/ cut off between its renames is put back here
        for leftover in checkpoints.remove_leftovers(run_dir):
            log.info("removed %s, left half-written by an earlier process", leftover)
    found = [] if fresh else checkpoints.checkpoints(run_dir)
    start_step, resume = found[-1] if found else (0, None)
    if not fresh:
        check_newest_checkpoint(run_dir, found)
    if resume is not None:
        check_resumable(cfg, run_dir, resume, start_step)
        if (done := finished_summary(cfg, run_dir, start_step)) is not None:
            log.info("%s finished at step %d already (metrics.json): nothing to do; --push-only publishes it, "
                     "--fresh trains it again", run_dir, start_step)
            return done
    elif not fresh and (run_dir / checkpoints.BEST_DIR).is_dir():
        start_over(cfg, run_dir)
    subset_seed = eval_subset_seed(cfg, run_dir) if resume is not None else EVAL_SUBSET_SEED
    data = load_data(cfg, subset_seed)
    model = prepare_model(cfg, data.processor.tokenizer)
    if fresh and is_main_process() and run_dir.exists():  # only now: a failure up to here deletes nothing
        shutil.rmtree(run_dir)
    gen_len = generation_max_length(cfg, longest_label(data.train_model, data.selection_model))
    first = cfg.training.eval_before_training and resume is None
    owed = resume is not None and owed_check(run_dir, resume, start_step)
    args = training_arguments(cfg, run_dir, gen_len, eval_on_start=first or owed, d_model=model.config.d_model,
                              warmup_steps=first_warmup(cfg, run_dir) if resume is not None else None)
    meta = {"base_model": cfg.model.name_or_path, "language": cfg.model.language, "task": cfg.model.task,
            "features": data.manifest["name"]}
    t = cfg.training
    if resume is not None and is_main_process():
        rewind(cfg, run_dir, start_step, meta, data.processor)
    keeper = ([averaging.Keeper(run_dir, t.average_checkpoints, t.average_mode, t.select_metric)]
              if t.average_checkpoints else [])
    stopper = stopping.StopOnSignal()
    trainer = make_trainer(model, args, data, data.selection_model,
                           [EventLog(run_dir, data.processor, meta, data.selection_split, t.select_metric), *keeper,
                            stopper, *callbacks],
                           t.fast_generation, weights_dtype(cfg), t.background_saves)
    if trainer.is_world_process_zero():
        announce_start(cfg, run_dir, args, data, start_step, resume, gen_len, subset_seed)
    if first:
        score_test(cfg, args, data, model, run_dir, step=0)
    if resume is not None and start_step >= t.max_steps:  # trained already; its final phase was cut short
        if trainer.is_world_process_zero():
            log.info("%s is at or past training.max_steps (%d): no training left, finishing the run", resume.name,
                     t.max_steps)
        trainer._load_from_checkpoint(str(resume))
        trainer.state = TrainerState.load_from_json(str(resume / TRAINER_STATE_NAME))
        if owed:  # without TensorBoard: its writer starts at train begin, and would otherwise write ./runs/
            from transformers.integrations import TensorBoardCallback

            trainer.remove_callback(TensorBoardCallback)
            trainer.evaluate()
        train_metrics = earlier_train_metrics(run_dir)
    else:
        try:
            train_metrics = trainer.train(resume_from_checkpoint=str(resume) if resume else None).metrics
        except BaseException:  # no on_train_end then: the next Ctrl-C or SIGTERM is not this run's
            stopper.restore()
            raise
        if trainer.is_world_process_zero():
            log_trained(run_dir, trainer.state.global_step, train_metrics)
        stopper.raise_if_stopped(trainer.state.global_step)  # SIGTERM: saved, and no final phase now
    if checkpoints.read_best(run_dir) is None and trainer.is_world_process_zero():  # stopped before any evaluation
        checkpoints.export_best(trainer.model, data.processor, run_dir, {**meta, "step": trainer.state.global_step, "wer": None})
    trainer.accelerator.wait_for_everyone()
    averaged = try_average(cfg, args, data, run_dir, meta, trainer.state.global_step) if t.average_checkpoints else None
    drop_unchosen_average(cfg, run_dir, meta, averaged, data.processor, trainer.is_world_process_zero())
    trainer.accelerator.wait_for_everyone()
    best = load_model(str(run_dir / checkpoints.BEST_DIR), cfg.model.language, cfg.model.task, attn_implementation="sdpa")
    final = score_test(cfg, args, data, best, run_dir, step=checkpoints.read_best(run_dir)["step"], final=True)
    summary = summarize(trainer, train_metrics, final, run_dir, args, data.selection_split, t.select_metric)
    summary.update(learning_rate=args.learning_rate, warmup_steps=args.warmup_steps, mixed_precision=mixed_precision(cfg),
                   averaging=averaged, overlapping_training_rows=data.overlapping_training_rows,
                   overlapping_validation_rows=data.overlapping_validation_rows)
    if trainer.is_world_process_zero():
        if cfg.training.export_ctranslate2:
            export_ct2(run_dir / checkpoints.BEST_DIR)
        if cfg.training.score_served:
            held_out = FeatureStore.held_out_of(cfg)
            summary["served"] = served.score(run_dir / checkpoints.BEST_DIR, held_out, cfg,
                                             served.predictions_by_clip(run_dir / "predictions.jsonl"))
        write_reports(cfg, data.manifest, summary, run_dir)
    return summary


# What a resumed run may not change: its checkpoint restores the optimizer and the schedule (so
# a new rate, decay or warm-up would be ignored), and the rest defines the trajectory, what its
# checks measure or which of them is best/. Everything else (max_steps, the check and save
# cadence, speed and precision switches, exports) may change between runs.
FIXED_ON_RESUME = (
    "model.name_or_path", "model.language", "model.task", "features.name", "training.eval_features",
    "training.learning_rate", "training.lr_scheduler", "training.warmup_steps", "training.warmup_fraction",
    "training.batch_size", "training.gradient_accumulation_steps", "training.weight_decay", "training.seed",
    "training.dropout", "training.freeze_encoder", "training.lora", "training.spec_augment", "training.eval_subset",
    "training.generation_max_length", "training.num_beams", "training.select_metric",
)
SWITCHED = ("training.lora", "training.spec_augment")  # FIXED_ON_RESUME sections with an `enabled` switch
# The value a run used for a FIXED_ON_RESUME key that its config.yaml predates, where one is known.
PREDATED_DEFAULTS = {"training.select_metric": "wer"}


def check_newest_checkpoint(run_dir: Path, found: list[tuple[int, Path]]) -> None:
    """Say which newer checkpoints a resume skips as incomplete, and refuse to resume from a
    damaged one (`checkpoints.damage`) with one line, rather than a traceback from the Trainer
    after the data and model are loaded. Deleting it is the user's call: it may be copied back."""
    newest = found[-1][0] if found else -1
    for step, folder in checkpoints.incomplete(run_dir):
        if step > newest:
            log.warning("%s is incomplete (no whole trainer_state.json: cut short by a crash, or copied in part): %s",
                        folder, f"resuming from {found[-1][1].name}" if found else "starting at step 0")
    if found and (problem := checkpoints.damage(found[-1][1])):
        instead = f"resume from {found[-2][1].name}" if len(found) > 1 else "start the run over"
        raise TrainingError(f"{found[-1][1]} is damaged ({problem}): copy it back whole, or delete that folder to "
                            f"{instead}")


def saved_config(run_dir: Path) -> dict | None:
    """The run's config.yaml as saved (None without one); a damaged or emptied one is a
    ConfigError: the checks of a resume would otherwise pass whatever changed."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    if not (saved := read_mapping(path, "run config", "sections")):
        raise ConfigError(f"{path} is empty: the settings the run was trained with are gone; restore the file, or "
                          "pass --fresh to start the run over")
    return saved


def check_resumable(cfg: Config, run_dir: Path, resume: Path | None, step: int = 0) -> None:
    """Refuse to resume `run_dir` from `resume` (at `step`) with settings that differ from the
    run's own (its config.yaml) in `FIXED_ON_RESUME`, on a feature store rebuilt since, or on
    another number of processes while there is training left: the change would be ignored or
    would mix two runs. Without a
    checkpoint (`resume` None), refuse to start over a run whose best/ came from other
    settings, rather than delete it."""
    if (saved := saved_config(run_dir)) is None:
        return
    now = to_dict(cfg)
    missing = object()  # a key the run's config.yaml predates
    changed = []
    for key in FIXED_ON_RESUME:
        before, after = lookup(saved, key, missing), lookup(now, key, missing)
        if before is missing:
            before = PREDATED_DEFAULTS.get(key, missing)
        if key == "training.eval_features":  # empty reads features.name: compare the store each one reads
            before = before or lookup(saved, "features.name", missing)
            after = after or lookup(now, "features.name", missing)
        if key in SWITCHED and not any(isinstance(v, dict) and v.get("enabled") for v in (before, after)):
            continue  # off before and after: its other settings change nothing
        if key == "model.language" and isinstance(before, str):  # a run configured before names were refused
            from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

            before = TO_LANGUAGE_CODE.get(before.lower(), before)
        if before is not missing and before != after:
            changed.append(f"{key} {before!r} -> {after!r}")
    if changed and resume is None:
        raise TrainingError(f"{run_dir} holds a best/ model trained with other settings ({'; '.join(changed)}) and no "
                            "checkpoint to resume from: set them back, pass --fresh to start it over (deleting it), "
                            "or use another training.run_name")
    if changed:
        raise TrainingError(f"{run_dir} was trained to {resume.name} with other settings ({'; '.join(changed)}): "
                            "a resumed run keeps its own; set them back, pass --fresh to start it over, or use "
                            "another training.run_name")
    if resume is not None:
        check_same_stores(cfg, run_dir, resume)
        check_average_mode(cfg, run_dir)
    if resume is not None and step < cfg.training.max_steps:
        check_same_processes(run_dir, resume, step)
    steps = lookup(saved, "training.max_steps", missing)
    if resume is not None and steps is not missing and steps != cfg.training.max_steps:
        if step < cfg.training.max_steps:
            why = "the learning-rate schedule runs to the new end from here"
        else:
            try:
                towards = json.loads((resume / TRAINER_STATE_NAME).read_text(encoding="utf-8"))["max_steps"]
            except (OSError, ValueError, KeyError):
                towards = steps
            why = f"no training left after step {step}, trained on the schedule towards {towards}"
        log.info("training.max_steps changed from %s to %d: %s", steps, cfg.training.max_steps, why)


def owed_check(run_dir: Path, resume: Path, step: int) -> bool:
    """Whether the check at `step`, where the run resumes from `resume`, was due (at the check
    cadence its checkpoint records, or its last step) and is not in its log: a run stopped by a
    signal at a check step saves before it checks, and may be killed during the check. The
    resumed run then checks there first (`eval_on_start`, which `WhisperTrainer._evaluate`
    counts as that step's check)."""
    try:
        state = json.loads((resume / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    every = int(state.get("eval_steps") or 0)
    due = step >= (state.get("max_steps") or math.inf) or (every > 0 and step % every == 0)
    checks = checkpoints.selection_checks(checkpoints.read_events(run_dir))
    return due and not any(e.get("step") == step for e in checks)


def check_average_mode(cfg: Config, run_dir: Path) -> None:
    """Refuse to average a run's checks in another training.average_mode than the one its
    averaging/ kept them for (an index written without it: the run's config.yaml's): the checks
    that mode would average were deleted as they came."""
    t, folder = cfg.training, run_dir / averaging.FOLDER
    kept = averaging.kept_mode(folder)
    if kept is None and averaging.read_index(folder):
        try:
            kept = lookup(saved_config(run_dir), "training.average_mode", "last")  # the default before the key
        except (OSError, ValueError):
            kept = None
    if t.average_checkpoints and kept is not None and kept != t.average_mode:
        raise TrainingError(f"{folder} keeps the checks average_mode {kept} averages, not those {t.average_mode} "
                            f"would (deleted as they came): set training.average_mode back to {kept}, pass --fresh "
                            "to start it over, or use another training.run_name")


STORE_KEYS = {"train": "features.name", "held_out": "training.eval_features"}  # the stores a run reads, by role


def store_identities(cfg: Config) -> dict:
    """`FeatureStore.identity` of the training store and of the validation and test store, by
    role (the start event records them)."""
    return {"train": FeatureStore.of(cfg).identity(), "held_out": FeatureStore.held_out_of(cfg).identity()}


def check_same_stores(cfg: Config, run_dir: Path, resume: Path) -> None:
    """Refuse to resume `run_dir` from `resume` on a feature store rebuilt since the run's last
    start (the same name, other clips: `--overwrite` with other sources, say): the data order,
    the token cap and best/'s validation WER belong to the store as it was. Runs whose start
    events predate the record are not checked."""
    starts = [e for e in checkpoints.read_events(run_dir) if e.get("event") == "start" and e.get("stores")]
    if not starts:
        return
    now = store_identities(cfg)
    for role, key in STORE_KEYS.items():
        before, after = starts[-1]["stores"].get(role), now[role]
        if before and before["fingerprint"] != after["fingerprint"]:
            raise TrainingError(f"{run_dir} was trained to {resume.name} on features {after['name']} ({key}) as they "
                                f"were built then; they were rebuilt since ({store_change(before, after)}): pass --fresh "
                                "to start the run over on them, or use another training.run_name")


def store_change(before: dict, after: dict) -> str:
    """'training clips 27 -> 15' for the split counts that differ between two identities."""
    changed = [f"{ROLE.get(split, split)} clips {before['clips'].get(split, 0)} -> {after['clips'].get(split, 0)}"
               for split in (TRAIN, VALIDATION, EVAL) if before["clips"].get(split, 0) != after["clips"].get(split, 0)]
    return ", ".join(changed) or "the same clip counts, other clips or settings"


def start_over(cfg: Config, run_dir: Path) -> None:
    """A run folder with best/ but no checkpoint to resume from. A finished run (its checkpoints
    deleted afterwards) is refused: training it again would replace the model it shipped. A run
    stopped before its first checkpoint was complete starts over, without that attempt's best/
    and averaging/, which must not stand against the new checks (refused with other settings)."""
    if (run_dir / "metrics.json").is_file():
        raise TrainingError(f"{run_dir} is a finished run with no checkpoint left to resume from: --push-only "
                            "publishes it as it is; --fresh trains it again (deleting it), or use another "
                            "training.run_name")
    check_resumable(cfg, run_dir, None)
    if is_main_process():
        for name in (checkpoints.BEST_DIR, averaging.FOLDER):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        log.info("%s has no checkpoint to resume from: starting it over (removed the earlier attempt's best/)", run_dir)


def eval_subset_seed(cfg: Config, run_dir: Path) -> int:
    """The seed that drew the `training.eval_subset` clips of `run_dir`, for resuming it on the
    clips its best/ was chosen on: recorded in its start event, else (a run started when the draw
    followed `training.seed`) its seed."""
    first = next((e for e in checkpoints.read_events(run_dir) if e.get("event") == "start"), None)
    if first is None:
        return EVAL_SUBSET_SEED
    return first.get("eval_subset_seed", cfg.training.seed)


def first_warmup(cfg: Config, run_dir: Path) -> int | None:
    """The warm-up `run_dir` started with, for resuming it where the warm-up is a fraction of
    max_steps (`warmup_steps: null`): a longer run keeps its warm-up rather than warming up
    again from where it is. None where the config sets the steps, or for a new run."""
    t = cfg.training
    first = next((e for e in checkpoints.read_events(run_dir) if e.get("event") == "start"), {})
    if t.warmup_steps is not None or first.get("warmup_steps") is None:
        return None
    if math.ceil(t.warmup_fraction * t.max_steps) != first["warmup_steps"]:
        log.info("keeping the run's warm-up of %d steps (training.warmup_fraction of the new max_steps would give %d)",
                 first["warmup_steps"], math.ceil(t.warmup_fraction * t.max_steps))
    return first["warmup_steps"]


def check_same_processes(run_dir: Path, resume: Path, step: int) -> None:
    """Refuse to go on training `run_dir` from `resume` (at `step`) on another number of processes
    than trained up to it: the effective batch (batch x accumulation x processes) and the order of
    the data would change. The starts before `step` count (a later one may only have finished the
    run, on any number of processes)."""
    starts = [e for e in checkpoints.read_events(run_dir)
              if e.get("event") == "start" and e.get("world_size") and e.get("step", 0) < step]
    before, now = (starts[-1]["world_size"], world_size()) if starts else (None, None)
    if before is not None and before != now:
        raise TrainingError(f"{run_dir} was trained to {resume.name} on {before} process(es), this run has {now}: the "
                            f"effective batch (batch_size x gradient_accumulation_steps x processes) would change; "
                            f"run it on {before}, pass --fresh to start it over, or use another training.run_name")


# What a finished run's final phase did, besides scoring best/: another value does that phase again.
FINAL_PHASE = ("export_ctranslate2", "score_served", "average_checkpoints", "average_mode")


def finished_summary(cfg: Config, run_dir: Path, step: int) -> dict | None:
    """The summary (metrics.json) of a run that finished at its newest checkpoint `step`, at or
    past training.max_steps, with this config's final-phase settings (`FINAL_PHASE`); None when
    there is work left: training, or a final phase cut short (no metrics.json) or asked for
    otherwise. A rerun of a finished run then repeats neither the test scoring nor the exports.
    Nor is a metrics.json beside a best/ without its model card: the card is what --push-only
    publishes, and rerun, the final phase writes it."""
    path = run_dir / "metrics.json"
    card = run_dir / checkpoints.BEST_DIR / "README.md"
    if step < cfg.training.max_steps or not path.is_file() or not card.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        saved = saved_config(run_dir)
    except (OSError, ValueError):
        return None
    if saved is None:
        return None
    now = to_dict(cfg)["training"]
    if summary.get("steps") != step or any(lookup(saved, f"training.{key}") != now[key] for key in FINAL_PHASE):
        return None
    return {**summary, "run_dir": str(run_dir)}  # where the run is now: its folder may have been moved


TRAIN_FIGURES = ("train_runtime", "train_samples_per_second", "train_loss")  # of the Trainer, per session


def log_trained(run_dir: Path, step: int, train_metrics: dict) -> None:
    """A `trained` event with the Trainer's figures of the session that just trained, as soon
    as training ends: a final phase cut short and rerun has no metrics.json to take them from."""
    checkpoints.append_event(run_dir, {"event": "trained", "step": step,
                                       **{k: train_metrics.get(k) for k in TRAIN_FIGURES}})


def earlier_train_metrics(run_dir: Path) -> dict:
    """The training figures of the last session that trained the run (its `trained` event, or
    for a run logged without one its metrics.json), for a rerun that trains no more."""
    trained = [e for e in checkpoints.read_events(run_dir) if e.get("event") == "trained"]
    if trained:
        return {k: trained[-1].get(k) for k in TRAIN_FIGURES}
    path = run_dir / "metrics.json"
    earlier = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return {"train_runtime": earlier.get("train_runtime_seconds"),  # None: the session that trained was killed
            "train_samples_per_second": earlier.get("train_samples_per_second"),
            "train_loss": earlier.get("train_loss")}


def announce_start(cfg: Config, run_dir: Path, args, data: Data, step: int, resume: Path | None, gen_len: int,
                   subset_seed: int) -> None:
    """Save the resolved config beside the run and log its `start` event and line."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    how = mixed_precision(cfg)
    checkpoints.append_event(run_dir, {"event": "start", "step": step, "resumed_from": resume and resume.name,
                                       "world_size": args.world_size, "train_clips": len(data.train),
                                       "test_clips": len(data.test), "selection_split": data.selection_split,
                                       "selection_clips": len(data.selection_model), "generation_max_length": gen_len,
                                       "learning_rate": args.learning_rate, "warmup_steps": args.warmup_steps,
                                       "mixed_precision": how, "stores": store_identities(cfg),
                                       "eval_subset_seed": subset_seed})
    log.info("%s at step %d: %d training clips, %d %s clips for the periodic checks, %d test clips, generation "
             "capped at %d tokens, peak learning rate %.3g after %d warm-up steps, %s",
             f"resuming from {resume.absolute()}" if resume else f"starting {run_dir.absolute()}", step, len(data.train), len(data.selection_model),
             data.selection_split, len(data.test), gen_len, args.learning_rate, args.warmup_steps, how)


def try_average(cfg: Config, args, data: Data, run_dir: Path, meta: dict, step: int) -> dict:
    """Average the kept checks' weights, score the average on the selection split and export
    it as `best/` if it beats the best single check there in training.select_metric. Returns
    what happened (the `averaging` entry of metrics.json: `score` and `single_score` in that
    metric)."""
    t = cfg.training
    metric = t.select_metric
    folder = run_dir / averaging.FOLDER
    steps = averaging.select(averaging.read_index(folder), t.average_checkpoints, t.average_mode)
    outcome = {"mode": t.average_mode, "n": t.average_checkpoints, "metric": metric, "steps": steps, "chosen": False}
    if len(steps) < 2:
        log.info("checkpoint averaging skipped: %d check(s) to average", len(steps))
        return {**outcome, "skipped": f"{len(steps)} check(s) to average"}
    model = load_model(str(run_dir / checkpoints.BEST_DIR), cfg.model.language, cfg.model.task,
                       attn_implementation="sdpa")
    model.load_state_dict(averaging.average([averaging.weights_path(folder, s) for s in steps]))
    trainer, out = predict(cfg, args, data, model, data.selection_model, "average")
    event = {**eval_event(out.metrics, "average", step, data.selection_split, SELECTION), "event": "average",
             "averaged_steps": steps}
    single = best_single_check(run_dir, metric)
    single_score = single.get(metric) if single.get(metric) is not None else math.inf
    wins = event[metric] < single_score  # NaN never wins
    outcome.update(wer=event["wer"], wer_normalized=event["wer_normalized"], cer=event["cer"], score=event[metric],
                   single_wer=single.get("wer"), single_score=single.get(metric), single_step=single.get("step"),
                   chosen=bool(wins))
    if trainer.is_world_process_zero():
        checkpoints.append_event(run_dir, event)
        log.info("average of the checks at steps %s: %s %s %.2f%% vs %.2f%% for the best single check (step %s)%s",
                 steps, data.selection_split, report.METRIC_NAMES[metric], 100 * event[metric], 100 * single_score,
                 single.get("step"), ": exported as best/" if wins else "; best/ is that check")
        if wins:
            info = {**meta, "step": step, "split": data.selection_split, "wer": event["wer"],
                    "wer_normalized": event["wer_normalized"], "cer": event["cer"], "eval_clips": event["eval_clips"],
                    "averaged_steps": steps}
            checkpoints.export_best(model, data.processor, run_dir, info)
    return outcome


def best_single_check(run_dir: Path, metric: str = "wer") -> dict:
    """{"step", "wer", "wer_normalized", "cer", ...} of the best single check by `metric`
    (training.select_metric): `best/` as the Trainer exported it, or, when `best/` holds an
    average already (a rerun of a run killed after its average won), the selection check in
    metrics.jsonl with the lowest `metric`, the earliest of equals as during training; {}
    before any."""
    best = checkpoints.read_best(run_dir) or {}
    if not best.get("averaged_steps"):
        return best
    checks = [e for e in checkpoints.selection_checks(checkpoints.read_events(run_dir))
              if e.get("step", 0) > 0 and e.get(metric) is not None]
    return min(checks, key=lambda e: e[metric], default={})


def rewind(cfg: Config, run_dir: Path, step: int, meta: dict, processor) -> None:
    """Before a resume from checkpoint-`step`: forget the models of the checks after it (a kill
    came after a check and before the next checkpoint), which belong to steps this run goes
    back over. Their weights in averaging/ are deleted; a `best/` of such a check is replaced
    by the best check up to `step` (from its weights in averaging/ or its checkpoint), or,
    where those are gone, removed: the next check that scores is exported. A `best/` deleted
    or damaged by hand (no readable best.json) after checks is exported again the same way:
    else the next check would be exported as best, however it scored."""
    folder = run_dir / averaging.FOLDER
    index = averaging.read_index(folder)
    if gone := [s for s in index if s > step]:
        for s in gone:
            averaging.weights_path(folder, s).unlink(missing_ok=True)
        averaging.write_index(folder, {s: v for s, v in index.items() if s <= step}, averaging.kept_mode(folder))
    best = checkpoints.read_best(run_dir)
    if best is not None and (best.get("step") or 0) <= step:
        return
    metric = cfg.training.select_metric
    checks = [e for e in checkpoints.selection_checks(checkpoints.read_events(run_dir))
              if 0 < e.get("step", 0) <= step and e.get(metric) is not None and math.isfinite(e[metric])]
    single = min(checks, key=lambda e: e[metric], default={})  # the earliest of equals, as during training
    if best is None and not single:
        return  # no check yet: the first one exports best/
    held = (f"best/ held the model of the check at step {best['step']}, after checkpoint-{step} where this run "
            "resumes" if best is not None else f"best/ is missing or has no readable {checkpoints.BEST_INFO}")
    source = single_check_source(run_dir, single["step"]) if single else None
    if source is None:
        shutil.rmtree(run_dir / checkpoints.BEST_DIR, ignore_errors=True)
        log.warning("%s; %s: the next check exports best/", held,
                    f"the weights of the best check before (step {single['step']}) are gone" if single else
                    "no check before it")
        return
    export_single_check(cfg, run_dir, meta, single, source, processor)
    log.info("%s: exported the best check up to there (step %d, from %s) as best/", held, single["step"], source)


def export_single_check(cfg: Config, run_dir: Path, meta: dict, single: dict, source: Path, processor) -> None:
    """Export the model of the periodic check `single` (an `eval` event), saved at `source`
    (`single_check_source`), as `best/`."""
    if source.is_file():  # weights kept for averaging, in best/'s architecture (the base model's)
        shape = run_dir / checkpoints.BEST_DIR
        model = load_model(str(shape) if (shape / "config.json").is_file() else cfg.model.name_or_path,
                           cfg.model.language, cfg.model.task, attn_implementation="sdpa")
        model.load_state_dict(averaging.average([source]))
    elif (source / "config.json").is_file():
        model = load_model(str(source), cfg.model.language, cfg.model.task, attn_implementation="sdpa")
    else:  # a LoRA checkpoint: its adapters, merged into the base model
        from peft import PeftModel

        base = load_model(cfg.model.name_or_path, cfg.model.language, cfg.model.task, attn_implementation="sdpa")
        model = PeftModel.from_pretrained(base, str(source)).merge_and_unload()
    info = {**meta, "step": single["step"], "split": single.get("split"),
            **{k: single.get(k) for k in ("wer", "wer_normalized", "cer", "eval_clips")}}
    checkpoints.export_best(model, processor, run_dir, info)


def drop_unchosen_average(cfg: Config, run_dir: Path, meta: dict, averaged: dict | None, processor,
                          main: bool) -> None:
    """Export the best single check as `best/` where `best/` holds an average that this final
    phase did not choose (`averaged`: try_average's outcome, None with averaging off), as after a
    rerun with other averaging settings: best/, metrics.json and the card then describe one
    model. A TrainingError when that check's weights are gone. `main`: the process that writes."""
    best = checkpoints.read_best(run_dir) or {}
    if not best.get("averaged_steps") or (averaged or {}).get("chosen"):
        return
    single = best_single_check(run_dir, cfg.training.select_metric)
    source = single_check_source(run_dir, single["step"]) if single else None
    if source is None:
        raise TrainingError(f"{run_dir / checkpoints.BEST_DIR} holds the average of the checks at steps "
                            f"{best['averaged_steps']}, which these averaging settings do not ship, and the weights of "
                            f"its best single check (step {single.get('step')}) are gone (not in {averaging.FOLDER}/, "
                            "no checkpoint of it): rerun with the training.average_checkpoints and average_mode that "
                            "made it, or pass --fresh to train it again")
    if not main:
        return
    export_single_check(cfg, run_dir, meta, single, source, processor)
    log.info("best/ held the average of the checks at steps %s, which this run does not ship: exported the best "
             "single check (step %d, from %s) as best/ again", best["averaged_steps"], single["step"], source)


def single_check_source(run_dir: Path, step: int) -> Path | None:
    """Where the model of the periodic check at `step` is still saved: its weights file in
    averaging/, else its complete checkpoint folder (the whole model, or a LoRA run's adapters);
    None when neither is left."""
    kept = averaging.weights_path(run_dir / averaging.FOLDER, step)
    if kept.is_file():
        return kept
    found = dict(checkpoints.checkpoints(run_dir)).get(step)
    if found is not None and any((found / name).is_file() for name in ("config.json", "adapter_config.json")):
        return found
    return None


def export_ct2(best_dir: Path) -> None:
    """The app's fast CPU path; training has succeeded either way, so a failure only warns."""
    try:
        from whisper_ft import ct2

        ct2.export(best_dir)
    except ImportError:
        log.warning("ctranslate2 is not installed: no %s/ct2 export (pip install ctranslate2 faster-whisper)", best_dir)
    except (OSError, ValueError, RuntimeError) as e:
        if out_of_space(e):
            raise  # the reports would not fit either
        log.warning("CTranslate2 export of %s failed (%s); the app falls back to transformers", best_dir, e)


def predict(cfg: Config, args, data: Data, model, dataset, prefix: str):
    """Score `model` on `dataset` outside training (no TensorBoard, no step-0 check); returns
    the Trainer that did it and its PredictionOutput, with metrics named `<prefix>_wer` etc."""
    import dataclasses

    eval_args = dataclasses.replace(args, report_to=[], eval_on_start=False)
    trainer = make_trainer(model, eval_args, data, dataset, fast_generation=cfg.training.fast_generation,
                           weights_dtype=weights_dtype(cfg))
    prepared = getattr(model, "_is_accelerate_prepared", False)
    try:
        return trainer, trainer.predict(dataset, metric_key_prefix=prefix)
    finally:
        if not prepared:  # accelerate marks the model prepared (for evaluation): training would then not wrap it in DDP
            vars(model).pop("_is_accelerate_prepared", None)


def score_test(cfg: Config, args, data: Data, model, run_dir: Path, step: int, final: bool = False) -> dict:
    """Score `model` on every test clip and log a `test` eval event: the base model before
    training (step 0), and `best/`, exactly what is shipped, at the end (`final`, which also
    writes predictions.jsonl)."""
    trainer, out = predict(cfg, args, data, model, data.test_model, "test")
    event = eval_event(out.metrics, "test", step, ROLE[EVAL], REPORT)
    if final:
        event["final"] = True
    if trainer.is_world_process_zero():
        if final:
            tok = data.processor.tokenizer
            columns = [c for c in ("id", "source", "speaker", *breakdown.SPEAKER_METADATA) if c in data.test.column_names]
            rows = [{**ex, "reference": ref, "prediction": hyp}
                    for ex, ref, hyp in zip(data.test.select_columns(columns), data.test["sentence"],
                                            decode(tok, out.predictions))]
            _write_jsonl(run_dir / "predictions.jsonl", rows)
        checkpoints.append_event(run_dir, event)
        log.info("test split, %s: %s", f"best/ (step {step})" if final else "before training", scores_line(event))
    return event


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def samples_seen(steps: int, clips: int, batch: int, accumulation: int, processes: int = 1) -> int:
    """Training samples that `steps` optimizer steps went through, repeats counted. An epoch is
    the `clips` in batches of `batch`, a step every `accumulation` batches; its last batch and
    step may be short. Under several processes accelerate deals each its share of the batches,
    every batch full (the last filled up with clips from the start, `even_batches`)."""
    share = clips if processes == 1 else -(-(-(-clips // batch)) // processes) * batch  # per process and epoch
    per_epoch = -(-(-(-share // batch)) // accumulation)  # steps: ceil(ceil(share / batch) / accumulation)
    epochs, rest = divmod(steps, per_epoch)
    return processes * (epochs * share + min(rest * accumulation * batch, share))


def summarize(trainer, train_metrics: dict, final: dict, run_dir: Path, args, selection_split: str,
              metric: str = "wer") -> dict:
    """The metrics.json summary (also returned by run_training). `best_*` and
    `selection_baseline` come from the selection split (`selection_split`), `best_score` being
    best/'s score in `metric`, the training.select_metric that chose it (`select_metric`); `wer`,
    `wer_normalized`, `cer`, `final` and `baseline` (zero-shot) from the test split."""
    events = checkpoints.read_events(run_dir) if trainer.is_world_process_zero() else []
    evals = [e for e in events if e["event"] == "eval"]
    baseline = next((e for e in evals if e.get("purpose") == REPORT and e["step"] == 0), None)
    periodic = [e for e in evals if e.get("purpose") == SELECTION]
    best = checkpoints.read_best(run_dir) or {}
    steps = trainer.state.global_step
    # the processes it trained on (a rerun that only finishes the run may have another number)
    processes = next((e["world_size"] for e in events if e["event"] == "start" and e.get("world_size")),
                     args.world_size)
    return {
        "selection_split": selection_split, "test_split": ROLE[EVAL],
        "best_wer": best.get("wer"), "best_step": best.get("step"), "select_metric": metric,
        "best_score": best.get(metric),
        "selection_baseline": next((e for e in periodic if e["step"] == 0), None),
        "wer": final["wer"], "wer_normalized": final["wer_normalized"], "cer": final["cer"],
        "eval_clips": final["eval_clips"], "final": final, "baseline": baseline,
        "steps": steps, "schedule_steps": trainer.state.max_steps,
        "samples_seen": samples_seen(steps, len(trainer.train_dataset), args.train_batch_size,
                                     args.gradient_accumulation_steps, processes),
        "train_runtime_seconds": train_metrics.get("train_runtime", 0.0),
        "train_samples_per_second": train_metrics.get("train_samples_per_second"),
        "train_loss": train_metrics.get("train_loss"), "run_dir": str(run_dir),
        # the runtime and loss above are the Trainer's for the last session that trained
        "train_sessions": max(1, sum(1 for e in events if e["event"] == "start" and e["step"] < steps)),
    }


def write_reports(cfg: Config, manifest: dict, summary: dict, run_dir: Path) -> None:
    """The loss/WER plot, the model card (in the run folder and in best/), then metrics.json:
    written last, it marks the run finished (`finished_summary`), so a run stopped before it
    writes the reports again rather than being left without a card to publish."""
    report.plot_curves(checkpoints.read_events(run_dir), run_dir / report.PLOT_NAME)
    predictions = run_dir / "predictions.jsonl"
    groups = breakdown.breakdowns(breakdown.read_predictions(predictions)) if predictions.is_file() else {}
    write_atomic(run_dir / "wer_breakdown.json", json.dumps(groups, indent=1, ensure_ascii=False))
    card = (report.model_card(summary, to_dict(cfg), manifest) + served.markdown_section(summary.get("served"))
            + breakdown.markdown_section(groups))
    for folder in (run_dir, run_dir / checkpoints.BEST_DIR):
        write_atomic(folder / "README.md", card)
    shutil.copy2(run_dir / report.PLOT_NAME, run_dir / checkpoints.BEST_DIR / report.PLOT_NAME)
    write_atomic(run_dir / "metrics.json", json.dumps(summary, indent=1, ensure_ascii=False))
