"""End-of-run reports from metrics.jsonl: the loss/WER plot and the model card README."""

from __future__ import annotations

from pathlib import Path

PLOT_NAME = "training_curves.png"


def plot_curves(events: list[dict], path: str | Path) -> Path:
    """PNG of training and evaluation loss (left) and WER (right) against step."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on training machines
    import matplotlib.pyplot as plt

    train = [e for e in events if e["event"] == "train" and e.get("loss") is not None]
    evals = [e for e in events if e["event"] == "eval"]
    checks = [e for e in evals if e.get("purpose", "selection") == "selection" and not e.get("final")]
    split = checks[0].get("split", "eval") if checks else "eval"
    tests = [e for e in evals if e.get("purpose") == "report" and e.get("wer") is not None]
    fig, (ax_loss, ax_wer) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([e["step"] for e in train], [e["loss"] for e in train], label="train loss")
    with_loss = [e for e in checks if e.get("loss") is not None]
    ax_loss.plot([e["step"] for e in with_loss], [e["loss"] for e in with_loss], "o-", label=f"{split} loss")
    ax_loss.set(xlabel="step", ylabel="loss", title="Loss")
    for key, label in (("wer", "WER"), ("wer_normalized", "normalized WER"), ("cer", "CER")):
        pts = [e for e in checks if e.get(key) is not None]
        ax_wer.plot([e["step"] for e in pts], [100 * e[key] for e in pts], "o-", label=f"{split} {label}")
    if tests:
        ax_wer.plot([e["step"] for e in tests], [100 * e["wer"] for e in tests], "k*", markersize=10,
                    label="test WER (before training; best/)")
    ax_wer.set(xlabel="step", ylabel="%", title="Error rates")
    for ax in (ax_loss, ax_wer):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _selection_note(summary: dict, selection: str) -> str:
    if selection != "test":
        return (f"The checkpoint was chosen on the {selection} split (WER {_pct(summary.get('best_wer'))} at step "
                f"{summary.get('best_step')}); no test number was used for any choice.")
    return ("**Note:** the feature store has no validation split, so the checkpoint was chosen on the test split "
            "and the fine-tuned test WER is optimistic. Rebuild the features to get a validation split.")


def model_card(summary: dict, config: dict, manifest: dict) -> str:
    """Markdown model card: results (zero-shot vs fine-tuned), data and hyperparameters."""
    t, m = config["training"], config["model"]
    base, final = summary.get("baseline") or {}, summary["final"]
    selection = summary.get("selection_split", "test")
    rows = [("zero-shot (step 0)" if base else None, base), (f"fine-tuned (best/, step {summary['best_step']})", final)]
    table = "\n".join(f"| {name} | {r.get('eval_clips')} | {_pct(r.get('wer'))} | {_pct(r.get('wer_normalized'))} "
                      f"| {_pct(r.get('cer'))} |" for name, r in rows if name)
    data = "\n".join(f"- {split}: {s['clips']} clips, {s['hours']:.2f} h ({', '.join(f'{k} {v}' for k, v in s['by_source'].items())})"
                     for split, s in manifest["splits"].items())
    hyper = "\n".join(f"| {k} | {t[k]} |" for k in (
        "learning_rate", "lr_scheduler", "warmup_steps", "max_steps", "batch_size", "gradient_accumulation_steps",
        "weight_decay", "dropout", "precision", "gradient_checkpointing", "freeze_encoder", "seed"))
    extras = [name for name, on in (("LoRA", t["lora"]["enabled"]), ("SpecAugment", t["spec_augment"]["enabled"])) if on]
    return f"""---
language: {m['language']}
pipeline_tag: automatic-speech-recognition
library_name: transformers
base_model: {m['name_or_path']}
tags: [whisper, speech-recognition]
---

# {t['run_name']}

{m['name_or_path']} fine-tuned for {m['task']} in language `{m['language']}` with `training_pipeline.py`.
The generation config forces language `{m['language']}` and task `{m['task']}`.

## Results

Test split, {final.get('eval_clips', 'n/a')} clips, scored once before training and once on the shipped model.
WER and CER in %, lower is better. Orthographic WER compares the text as written; normalized WER
lowercases and removes punctuation first.
{_selection_note(summary, selection)}

| model | clips | WER | normalized WER | CER |
|---|---|---|---|---|
{table}

## Data

Features `{manifest['name']}` (sources: {', '.join(s['name'] for s in manifest['sources'])}):

{data}

## Training

{summary['steps']} optimizer steps, {summary['samples_seen']} training samples seen, {summary['train_runtime_seconds']:.0f} s.
{('Model changes: ' + ', '.join(extras) + '.') if extras else ''}

| hyperparameter | value |
|---|---|
{hyper}

Curves: `{PLOT_NAME}`; every logged event: `metrics.jsonl`; per-clip outputs: `predictions.jsonl`.
"""
