"""Scores of the model the app serves, not only of the transformers model it came from.

After training, `best/` (with its CTranslate2 int8 export, when there is one) is loaded the way
`inference_app.py` loads it (`whisper_ft.transcribe.load_app_transcriber`: the `app:` settings),
on the CPU as a Space runs it, and run on the test clips whose audio the feature store keeps
(`features.served_clips`):

- short form: one clip at a time, compared with the transformers transcripts of the same
  clips from predictions.jsonl (decoded with training.num_beams), so what int8 and the app's
  decoding (app.beam_size) change together shows;
- long form: the same clips joined, with half a second of silence between them, into pieces
  of up to three minutes and transcribed through the app's long-form path (30 s windows, one
  after another), scored against the joined sentences.

    result = score(best_dir, store, cfg, predictions)     # -> metrics.json["served"], model card
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from whisper_ft.audio import SAMPLE_RATE
from whisper_ft.breakdown import read_predictions
from whisper_ft.features import EVAL, FeatureStore
from whisper_ft.metrics import scores

log = logging.getLogger("whisper_ft.served")

LONG_FORM_SECONDS = 180.0  # longest joined piece
GAP_SECONDS = 0.5  # silence between joined clips
GAP_POINTS = 1.0  # WER points between the app and the transformers model that the model card calls out, either way


def stored_clips(store: FeatureStore) -> list[dict]:
    """Test rows that carry audio: id, sentence, float32 16 kHz wave."""
    ds = store.load(EVAL)
    if "audio" not in ds.column_names:
        return []
    return [{"key": (str(r["source"]), str(r["id"])), "sentence": str(r["sentence"]),
             "wave": np.asarray(r["audio"], np.float32) / 32767}
            for r in ds.select_columns(["source", "id", "sentence", "audio"]).with_format("numpy") if len(r["audio"])]


def long_form_pieces(clips: list[dict], max_seconds: float = LONG_FORM_SECONDS,
                     gap_seconds: float = GAP_SECONDS) -> list[tuple[np.ndarray, str]]:
    """Consecutive clips joined into (wave, reference) pieces of at most `max_seconds`."""
    gap = np.zeros(int(gap_seconds * SAMPLE_RATE), np.float32)
    pieces, waves, texts, length = [], [], [], 0
    for clip in clips:
        n = len(clip["wave"]) + len(gap)
        if waves and (length + n) / SAMPLE_RATE > max_seconds:
            pieces.append((np.concatenate(waves), " ".join(texts)))
            waves, texts, length = [], [], 0
        waves += [clip["wave"], gap]
        texts.append(clip["sentence"])
        length += n
    if waves:
        pieces.append((np.concatenate(waves), " ".join(texts)))
    return pieces


def score(model_dir: str | Path, store: FeatureStore, cfg, predictions: dict[str, str]) -> dict | None:
    """Short- and long-form scores of the served model on the stored test audio, beside the
    transformers scores of the same clips (`predictions`: (source, id) -> transcript). None when the
    store keeps no audio."""
    from whisper_ft.transcribe import load_app_transcriber

    clips = stored_clips(store)
    if not clips:
        log.info("%s keeps no test audio (features.served_clips): the served model is not scored", store.root)
        return None
    transcriber = load_app_transcriber(model_dir, cfg, device="cpu")  # a Space's hardware, whatever app.device says
    refs = [c["sentence"] for c in clips]
    short = scores(refs, [transcriber.transcribe(c["wave"], cfg.model.task).text for c in clips])
    known = [c for c in clips if c["key"] in predictions]
    reference = scores([c["sentence"] for c in known], [predictions[c["key"]] for c in known]) if known else None
    pieces = long_form_pieces(clips)
    long_hyps = [transcriber.transcribe(wave, cfg.model.task).text for wave, _ in pieces]
    long = {**scores([text for _, text in pieces], long_hyps), "clips": len(clips), "pieces": len(pieces),
            "seconds": round(sum(len(w) for w, _ in pieces) / SAMPLE_RATE, 1)}  # clips: every clip, in pieces
    result = {"backend": transcriber.backend, "beam_size": transcriber.beam_size,
              "temperature_fallback": cfg.app.temperature_fallback, "clips": len(clips),
              "short_form": short, "transformers_same_clips": reference, "transformers_beams": cfg.training.num_beams,
              "long_form": long}
    log.info("served model (%s) on %d stored test clips: WER %.2f%% (transformers %s), long form %.2f%% over %.0f s",
             transcriber.backend, len(clips), 100 * short["wer"],
             "n/a" if reference is None else f"{100 * reference['wer']:.2f}%", 100 * long["wer"], long["seconds"])
    return result


def predictions_by_clip(path: Path) -> dict[tuple[str, str], str]:
    """(source, id) -> prediction of a predictions.jsonl, empty without one (ids are unique
    within a source only)."""
    if not path.is_file():
        return {}
    return {(r.get("source", ""), r["id"]): r["prediction"] for r in read_predictions(path)}


def markdown_section(served: dict | None) -> str:
    """The model card's "served model" section."""
    if not served:
        return ""
    pct = lambda x: "n/a" if x is None else f"{100 * x:.2f}"  # noqa: E731
    short, ref, long = served["short_form"], served["transformers_same_clips"], served["long_form"]
    engine = "the CTranslate2 int8 export" if served["backend"] == "ctranslate2" else "transformers"
    decoding = _decoding(served.get("beam_size"), ", ") + (
        "" if served.get("temperature_fallback", True) else ", each window decoded once (no temperature fallback)")
    lines = ["", "## The served model", "",
             f"`inference_app.py` runs this model with {engine}{decoding}. Scored "
             f"with the app's own transcriber on {served['clips']} test clips whose audio the feature store keeps:", "",
             "| what | clips | WER | normalized WER | CER |", "|---|---|---|---|---|",
             f"| app, one clip at a time | {short['clips']} | {pct(short['wer'])} | {pct(short['wer_normalized'])} | "
             f"{pct(short['cer'])} |"]
    if ref:
        lines.append(f"| transformers `best/`{_decoding(served.get('transformers_beams'), ', ')}, same clips | "
                     f"{ref['clips']} | {pct(ref['wer'])} | {pct(ref['wer_normalized'])} | {pct(ref['cer'])} |")
    pieces = f"{long['pieces']} piece{'s' * (long['pieces'] != 1)}"
    lines.append(f"| app, long form ({pieces}, {long['seconds'] / 60:.1f} min) | {long['clips']} | "
                 f"{pct(long['wer'])} | {pct(long['wer_normalized'])} | {pct(long['cer'])} |")
    if ref and served["backend"] == "ctranslate2":
        lines += ["", gap_verdict(100 * (short["wer"] - ref["wer"]), served.get("beam_size"),
                                  served.get("transformers_beams"))]
    return "\n".join(lines) + "\n"


def gap_verdict(points: float, app_beams: int | None, reference_beams: int | None) -> str:
    """The card's sentence on the app's WER minus the transformers model's (`points`): worse or
    better by more than GAP_POINTS, or within it. It names both decodings, as the gap is int8 and
    the decoding together where they differ (None: a summary that did not record it)."""
    app = f"The app (int8{_decoding(app_beams, ', ')})"
    reference = f"the transformers model{_decoding(reference_beams, ' (', ')')}"
    if points > GAP_POINTS:
        verdict = f"**{app} is {points:.2f} WER points worse** on these clips than {reference}."
    elif points < -GAP_POINTS:
        verdict = f"{app} is better by {-points:.2f} WER points on these clips than {reference}."
    else:
        verdict = f"{app} is within {GAP_POINTS:.0f} WER point of {reference} on these clips ({points:+.2f})."
    if None not in (app_beams, reference_beams) and app_beams != reference_beams:
        verdict += " The decodings differ too, so this is not the cost of int8 alone."
    return verdict


def _decoding(beams: int | None, before: str = "", after: str = "") -> str:
    """"greedy" or "beam N" between `before` and `after`; nothing where the width is unknown."""
    if beams is None:
        return ""
    return f"{before}{'greedy' if beams == 1 else f'beam {beams}'}{after}"
