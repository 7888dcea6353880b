"""End-of-run reports from metrics.jsonl: the loss/WER plot and the model card README, whose
front matter is the metadata the Hugging Face Hub reads (`card_data`)."""

from __future__ import annotations

import re
from pathlib import Path

from whisper_ft.checkpoints import REPORT, selection_checks

PLOT_NAME = "training_curves.png"
ASR_TASK = ("automatic-speech-recognition", "Automatic Speech Recognition")  # model-index task type and name


def plot_curves(events: list[dict], path: str | Path) -> Path:
    """PNG of training and evaluation loss (left) and WER (right) against step."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on training machines
    import matplotlib.pyplot as plt

    train = [e for e in events if e["event"] == "train" and e.get("loss") is not None]
    evals = [e for e in events if e["event"] == "eval"]
    checks = selection_checks(evals)
    split = checks[0].get("split", "eval") if checks else "eval"
    tests = [e for e in evals if e.get("purpose") == REPORT and e.get("wer") is not None]
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


STORE_SPLIT = {"eval": "test"}  # a feature store's split folder -> the split's name in the card


METRIC_NAMES = {"wer": "WER", "wer_normalized": "normalized WER", "cer": "CER"}  # training.select_metric in words


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _chosen_by(summary: dict) -> str:
    """'(WER 12.34 at step 500)', or for another training.select_metric 'by CER (CER 4.56, WER
    12.34 at step 500)': the score that chose best/, and its WER."""
    metric, at = summary.get("select_metric", "wer"), f"at step {summary.get('best_step')}"
    if metric == "wer":
        return f"(WER {_pct(summary.get('best_wer'))} {at})"
    name = METRIC_NAMES[metric]
    return f"by {name} ({name} {_pct(summary.get('best_score'))}, WER {_pct(summary.get('best_wer'))} {at})"


def _selection_note(summary: dict, selection: str) -> str:
    if selection != "test":
        note = (f"The checkpoint was chosen on the {selection} split {_chosen_by(summary)}; no test number was used "
                "for any choice.")
    else:
        note = ("**Note:** the feature store has no validation split, so the checkpoint was chosen on the test split "
                "and the fine-tuned test WER is optimistic. Rebuild the features to get a validation split.")
    if summary.get("overlapping_training_rows"):
        note += (f"\n\n**Note:** {summary['overlapping_training_rows']:,} training rows share a clip or a sentence with "
                 "validation or test rows and were trained on (see `features.on_overlap`), so these scores are not "
                 "held-out scores.")
    if summary.get("overlapping_validation_rows") and selection != "test":
        note += (f"\n\n**Note:** {summary['overlapping_validation_rows']:,} validation rows share a clip or a sentence "
                 "with test rows (`features.on_overlap: keep`), and the checkpoint was chosen on them, so the "
                 "fine-tuned test scores are optimistic.")
    return note


def _runtime(summary: dict) -> str:
    """'3600 s', or for a resumed run '1200 s in the last of its 3 training sessions': the
    Trainer's runtime (and loss) cover the session that ran, and earlier ones record none."""
    seconds, sessions = summary["train_runtime_seconds"], summary.get("train_sessions", 1)
    if seconds is None:  # the session that trained was killed before the Trainer returned
        return "time not recorded" + (f" ({sessions} training sessions, resumed)" if sessions > 1 else "")
    return f"{seconds:.0f} s" + (f" in the last of its {sessions} training sessions (resumed)" if sessions > 1 else "")


def model_card(summary: dict, config: dict, manifest: dict) -> str:
    """Markdown model card: results (zero-shot vs fine-tuned), data and hyperparameters."""
    t, m = config["training"], config["model"]
    base, final = summary.get("baseline") or {}, summary["final"]
    selection = summary.get("selection_split", "test")
    rows = [("zero-shot (step 0)" if base else None, base), (f"fine-tuned (best/, step {summary['best_step']})", final)]
    scored = "once before training and once on the shipped model" if base else "on the shipped model"
    table = "\n".join(f"| {name} | {r.get('eval_clips')} | {_pct(r.get('wer'))} | {_pct(r.get('wer_normalized'))} "
                      f"| {_pct(r.get('cer'))} |" for name, r in rows if name)
    held_out = t.get("eval_features") if t.get("eval_features") not in (None, "", manifest["name"]) else None
    data = "\n".join(f"- {STORE_SPLIT.get(split, split)}: {s['clips']} clips, {s['hours']:.2f} h "
                     f"({', '.join(f'{k} {v}' for k, v in s['by_source'].items())})"
                     for split, s in manifest["splits"].items() if not held_out or split == "train")
    if held_out:
        data += f"\n- validation and test: feature store `{held_out}` (`training.eval_features`)"
    test_of = f" of feature store `{held_out}`" if held_out else ""
    resolved = {"learning_rate": _resolved(t["learning_rate"], summary.get("learning_rate")),
                "warmup_steps": _resolved(t["warmup_steps"], summary.get("warmup_steps")),
                "precision": summary.get("mixed_precision") or t["precision"]}
    if (towards := summary.get("schedule_steps")) and towards > summary["steps"]:  # max_steps lowered, or stopped early
        resolved["max_steps"] = f"{summary['steps']} (stopped there: its learning-rate schedule ran towards {towards})"
    hyper = "\n".join(f"| {k} | {resolved.get(k, t[k])} |" for k in (
        "learning_rate", "lr_scheduler", "warmup_steps", "max_steps", "batch_size", "gradient_accumulation_steps",
        "weight_decay", "dropout", "precision", "gradient_checkpointing", "freeze_encoder", "seed"))
    extras = [name for name, on in (("LoRA", t["lora"]["enabled"]), ("SpecAugment", t["spec_augment"]["enabled"])) if on]
    return f"""---
{card_data(summary, config, t.get('push_to_hub') or t['run_name'], manifest['sources']).to_yaml()}
---

# {t['run_name']}

{public_model_name(m['name_or_path'])} fine-tuned for {m['task']} in language `{m['language']}` with `training_pipeline.py`.
The generation config forces language `{m['language']}` and task `{m['task']}`.

## Results

Test split{test_of}, {final.get('eval_clips', 'n/a')} clips, scored {scored}.
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

{summary['steps']} optimizer steps, {summary['samples_seen']} training samples seen, {_runtime(summary)}.
{('Model changes: ' + ', '.join(extras) + '.') if extras else ''}

| hyperparameter | value |
|---|---|
{hyper}

{averaging_section(summary.get("averaging"), selection)}
Curves: `{PLOT_NAME}`; every logged event: `metrics.jsonl`. The per-clip outputs (`predictions.jsonl`: the test
sentences, with speaker metadata where the source records it) stay in the training run's folder and are not published.
"""


def _resolved(configured, used) -> str:
    """A hyperparameter as used, and how the config set it when that differs (`auto`, null)."""
    if used is None or configured == used:
        return str(configured)
    shown = used if isinstance(used, int) else f"{used:.3g}"  # steps as counted, rates to 3 digits
    return f"{shown} ({'from warmup_fraction' if configured is None else configured})"


def averaging_section(averaging: dict | None, split: str) -> str:
    """The card's paragraph on checkpoint averaging: off, skipped, or the average against the
    best single check on the selection split, and which one was shipped."""
    if not averaging:
        return "Checkpoint averaging: off (`training.average_checkpoints: 0`).\n"
    what = f"the {averaging['mode']} {averaging['n']} checks"
    if 2 <= len(averaging["steps"]) < averaging["n"]:  # a run with fewer checks, or N raised afterwards
        what += f", only {len(averaging['steps'])} kept"
    if averaging.get("skipped"):
        return f"Checkpoint averaging of {what}: skipped ({averaging['skipped']}).\n"
    shipped = ("**the average was shipped** as best/" if averaging["chosen"]
               else f"the best single check (step {averaging['single_step']}) was shipped")
    metric = averaging.get("metric", "wer")  # summaries written before select_metric compared WER
    score, single = averaging.get("score", averaging["wer"]), averaging.get("single_score", averaging["single_wer"])
    return (f"Checkpoint averaging of {what} (steps {', '.join(map(str, averaging['steps']))}): {split} "
            f"{METRIC_NAMES[metric]} {_pct(score)} against {_pct(single)} for the best single check; {shipped}.\n")


def card_data(summary: dict, config: dict, model_name: str, sources: list[dict]):
    """The card's Hub metadata (`huggingface_hub.ModelCardData`): language, base model, training
    datasets (`sources`: those of the training store's manifest, which the run's own
    `features.sources` need not name) and a model-index named `model_name` whose results name
    their split. The test split's scores of best/ are the reported result; the validation WER
    that picked the checkpoint is listed after them, when a validation split did. Local folders
    are no Hub ids and are left out."""
    from huggingface_hub import ModelCardData

    sources = [_dataset(s) for s in sources]
    eval_store = config["training"].get("eval_features")
    dataset = ((eval_store, f"feature store {eval_store}") if eval_store else
               ("+".join(dict.fromkeys(t or n for t, n in sources)), " + ".join(n for _, n in sources)))
    return ModelCardData(
        language=language_code(config["model"]["language"]), license="apache-2.0",  # Whisper's, which it inherits
        base_model=_hub_id(config["model"]["name_or_path"]),
        datasets=list(dict.fromkeys(t for t, _ in sources if t)) or None, library_name="transformers",
        pipeline_tag=ASR_TASK[0], tags=["whisper", "speech-recognition"], metrics=["wer", "cer"],
        model_name=model_name, eval_results=_eval_results(summary, dataset) or None)


def language_code(language: str) -> str:
    """The ISO code the Hub's metadata wants for a Whisper language, given as a code or a name
    ("sv", or "swedish" in a run configured before names were refused); Whisper's Javanese
    `jw` is ISO's `jv`."""
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    code = TO_LANGUAGE_CODE.get(language.lower(), language)
    return {"jw": "jv"}.get(code, code)


# the folder of the embedded sample (scripts/make_sample.py): espeak-ng speech, not Common Voice's
SAMPLE_RELEASE = "cv-corpus-sample"
# after a test figure of a run that had no validation split, so picked its checkpoint on test
OPTIMISTIC = " (checkpoint chosen on test: optimistic)"
# after a test figure of a run that trained on clips of its validation or test split (features.on_overlap: keep)
NOT_HELD_OUT = " (training overlaps the held-out clips: not held out)"
# after a test figure of a run that chose its checkpoint on validation clips that overlap the test clips
CHOSEN_ON_OVERLAP = " (checkpoint chosen on clips overlapping test: optimistic)"


def score_caveat(summary: dict) -> str:
    """What the test figures of `summary` must carry: OPTIMISTIC for a run that picked its
    checkpoint on the test split, CHOSEN_ON_OVERLAP for one that picked it on validation clips
    sharing clips or sentences with test, NOT_HELD_OUT for one that trained on held-out clips;
    '' for none."""
    on_test = summary.get("selection_split") == "test"
    return ((OPTIMISTIC if on_test else "")
            + (CHOSEN_ON_OVERLAP if summary.get("overlapping_validation_rows") and not on_test else "")
            + (NOT_HELD_OUT if summary.get("overlapping_training_rows") else ""))


def _eval_results(summary: dict, dataset: tuple[str, str]) -> list:
    """model-index results in %: test WER, normalized WER and CER, then the validation WER."""
    from huggingface_hub import EvalResult

    final = summary["final"]
    caveat = score_caveat(summary)
    rows = [("test", "wer", f"Test WER{caveat}", final.get("wer")),
            ("test", "wer", f"Test WER (normalized){caveat}", final.get("wer_normalized")),
            ("test", "cer", f"Test CER{caveat}", final.get("cer"))]
    if summary.get("selection_split") == "validation":
        rows.append(("validation", "wer", "Validation WER (checkpoint selection)", summary.get("best_wer")))
    return [EvalResult(task_type=ASR_TASK[0], task_name=ASR_TASK[1], dataset_type=dataset[0], dataset_name=dataset[1],
                       dataset_split=split, metric_type=kind, metric_name=name, metric_value=round(100 * value, 2))
            for split, kind, name, value in rows if value is not None]


def _dataset(source: dict) -> tuple[str | None, str]:
    """(Hub dataset id or type, readable name) of a manifest's source (`sources.describe`): an
    `hf` source's hub id (None for a local folder), None for the embedded sample (synthetic
    speech, no Common Voice clip), or `common_voice` (the Hub's own example type) with the
    release when its path names one."""
    where = source.get("where") or ""
    if source.get("kind") == "hf":
        return _hub_id(where), source["name"]
    if source.get("kind") == "common_voice" and SAMPLE_RELEASE in Path(where).parts:
        return None, f"synthetic speech in Common Voice format ({source['name']})"
    release = re.search(r"cv-corpus-(\d+(?:\.\d+)?)", where)
    return "common_voice", "Common Voice" + (f" {release.group(1)}" if release else "") + f" ({source['name']})"


def public_model_name(name: str) -> str:
    """How a card names the base model: its Hub id, or a local folder by its own name only; its
    path would publish the machine's user and folders."""
    return _hub_id(name) or f"A local Whisper model (`{Path(name).name}`)"


def _hub_id(name: str) -> str | None:
    """`name` when it reads as a Hub repository id (owner/name) and is no local folder."""
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).expanduser().exists() else None
