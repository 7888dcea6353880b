"""Scoring the served model: long-form pieces and the model card's verdict on the app against transformers."""

from collections import Counter

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


def test_stored_audio_comes_back_as_the_float_wave_it_was_made_from(tmp_path):
    """The served model is scored on the test audio the feature store keeps as int16: read back, it
    is the float wave in [-1, 1] the clip decoded to, within int16's precision, not samples 32767
    times too loud; clips stored without audio are not scored."""
    from types import SimpleNamespace

    from whisper_ft.features import EVAL, load_shard, pcm16, write_shard
    from whisper_ft.served import stored_clips

    waves = [np.random.default_rng(0).uniform(-1, 1, SAMPLE_RATE).astype(np.float32),
             np.array([1.0, -1.0, 0.5, 0.0], np.float32), None]  # the last: not one of the served clips
    examples = [{"id": f"test/{i}", "source": "cv", "speaker": "s", "sentence": f"mening {i}", "gender": "",
                 "accents": "", "age": "", "duration": 1.0, "input_features": np.zeros((3, 80), np.float32),
                 "fill": 0.0, "labels": [1, 2], "audio": pcm16(w) if w is not None else np.zeros(0, np.int16)}
                for i, w in enumerate(waves)]
    write_shard(tmp_path / f"{EVAL}-0", examples, Counter(), len(examples), n_mels=80, dtype="float32", audio=True)
    store = SimpleNamespace(load=lambda split: load_shard(tmp_path, f"{split}-0"))  # the test split's one shard
    clips = stored_clips(store)
    assert [c["key"] for c in clips] == [("cv", "test/0"), ("cv", "test/1")]
    assert [c["sentence"] for c in clips] == ["mening 0", "mening 1"]
    for clip, wave in zip(clips, waves):
        assert clip["wave"].dtype == np.float32
        np.testing.assert_allclose(clip["wave"], wave, rtol=0, atol=0.5 / 32767 + 1e-7)


def test_model_card_says_how_far_the_app_is_from_transformers_either_way_and_how_each_decodes():
    def served(short_wer, ref_wer, backend="ctranslate2", **beams):
        row = {"wer": short_wer, "wer_normalized": short_wer, "cer": 0.1, "clips": 5}
        return {"backend": backend, "clips": 5, "short_form": row, **beams,
                "transformers_same_clips": {**row, "wer": ref_wer},
                "long_form": {**row, "pieces": 1, "seconds": 30.0}}

    beams = {"beam_size": 5, "transformers_beams": 1}
    card = markdown_section(served(0.225, 0.2, **beams))
    assert "runs this model with the CTranslate2 int8 export, beam 5." in card
    assert "| transformers `best/`, greedy, same clips |" in card
    assert ("**The app (int8, beam 5) is 2.50 WER points worse** on these clips than the transformers model (greedy). "
            "The decodings differ too, so this is not the cost of int8 alone.") in card
    assert "within 1 WER point of the transformers model (greedy) on these clips (+0.50)." in markdown_section(
        served(0.205, 0.2, **beams))
    better = markdown_section(served(0.12, 0.15, **beams))  # the app decodes better than greedy transformers
    assert "The app (int8, beam 5) is better by 3.00 WER points on these clips" in better and "within" not in better
    same = markdown_section(served(0.12, 0.15, beam_size=1, transformers_beams=1))
    assert "The app (int8, greedy) is better by 3.00" in same and "decodings differ" not in same
    old = markdown_section(served(0.12, 0.15))  # a summary from before the beam widths were recorded
    assert "The app (int8) is better by 3.00 WER points on these clips than the transformers model." in old
    assert "int8" not in markdown_section(served(0.3, 0.2, backend="transformers"))
    assert markdown_section(None) == ""


def test_transformers_predictions_are_matched_by_source_and_id(tmp_path, monkeypatch):
    """Ids are unique within a source only: two sources' `test/0` keep their own predictions. The
    transformers row is scored with the sentences as references, as the app's row beside it: a word
    too many (an insertion) is an error among the sentences' four words, not the predictions' five."""
    import json
    from types import SimpleNamespace

    import whisper_ft.transcribe
    from whisper_ft import served
    from whisper_ft.config import load_config
    from whisper_ft.metrics import scores

    clips = [{"key": (source, "test/0"), "sentence": text, "wave": np.zeros(SAMPLE_RATE, np.float32)}
             for source, text in (("a", "ett två"), ("b", "tre fyra"))]
    texts = iter(["ett två", "tre fyra"] + ["ett två tre fyra"])  # served: both clips right, then the long form
    monkeypatch.setattr(served, "stored_clips", lambda store: clips)
    devices = []
    monkeypatch.setattr(whisper_ft.transcribe, "load_transcriber", lambda *a, **k: devices.append(k["device"]) or
                        SimpleNamespace(backend="ctranslate2", beam_size=5,
                                        transcribe=lambda wave, task: SimpleNamespace(text=next(texts))))
    predictions = (("a", "ett två tre"), ("b", "tre fyra"))
    (tmp_path / "predictions.jsonl").write_text("".join(
        json.dumps({"source": s, "id": "test/0", "prediction": p}) + "\n" for s, p in predictions))
    cfg = load_config(None, ["app.device=cuda"])  # the app's page may run on the GPU; what ships runs on a CPU
    result = served.score(tmp_path, None, cfg, served.predictions_by_clip(tmp_path / "predictions.jsonl"))
    assert devices == ["cpu"]
    refs, hyps = ["ett två", "tre fyra"], ["ett två tre", "tre fyra"]
    assert scores(refs, hyps)["wer"] != scores(hyps, refs)["wer"]  # the insertion tells the two orders apart
    assert result["short_form"]["wer"] == 0.0 and result["transformers_same_clips"] == scores(refs, hyps)
    assert result["transformers_same_clips"]["clips"] == 2
    assert (result["beam_size"], result["transformers_beams"]) == (5, 1)  # app.beam_size, training.num_beams
