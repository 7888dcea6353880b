"""Who the model fails: WER per source, speaker, gender, accent and age group from a run's
`predictions.jsonl` (the groups the source records; Common Voice has all of them)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import jiwer

from whisper_ft.text import normalize


def read_predictions(path: str | Path) -> list[dict]:
    """Records with at least reference and prediction (and source, speaker when known)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def wer_by(records: list[dict], key: str) -> list[dict]:
    """Orthographic and normalized WER per value of `key`, worst first; empty references skipped.

    Each result: {key, clips, words, wer, wer_normalized}; WER is a percentage (normalized WER None
    for a group whose references are all punctuation).
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("reference", "").strip():
            groups[str(r.get(key) or "unknown")].append(r)
    rows = []
    for value, items in groups.items():
        refs = [r["reference"] for r in items]
        hyps = [r.get("prediction", "") for r in items]
        norm_pairs = [(normalize(a), normalize(b)) for a, b in zip(refs, hyps) if normalize(a)]
        rows.append({
            key: value, "clips": len(items), "words": sum(len(r.split()) for r in refs),
            "wer": 100 * jiwer.wer(refs, hyps),
            "wer_normalized": (100 * jiwer.wer([a for a, _ in norm_pairs], [b for _, b in norm_pairs])
                               if norm_pairs else None),  # no reference left after normalization: undefined
        })
    return sorted(rows, key=lambda r: (-r["wer"], r[key]))


def markdown_table(rows: list[dict], key: str, limit: int = 20) -> str:
    """A Markdown table of `wer_by` rows (the `limit` worst)."""
    lines = [f"| {key} | clips | words | WER | normalized WER |", "|---|---:|---:|---:|---:|"]
    for r in rows[:limit]:
        name = r[key] if len(r[key]) <= 16 else r[key][:12] + "..."
        normalized = "n/a" if r["wer_normalized"] is None else f"{r['wer_normalized']:.2f}"
        lines.append(f"| {name} | {r['clips']} | {r['words']} | {r['wer']:.2f} | {normalized} |")
    return "\n".join(lines)


SPEAKER_METADATA = ("gender", "accents", "age")  # feature-store columns copied into predictions.jsonl
GROUP_KEYS = ("source", "speaker", *SPEAKER_METADATA)


def breakdowns(records: list[dict]) -> dict[str, list[dict]]:
    """`wer_by` for every grouping key the records carry."""
    return {key: wer_by(records, key) for key in GROUP_KEYS if any(r.get(key) for r in records)}


def markdown_section(groups: dict[str, list[dict]], limit: int = 10) -> str:
    """The model card's "Who it fails" section (empty without predictions)."""
    if not groups:
        return ""
    parts = ["", "## Who it fails", "",
             "WER of the final evaluation on the test split by source, speaker and, where the source records "
             "them, gender, accent and age group (worst first; `unknown`: not given; from the per-clip outputs, "
             "`predictions.jsonl` in the training run's folder)."]
    for key, rows in groups.items():
        title = f"By {key}" + (f" (the {limit} worst of {len(rows)})" if len(rows) > limit else "")
        parts += ["", f"### {title}", "", markdown_table(rows, key, limit)]
    return "\n".join(parts) + "\n"
