"""Scoring the served model: long-form pieces and the model card's verdict on int8."""

import numpy as np

from whisper_ft.audio import SAMPLE_RATE
from whisper_ft.served import long_form_pieces, markdown_section


def _clip(seconds: float, text: str) -> dict:
    return {"id": text, "sentence": text, "wave": np.full(int(seconds * SAMPLE_RATE), 0.1, np.float32)}


def test_clips_are_joined_in_order_into_pieces_under_the_limit():
    clips = [_clip(50, "ett"), _clip(50, "två"), _clip(50, "tre"), _clip(50, "fyra")]
    pieces = long_form_pieces(clips, max_seconds=120, gap_seconds=0.5)
    assert [text for _, text in pieces] == ["ett två", "tre fyra"]
    assert all(len(w) == int(101 * SAMPLE_RATE) for w, _ in pieces)  # two clips + two gaps of silence
    wave = pieces[0][0]
    assert (wave[int(50 * SAMPLE_RATE):int(50.5 * SAMPLE_RATE)] == 0).all()
    assert [t for _, t in long_form_pieces([_clip(200, "lång")], max_seconds=120)] == ["lång"]  # never split a clip


def test_model_card_calls_out_an_int8_cost_over_one_point():
    def served(short_wer, ref_wer, backend="ctranslate2"):
        row = {"wer": short_wer, "wer_normalized": short_wer, "cer": 0.1, "clips": 5}
        return {"backend": backend, "clips": 5, "short_form": row,
                "transformers_same_clips": {**row, "wer": ref_wer},
                "long_form": {**row, "pieces": 1, "seconds": 30.0}}

    assert "**int8 costs 2.50 WER points**" in markdown_section(served(0.225, 0.2))
    assert "within 1 WER point" in markdown_section(served(0.205, 0.2))
    assert "int8" not in markdown_section(served(0.3, 0.2, backend="transformers"))
    assert markdown_section(None) == ""
