"""Fine-tuning Whisper on the feature store with the HF `Seq2SeqTrainer`.

    summary = run_training(load_config("config.yaml"))      # resumes from the last checkpoint
    summary = run_training(cfg, fresh=True, callbacks=[MyPruningCallback()])

The Trainer brings mixed precision, gradient accumulation, DDP under `torchrun`, resumption
and checkpoint rotation; this module sets a run up (the stores, the model, the arguments) and
finishes it (checkpoint averaging, the test scoring, the exports and reports). What a step and
an evaluation do is `whisper_ft.trainer`'s; what a rerun of a run folder may do,
`whisper_ft.reruns`'s; the run folder's layout, `whisper_ft.checkpoints`'s.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from transformers import Seq2SeqTrainer, TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME

from whisper_ft import averaging, breakdown, checkpoints, report, reruns, served, stopping
from whisper_ft.checkpoints import REPORT, SELECTION
from whisper_ft.collator import IGNORE_INDEX, SpeechCollator
from whisper_ft.config import MAX_TARGET_POSITIONS, Config, check_folder, check_writable, save_config, to_dict
from whisper_ft.errors import TrainingError, first_line, out_of_space
from whisper_ft.features import (EVAL, ROLE, TRAIN, VALIDATION, FeatureStore, FeaturesError, find_overlap,
                                 stored_rows)
from whisper_ft.files import write_atomic
from whisper_ft.metrics import scores
from whisper_ft.model import load_model, resolve
from whisper_ft.processes import is_main_process
from whisper_ft.trainer import EventLog, WhisperTrainer, eval_event, scores_line

log = logging.getLogger("whisper_ft.train")

MODEL_COLUMNS = ["input_features", "fill", "labels"]  # what the collator reads


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.training.output_dir) / cfg.training.run_name


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


def load_data(cfg: Config, subset_seed: int = reruns.EVAL_SUBSET_SEED) -> Data:
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


def make_trainer(model, args, data: Data, eval_dataset, callbacks: Sequence = (),
                 fast_generation: bool = True, weights_dtype=None, background_saves: bool = False) -> Seq2SeqTrainer:
    return WhisperTrainer(
        model=model, args=args, data_collator=SpeechCollator(model.config.decoder_start_token_id),
        train_dataset=data.train_model, eval_dataset=eval_dataset, processing_class=data.processor,
        compute_metrics=partial(compute_metrics, data.processor.tokenizer), callbacks=list(callbacks),
        fast_generation=fast_generation, weights_dtype=weights_dtype, background_saves=background_saves)


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
    if resume is not None:
        reruns.check_resumable(cfg, run_dir, resume, start_step)
        if (done := reruns.finished_summary(cfg, run_dir, start_step)) is not None:
            log.info("%s finished at step %d already (metrics.json): nothing to do; --push-only publishes it, "
                     "--fresh trains it again", run_dir, start_step)
            return done
    elif not fresh and (run_dir / checkpoints.BEST_DIR).is_dir():
        reruns.start_over(cfg, run_dir)
    if not fresh:  # not before a finished run's return: its checkpoint is not loaded, and may be damaged
        reruns.check_newest_checkpoint(run_dir, found)
    subset_seed = reruns.eval_subset_seed(cfg, run_dir) if resume is not None else reruns.EVAL_SUBSET_SEED
    data = load_data(cfg, subset_seed)
    model = prepare_model(cfg, data.processor.tokenizer)
    if fresh and is_main_process() and run_dir.exists():  # only now: a failure up to here deletes nothing
        shutil.rmtree(run_dir)
    gen_len = generation_max_length(cfg, longest_label(data.train_model, data.selection_model))
    first = cfg.training.eval_before_training and resume is None
    owed = resume is not None and reruns.owed_check(run_dir, resume, start_step)
    args = training_arguments(cfg, run_dir, gen_len, eval_on_start=first or owed, d_model=model.config.d_model,
                              warmup_steps=reruns.first_warmup(cfg, run_dir) if resume is not None else None)
    meta = {"base_model": cfg.model.name_or_path, "language": cfg.model.language, "task": cfg.model.task,
            "features": data.manifest["name"]}
    t = cfg.training
    if resume is not None and is_main_process():
        reruns.rewind(cfg, run_dir, start_step, meta, data.processor)
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
        train_metrics = reruns.earlier_train_metrics(run_dir)
    else:
        try:
            train_metrics = trainer.train(resume_from_checkpoint=str(resume) if resume else None).metrics
        except BaseException:  # no on_train_end then: the next Ctrl-C or SIGTERM is not this run's
            stopper.restore()
            raise
        if trainer.is_world_process_zero():
            reruns.log_trained(run_dir, trainer.state.global_step, train_metrics)
        stopper.raise_if_stopped(trainer.state.global_step)  # SIGTERM: saved, and no final phase now
    end_workers(trainer)
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


def end_workers(trainer) -> None:
    """End the DataLoader workers that a Trainer keeps for its next epoch or check (persistent:
    training.dataloader_workers processes of about half a gigabyte each, for training and for the
    checks) once it has trained: the final phase's scoring passes start their own."""
    handler = trainer.callback_handler
    end_loader_workers([*getattr(trainer, "_eval_dataloaders", {}).values(), *trainer.accelerator._dataloaders,
                        handler.train_dataloader, handler.eval_dataloader])


def end_loader_workers(loaders) -> None:
    """End the worker processes that each DataLoader of `loaders` keeps (persistent workers)."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader._iterator = None


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
                                       "mixed_precision": how, "stores": reruns.store_identities(cfg),
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
    single = reruns.best_single_check(run_dir, metric)
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


def drop_unchosen_average(cfg: Config, run_dir: Path, meta: dict, averaged: dict | None, processor,
                          main: bool) -> None:
    """Export the best single check as `best/` where `best/` holds an average that this final
    phase did not choose (`averaged`: try_average's outcome, None with averaging off), as after a
    rerun with other averaging settings: best/, metrics.json and the card then describe one
    model. A TrainingError when that check's weights are gone. `main`: the process that writes."""
    best = checkpoints.read_best(run_dir) or {}
    if not best.get("averaged_steps") or (averaged or {}).get("chosen"):
        return
    single = reruns.best_single_check(run_dir, cfg.training.select_metric)
    source = reruns.single_check_source(run_dir, single["step"]) if single else None
    if source is None:
        raise TrainingError(f"{run_dir / checkpoints.BEST_DIR} holds the average of the checks at steps "
                            f"{best['averaged_steps']}, which these averaging settings do not ship, and the weights of "
                            f"its best single check (step {single.get('step')}) are gone (not in {averaging.FOLDER}/, "
                            "no checkpoint of it): rerun with the training.average_checkpoints and average_mode that "
                            "made it, or pass --fresh to train it again")
    if not main:
        return
    reruns.export_single_check(cfg, run_dir, meta, single, source, processor)
    log.info("best/ held the average of the checks at steps %s, which this run does not ship: exported the best "
             "single check (step %d, from %s) as best/ again", best["averaged_steps"], single["step"], source)


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

    # one pass: its DataLoader workers end with it
    eval_args = dataclasses.replace(args, report_to=[], eval_on_start=False, dataloader_persistent_workers=False)
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
