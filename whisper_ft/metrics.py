"""Transcription metrics as pure functions on lists of strings.

    scores(["Hej på dig."], ["hej pa dig"])  # {"wer": ..., "wer_normalized": ..., "cer": ..., "clips": 1}

Orthographic WER compares the texts as written (comparable with the HF blog and community
results); normalized WER lowercases and strips punctuation first (`whisper_ft.text.normalize`,
å/ä/ö kept); CER is the orthographic character error rate. Pairs whose reference is empty
(after normalization, for the normalized score) are skipped: WER is undefined for them.
"""

from __future__ import annotations

from collections.abc import Sequence

import jiwer

from whisper_ft.text import normalize


def _nonempty(references: Sequence[str], predictions: Sequence[str]) -> tuple[list[str], list[str]]:
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    pairs = [(r.strip(), p.strip()) for r, p in zip(references, predictions) if r.strip()]
    return [r for r, _ in pairs], [p for _, p in pairs]


def wer(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Orthographic word error rate (0..inf, 0 is perfect); NaN when no reference is non-empty."""
    refs, hyps = _nonempty(references, predictions)
    return float(jiwer.wer(refs, hyps)) if refs else float("nan")


def cer(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Orthographic character error rate; NaN when no reference is non-empty."""
    refs, hyps = _nonempty(references, predictions)
    return float(jiwer.cer(refs, hyps)) if refs else float("nan")


def wer_normalized(references: Sequence[str], predictions: Sequence[str]) -> float:
    """WER after `normalize` (lowercase, no punctuation); NaN when no reference is non-empty."""
    return wer([normalize(r) for r in references], [normalize(p) for p in predictions])


def scores(references: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """All three scores plus the number of clips they were computed on (those with a non-empty reference)."""
    return {"wer": wer(references, predictions), "wer_normalized": wer_normalized(references, predictions),
            "cer": cer(references, predictions), "clips": len(_nonempty(references, predictions)[0])}
