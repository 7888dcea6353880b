"""The Trainer of a run and its event log: `WhisperTrainer` (how a step and an evaluation run:
compact batches padded on the device, the bf16 weight copy, background checkpoint saves, fast
greedy evaluation, SIGTERM) and `EventLog` (each check into metrics.jsonl, and the best one
exported as best/). `whisper_ft.train` builds them for a run (`make_trainer`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from functools import partial
from pathlib import Path

from transformers import Seq2SeqTrainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME

from whisper_ft import checkpoints, report, reruns, stopping
from whisper_ft.checkpoints import SELECTION
from whisper_ft.collator import IGNORE_INDEX, expand
from whisper_ft.files import replace_dir, share_like_new_files, staging_dir
from whisper_ft.precision import forward, seq2seq_loss, with_causal_mask
from whisper_ft.saving import (BackgroundSaver, available_memory, broadcast, disk_full_as_user_error, fits_in_memory,
                               nbytes, record_weights_dtype, to_host)

log = logging.getLogger("whisper_ft.trainer")


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
        self._trained: tuple | None = None  # (model, its trained parameters) for `_clip_grad_norm`
        self._unwrapped: tuple | None = None  # (model, the Whisper inside it) for `_whisper`

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

    def _clip_grad_norm(self, model):
        """As the Trainer's for a model on one device (one process, or DDP): the gradients'
        norm before clipping, with the parameters listed once per run rather than found
        again every step (`clip_gradients`). Other set-ups (FSDP, DeepSpeed, sharded tensors,
        a model over several devices) take the Trainer's way."""
        import torch
        from accelerate.utils import DistributedType

        if self._trained is None or self._trained[0] is not model:
            params = [p for p in model.parameters() if p.requires_grad]
            plain = len({p.device for p in params}) == 1 and all(type(p) is torch.nn.Parameter for p in params)
            self._trained = (model, params if plain else None)
        params = self._trained[1]
        if params is None or self.accelerator.distributed_type not in (
                DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()  # fp16's loss scale, as the Trainer's clipping does first
        return clip_gradients([p.grad for p in params if p.grad is not None], self.args.max_grad_norm)

    def _whisper(self, model):
        """The model inside `model` (a DDP wrapper's), found once per model: accelerate's
        `unwrap_model` walks every module to look for compiled regions (whisper-small has 350),
        0.4 ms of host time in each training step on a 2-core CPU."""
        if self._unwrapped is None or self._unwrapped[0] is not model:
            self._unwrapped = (model, self.accelerator.unwrap_model(model))
        return self._unwrapped[1]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.weights_dtype is None:
            return super().compute_loss(model, with_causal_mask(inputs), return_outputs, num_items_in_batch)
        config = self._whisper(model).config
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

    def _issue_warnings_after_load(self, load_result) -> None:
        """The Trainer's warnings after a resume loads weights, less the tied ones: a checkpoint
        holds `proj_out.weight` once, as the decoder's token embedding, which loading restores in
        both; "missing keys ... ['proj_out.weight']" read as an output layer left untrained."""
        shared: dict[int, list[str]] = {}
        for name, tensor in self.model.named_parameters(remove_duplicate=False):
            shared.setdefault(id(tensor), []).append(name)
        missing = set(load_result.missing_keys)
        restored = {name for names in shared.values() if not missing.issuperset(names) for name in names}
        super()._issue_warnings_after_load(load_result._replace(
            missing_keys=[k for k in load_result.missing_keys if k not in restored]))

    def _init_training_state(self, max_steps, *args, **kwargs):
        """The Trainer's state, with the check, save and logging cadence of this run's arguments:
        a resumed state carries the checkpoint's, which transformers reads over the arguments'."""
        resumed = super()._init_training_state(max_steps, *args, **kwargs)
        self.state.compute_steps(self.args, max_steps)
        self._restore_best_check()
        return resumed

    def _restore_best_check(self) -> None:
        """A resumed state names the best check as its checkpoint recorded it. A run stopped by a
        signal at a check step saves that step's checkpoint before the check: its state names an
        earlier best, and rotation would keep that one's checkpoint and delete the better
        check's. The best check logged in the run's metrics.jsonl up to the resumed step is the one."""
        if not self.state.global_step or not self.args.metric_for_best_model:
            return
        metric = self.args.metric_for_best_model.removeprefix("eval_")
        check = reruns.best_logged_check(Path(self.args.output_dir), self.state.global_step, metric)
        if not check or check["step"] == self.state.best_global_step:
            return
        self.state.best_global_step = check["step"]
        self.state.best_metric = check[metric]
        folder = Path(self.args.output_dir) / f"checkpoint-{check['step']}"
        self.state.best_model_checkpoint = str(folder) if folder.is_dir() else None

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
            record_weights_dtype(tmp, weights)
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

        whisper = self._whisper(model)
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


def clip_gradients(grads: list, max_norm: float):
    """Scale `grads` in place so that their joint L2 norm is at most `max_norm`; returns the norm
    before scaling. `torch.nn.utils.clip_grad_norm_` computes the same, but moves each
    tensor's norm to one device by a call of its own (479 for whisper-small) before adding them
    up: host time a GPU waits for, the step being bound by the host."""
    import torch

    if not grads:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def encode(whisper, features, dtype):
    """The encoder's output for `features`: on a `dtype` copy of the weights, or with the
    weights as they are (`dtype` None; under autocast where the caller sets it)."""
    if dtype is None:
        return whisper.model.encoder(features).last_hidden_state
    return forward(whisper.model.encoder, dtype, input_features=features).last_hidden_state


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
        best = reruns.best_single_check(run_dir, metric)
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


def eval_event(metrics: dict, prefix: str, step: int, split: str, purpose: str) -> dict:
    """A metrics.jsonl `eval` event on `split` (validation or test) for `purpose` from Trainer
    metrics named `<prefix>_wer` etc."""
    get = lambda k: metrics.get(f"{prefix}_{k}")  # noqa: E731
    return {"event": "eval", "step": step, "split": split, "purpose": purpose, "wer": get("wer"),
            "wer_normalized": get("wer_normalized"), "cer": get("cer"), "eval_clips": get("clips"), "loss": get("loss"), "runtime": get("runtime"),
            "clips_per_second": get("samples_per_second")}
