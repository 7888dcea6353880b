"""Metrics as pure functions: orthographic vs normalized WER, CER, empty references."""

import math

import pytest

from whisper_ft.metrics import cer, scores, wer, wer_normalized


def test_perfect_and_wrong():
    assert wer(["hej på dig"], ["hej på dig"]) == 0.0
    assert wer(["hej på dig"], ["hej pa dig"]) == pytest.approx(1 / 3)
    assert cer(["hej"], ["hej"]) == 0.0
    assert cer(["abcd"], ["abce"]) == pytest.approx(0.25)


def test_normalized_ignores_case_and_punctuation_but_keeps_diacritics():
    refs, hyps = ["Hej, på dig!"], ["hej på dig"]
    assert wer(refs, hyps) == pytest.approx(2 / 3)  # "Hej," and "dig!" differ as written
    assert wer_normalized(refs, hyps) == 0.0
    assert wer_normalized(["Åsa är här."], ["asa ar har"]) == 1.0  # å/ä are letters, not accents


def test_normalized_ignores_invisible_format_characters():
    assert wer_normalized(["Sam\u00adhället är stort."], ["samhället är stort"]) == 0.0
    assert wer_normalized(["Det är\u200b bra."], ["det är bra"]) == 0.0


def test_normalized_keeps_the_words_in_brackets():
    """Whisper's normalizer drops bracketed spans as annotations; in Common Voice sentences they
    are read aloud, so they are words like any other."""
    assert wer_normalized(["Det var (som vanligt) för sent."], ["det var som vanligt för sent"]) == 0.0
    assert wer_normalized(["Det var [enligt källan] för sent."], ["det var enligt ryktet för sent"]) == pytest.approx(1 / 6)


def test_empty_references_are_skipped():
    assert wer(["", "en två"], ["något", "en två"]) == 0.0
    assert wer_normalized(["...", "en"], ["x", "en"]) == 0.0  # empty once normalized
    assert math.isnan(wer([""], ["x"]))
    assert math.isnan(cer([" "], ["x"]))
    assert scores(["", "hej du", "  "], ["a", "hej du", "b"])["clips"] == 1  # the clips scored


def test_empty_prediction_counts_as_deletions():
    assert wer(["en två tre"], [""]) == 1.0


def test_scores_bundle():
    s = scores(["Ett två.", "tre"], ["ett två", "tre fyra"])
    assert set(s) == {"wer", "wer_normalized", "cer", "clips"}
    assert s["clips"] == 2
    assert s["wer_normalized"] == pytest.approx(1 / 3)
    assert s["wer"] > s["wer_normalized"]


def test_cer_is_counted_against_the_reference():
    """CER divides the edits by the reference's characters: taken the other way round, a
    prediction that adds words to a short reference scored better than it was."""
    added = len(" fyra") / len("tre")  # five characters inserted into a reference of three
    assert cer(["tre"], ["tre fyra"]) == pytest.approx(added)
    assert scores(["tre"], ["tre fyra"])["cer"] == pytest.approx(added)


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 references but 1 predictions"):
        wer(["a", "b"], ["a"])
