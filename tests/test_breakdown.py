from whisper_ft.breakdown import breakdowns, markdown_section, wer_by


def test_wer_by_groups_worst_first_and_skips_empty_references():
    records = [
        {"source": "cv", "speaker": "a", "reference": "Hej på dig.", "prediction": "hej på dig"},
        {"source": "cv", "speaker": "a", "reference": "Vad heter du?", "prediction": "Vad heter du?"},
        {"source": "nst", "speaker": "b", "reference": "God morgon", "prediction": "god kväll"},
        {"source": "nst", "speaker": "b", "reference": " ", "prediction": "brus"},
    ]
    by_source = wer_by(records, "source")
    assert [r["source"] for r in by_source] == ["nst", "cv"]
    assert by_source[0] == {"source": "nst", "clips": 1, "words": 2, "wer": 100.0, "wer_normalized": 50.0}
    assert by_source[1]["clips"] == 2 and by_source[1]["wer"] == 2 / 6 * 100 and by_source[1]["wer_normalized"] == 0.0


def test_clips_without_a_group_value_are_counted_as_unknown():
    """A source that records no accent (the key missing, empty or null) is one `unknown` group,
    as the model card says, not groups named "None" and ""."""
    records = [
        {"accents": "Skåne", "reference": "Hej på dig", "prediction": "hej på dig"},
        {"reference": "God morgon", "prediction": "god kväll"},
        {"accents": "", "reference": "Tack", "prediction": "tack"},
        {"accents": None, "reference": "Ja", "prediction": "ja"},
    ]
    rows = {r["accents"]: r["clips"] for r in wer_by(records, "accents")}
    assert rows == {"Skåne": 1, "unknown": 3}


def test_a_group_of_punctuation_only_references_has_no_normalized_wer():
    rows = wer_by([{"source": "a", "reference": "...", "prediction": "bla bla"}], "source")
    assert rows[0]["wer_normalized"] is None and rows[0]["wer"] == 200.0
    assert "| a | 1 | 1 | 200.00 | n/a |" in markdown_section({"source": rows})


def test_markdown_section_lists_every_group_key_present():
    records = [{"source": "cv", "speaker": f"s{i}", "reference": "ett två", "prediction": "ett"} for i in range(12)]
    groups = breakdowns(records)
    text = markdown_section(groups, limit=10)
    assert "### By source" in text and "### By speaker (the 10 worst of 12)" in text
    assert text.count("| 50.00 | 50.00 |") == 11
    assert markdown_section({}) == ""
