"""Long-form transcription: chunked and batched windows, timestamps, .txt/.srt, CTranslate2 export."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zlib

import numpy as np
import pytest

from app_helpers import fast_model, speech_wav
from conftest import ROOT
from whisper_ft import ct2
from whisper_ft.audio import SAMPLE_RATE, load_audio
from whisper_ft.metrics import wer_normalized
from whisper_ft.model import load_model, load_processor
from whisper_ft.transcribe import (COMPRESSION_RATIO_THRESHOLD, FALLBACK_TEMPERATURES, CT2Transcriber,
                                   PipelineTranscriber, Segment, Transcript, compression_ratio, cut_loop,
                                   cut_looping_windows, find_loop, load_transcriber, ordered_segments, to_srt,
                                   to_txt)

# A unit of up to 20 characters repeated 8 times or more in a row: what a runaway window looks like.
LOOP = re.compile(r"(.{1,20}?)\1{7,}", re.S)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    return fast_model(tiny_model_dir, tmp_path_factory.mktemp("fast-whisper"))


@pytest.fixture(scope="module")
def long_speech(tmp_path_factory):
    """About 36 s of Swedish speech: longer than one 30 s window."""
    if shutil.which("espeak-ng") is None or shutil.which("ffmpeg") is None:
        pytest.skip("espeak-ng and ffmpeg are needed for synthetic speech")
    path = speech_wav("Hej, jag heter Anna och jag bor i Stockholm. Det regnar idag.",
                      tmp_path_factory.mktemp("speech") / "long.wav", repeat=8)
    return load_audio(path)


def test_srt_and_txt_writers():
    t = Transcript("Hej. Hur mår du?", (Segment(0.0, 1.5, "Hej."), Segment(61.25, 3725.5, "Hur mår du?")), 3726.0, 10.0)
    assert to_srt(t) == ("1\n00:00:00,000 --> 00:00:01,500\nHej.\n\n"
                         "2\n00:01:01,250 --> 01:02:05,500\nHur mår du?\n")
    assert to_txt(t) == "[00:00 - 00:01] Hej.\n[01:01 - 1:02:05] Hur mår du?\n"
    hour = Transcript("Tack.", (Segment(3599.5, 3600.0, "Tack."),), 3601.0)  # an hour on the dot is 1:00:00, not 60:00
    assert to_txt(hour) == "[59:59 - 1:00:00] Tack.\n"
    plain = Transcript("Hej.", (), 2.0, 1.0)
    assert to_txt(plain) == "Hej.\n"
    assert to_srt(plain) == "1\n00:00:00,000 --> 00:00:02,000\nHej.\n"
    assert plain.rtf == 0.5
    assert Transcript("", (), 0.0, 1.0).rtf == 0.0
    # SubRip has no empty cue: no text, no cue
    assert to_srt(Transcript("", (), 5.0, 1.0)) == ""
    assert to_srt(Transcript("Hej.", (Segment(0.0, 1.0, " "), Segment(1.0, 2.0, "Hej.")), 2.0)) == (
        "1\n00:00:01,000 --> 00:00:02,000\nHej.\n")


def test_long_audio_is_decoded_window_after_window_with_or_without_timestamps(model_dir, long_speech):
    """One generate call over all 36 s (Whisper's sequential long-form decoding), timestamps shown
    or not: the pipeline's overlapping windows, joined on a common token sequence, gave the
    overlap's speech twice when two windows worded it differently."""
    import torch

    tr = load_transcriber(str(model_dir), use_ctranslate2=False)
    assert isinstance(tr, PipelineTranscriber)
    texts = []
    for timestamps in (False, True):
        seen = calls(tr, long_speech, timestamps=timestamps)
        assert len(seen) == 1 and seen[0]["input_features"].shape[-1] > 3000 and seen[0]["return_segments"]
        torch.manual_seed(0)  # a looping window is sampled again at a higher temperature
        result = tr.transcribe(long_speech, timestamps=timestamps)
        assert result.text and result.text == result.text.strip()
        assert result.audio_seconds == pytest.approx(len(long_speech) / SAMPLE_RATE) and 0 < result.rtf < 5
        assert bool(result.segments) == timestamps
        texts.append(result.text)
    assert texts[0] == texts[1]
    short = calls(tr, long_speech[:10 * SAMPLE_RATE])  # one window: the pipeline, once
    assert len(short) == 1 and short[0]["input_features"].shape[-1] == 3000
    assert not short[0].get("return_timestamps")


def calls(tr, wave, timestamps: bool = False, task: str = "transcribe") -> list[dict]:
    """The generate keyword arguments (and input_features) of each batch that transcribing `wave` runs."""
    seen = []
    generate = tr.pipe.model.generate
    tr.pipe.model.generate = lambda *args, **kwargs: seen.append({**kwargs, "input_features": args[0]} if args
                                                                 else kwargs) or generate(*args, **kwargs)
    try:
        tr.transcribe(wave, task=task, timestamps=timestamps)
    finally:
        tr.pipe.model.generate = generate
    return seen


@pytest.mark.parametrize("seconds", [5, 35])  # one window (the pipeline), and long-form generation
def test_the_task_and_the_models_language_reach_generate(model_dir, seconds):
    """The page's "Whisper (offline, to English)" is generate's translate task, in the language the
    model was fine-tuned for: without them the translation is the transcript again, or a language
    guessed anew for each window."""
    tr = load_transcriber(str(model_dir), language="no", use_ctranslate2=False)
    wave = np.random.default_rng(0).normal(0, 0.1, seconds * SAMPLE_RATE).astype(np.float32)
    for task in ("translate", "transcribe"):
        seen = calls(tr, wave, task=task)
        assert len(seen) == 1 and (seen[0]["task"], seen[0]["language"]) == (task, "no")


def test_pipeline_timestamps(model_dir, long_speech):
    result = load_transcriber(str(model_dir), use_ctranslate2=False).transcribe(long_speech, timestamps=True)
    assert result.segments
    for s in result.segments:
        assert 0 <= s.start <= s.end <= result.audio_seconds and s.text
    assert "-->" in to_srt(result)


def test_long_timestamped_audio_with_a_float16_model(model_dir, long_speech, tmp_path):
    """The long-form path gives the model its features in the model's dtype, as the pipeline does."""
    import torch
    from transformers import WhisperForConditionalGeneration

    half = tmp_path / "half"
    shutil.copytree(model_dir, half)
    WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float16).save_pretrained(half)
    tr = load_transcriber(str(half), use_ctranslate2=False)
    assert tr.pipe.model.dtype == torch.float16
    result = tr.transcribe(long_speech, timestamps=True)
    assert result.audio_seconds > 30 and all(0 <= s.start <= s.end <= result.audio_seconds for s in result.segments)


def assert_cues(segments, audio_seconds):
    """In time order, within the audio, never overlapping, each with text and some length."""
    for s in segments:
        assert 0 <= s.start < s.end <= audio_seconds and s.text == s.text.strip() and s.text
    for before, after in zip(segments, segments[1:]):
        assert before.end <= after.start


def test_segments_that_go_back_in_time_are_made_fit_for_subrip():
    from whisper_ft.transcribe import _pipeline_segments

    # what the pipeline's merger made of a window whose timestamps went back (<|28.18|><|28.18|><|0.00|>)
    chunks = [{"timestamp": (0.0, 27.18), "text": " Jag kommer tillbaka."},
              {"timestamp": (28.18, 28.18), "text": " Vi behöver polisen."},
              {"timestamp": (2.0, 5.0), "text": " Jag kommer tillbaka."},  # the same speech again
              {"timestamp": (26.0, 31.0), "text": " Nej, lägg av."},
              {"timestamp": (31.0, 31.0), "text": " "},
              {"timestamp": (44.0, None), "text": " Vill du inte skjuta?"},
              {"timestamp": (45.5, 46.0), "text": " Det är för mörkt."}]  # past the audio's end
    segments = _pipeline_segments(chunks, 45.0)
    assert segments == [Segment(0.0, 27.18, "Jag kommer tillbaka. Vi behöver polisen."),
                        Segment(27.18, 31.0, "Nej, lägg av."),
                        Segment(44.0, 45.0, "Vill du inte skjuta? Det är för mörkt.")]
    assert_cues(segments, 45.0)
    assert ordered_segments([Segment(0.0, 0.0, "Hej."), Segment(0.0, 2.0, "Hur mår du?")], 3.0) == [
        Segment(0.0, 2.0, "Hej. Hur mår du?")]
    assert ordered_segments([Segment(3.0, 3.0, "Hej.")], 3.0) == [Segment(0.0, 3.0, "Hej.")]


@pytest.mark.slow
@pytest.mark.parametrize("offset", [0, 8])
def test_real_model_long_timestamps_are_ordered_cues(real_model_dir, sentences, tmp_path, offset):
    """About 45 s of Swedish sentences (plus `offset` s of silence first) on the transformers path."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is needed for synthetic speech")
    wave = load_audio(speech_wav(" ".join(sentences[19:40]), tmp_path / "long.wav"))
    wave = np.concatenate([np.zeros(offset * SAMPLE_RATE, np.float32), wave])
    result = load_transcriber(str(real_model_dir), use_ctranslate2=False).transcribe(wave, timestamps=True)
    assert result.audio_seconds > 35 and len(result.segments) >= 8
    assert_cues(result.segments, result.audio_seconds)
    assert max(s.end - s.start for s in result.segments) < 15  # no cue swallowing a window
    assert result.text == " ".join(s.text for s in result.segments)
    assert to_srt(result).count(" --> ") == len(result.segments)


def spoken_sample(first: int, last: int, out) -> tuple[np.ndarray, str]:
    """Lines `first` to `last` (from 1) of data/sample/sv-SE-sentences.txt spoken by espeak-ng in
    one go: (16 kHz wave, the text)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is needed for synthetic speech")
    lines = (ROOT / "data" / "sample" / "sv-SE-sentences.txt").read_text(encoding="utf-8").splitlines()
    text = " ".join(lines[first - 1:last])
    return load_audio(speech_wav(text, out)), text


@pytest.mark.slow
def test_real_model_long_audio_without_timestamps_says_the_overlap_once(real_model_dir, tmp_path):
    """36 s of Swedish, 90 words, on the transformers path without timestamps: joined on a common
    token sequence, the pipeline's two windows gave the four sentences of their overlap twice,
    worded differently (109 words, WER 0.91)."""
    wave, text = spoken_sample(50, 65, tmp_path / "mid.wav")
    result = load_transcriber(str(real_model_dir), use_ctranslate2=False).transcribe(wave)
    assert result.audio_seconds > 30 and result.segments == ()
    assert len(result.text.split()) < 1.1 * len(text.split())
    assert wer_normalized([text], [result.text]) < 0.85  # 0.74 measured with whisper-base


def test_bad_task_is_refused(model_dir):
    tr = load_transcriber(str(model_dir), use_ctranslate2=False)
    with pytest.raises(ValueError, match="task"):
        tr.transcribe(np.zeros(SAMPLE_RATE, np.float32), task="summarise")


def test_ct2_export_is_found_used_and_ignored_when_stale(model_dir, long_speech, tmp_path):
    model = shutil.copytree(model_dir, tmp_path / "model")
    assert ct2.find_export(model) is None
    out = ct2.export(model)
    assert (out / "model.bin").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "preprocessor_config.json").is_file()
    assert not (model / "ct2.tmp").exists()
    assert ct2.find_export(model) == out

    tr = load_transcriber(str(model))
    assert isinstance(tr, CT2Transcriber) and tr.backend == "ctranslate2"
    result = tr.transcribe(long_speech, timestamps=True)
    assert result.audio_seconds == pytest.approx(len(long_speech) / SAMPLE_RATE) and result.elapsed_seconds > 0
    assert isinstance(load_transcriber(str(model), use_ctranslate2=False), PipelineTranscriber)
    import importlib.util

    find_spec = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as mp:  # ctranslate2 installed, faster-whisper not: transformers, not a crash
        mp.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "faster_whisper" else find_spec(name, *a))
        assert isinstance(load_transcriber(str(model)), PipelineTranscriber)

    # copied without the file times (cp -r, scp, a download): the same weights, known by their hash
    copy = shutil.copytree(model, tmp_path / "copy", copy_function=shutil.copyfile)
    later = time.time() + 10
    os.utime(copy / "model.safetensors", (later, later))
    assert ct2.find_export(copy) == copy / "ct2"
    from safetensors.torch import load_file, save_file

    weights = load_file(copy / "model.safetensors")  # retrained: other weights of the same size
    name = next(iter(weights))
    weights[name] = weights[name] + 1
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert (copy / "model.safetensors").stat().st_size == (model / "model.safetensors").stat().st_size
    assert ct2.find_export(copy) is None
    (model / "ct2" / ct2.SOURCE).unlink()  # an export made before the record: judged by the file times
    assert ct2.find_export(model) == model / "ct2"
    os.utime(model / "model.safetensors", (later, later))
    assert ct2.find_export(model) is None


def test_an_export_goes_over_an_interrupted_one_and_force_redoes_a_fresh_one(model_dir, tmp_path):
    """An export killed midway leaves ct2.tmp behind: the next export starts it afresh instead of
    failing on it; and `--force` re-exports even over an export that is up to date."""
    model = shutil.copytree(model_dir, tmp_path / "model")
    (model / "ct2.tmp").mkdir()
    (model / "ct2.tmp" / "model.bin").write_bytes(b"half")
    out = ct2.export(model)
    assert ct2.find_export(model) == out and not (model / "ct2.tmp").exists()
    (out / "marker").write_text("from the first export")
    assert ct2.export(model) == out and (out / "marker").exists()  # up to date: kept as it is
    assert ct2.export(model, force=True) == out and not (out / "marker").exists()
    assert ct2.find_export(model) == out


def test_ct2_export_command(model_dir, tmp_path):
    from whisper_ft.cli import run

    model = shutil.copytree(model_dir, tmp_path / "model")
    assert run(ct2.main, [str(model)]) == 0
    assert (model / "ct2" / "model.bin").is_file()
    assert run(ct2.main, [str(tmp_path / "nothing")]) == 2


@pytest.fixture(scope="module")
def ct2_model(model_dir, tmp_path_factory):
    """The fast tiny model with its CTranslate2 int8 export."""
    model = shutil.copytree(model_dir, tmp_path_factory.mktemp("ct2") / "model")
    ct2.export(model)
    return model


def test_ct2_path_decodes_window_after_window_with_or_without_timestamps(ct2_model, long_speech):
    """faster-whisper's sequential transcription, with timestamps (they say where the next window
    starts) and unconditioned on the text before: its batched pipeline decodes each window once,
    and lost what followed a window that ended early or looped."""
    tr = load_transcriber(str(ct2_model), temperature_fallback=False)  # the random model loops: decode it once
    assert isinstance(tr, CT2Transcriber)
    seen = []
    transcribe = tr.model.transcribe
    tr.model.transcribe = lambda audio, **kwargs: seen.append(kwargs) or transcribe(audio, **kwargs)
    for timestamps, task in ((False, "transcribe"), (True, "translate")):  # translate: Whisper's offline translation
        result = tr.transcribe(long_speech, task=task, timestamps=timestamps)
        assert result.audio_seconds == pytest.approx(len(long_speech) / SAMPLE_RATE)
        assert timestamps or result.segments == ()
    assert [kwargs["task"] for kwargs in seen] == ["transcribe", "translate"]
    for kwargs in seen:
        assert kwargs["condition_on_previous_text"] is False and not kwargs.get("without_timestamps")
        assert kwargs["language"] == "sv" and kwargs["beam_size"] == 5 and kwargs["temperature"] == [0.0]


def test_temperature_fallback_unless_turned_off(ct2_model, looping_model, noise):
    """By default a window is decoded again at rising temperatures when it loops (openai/whisper's
    schedule); app.temperature_fallback false decodes it once (a bounded request time) on either
    path, and the loop is still cut."""
    tr = load_transcriber(str(ct2_model))
    seen = []
    tr.model.transcribe = lambda audio, **kwargs: seen.append(kwargs) or (iter([]), None)
    tr.transcribe(noise)
    assert [kwargs["temperature"] for kwargs in seen] == [[0.0, *FALLBACK_TEMPERATURES]]
    once = PipelineTranscriber(*looping_model, temperatures=())
    unchecked = PipelineTranscriber(*looping_model, compression_ratio_threshold=None).transcribe(noise).text
    text = once.transcribe(noise).text
    assert text and unchecked.startswith(text) and len(text) < len(unchecked) // 4  # the greedy decode, cut


def faster_segment(start: float, end: float, text: str):
    """A segment as faster-whisper's transcribe yields it."""
    from faster_whisper.transcribe import Segment as FasterSegment

    return FasterSegment(id=0, seek=0, start=start, end=end, text=text, tokens=[], avg_logprob=-0.2,
                         compression_ratio=1.0, no_speech_prob=0.0, words=None, temperature=0.0)


def test_ct2_cues_are_made_fit_for_subrip(ct2_model):
    """faster-whisper's timestamps as they came on real audio: a 0.1 s clip got a cue to 2 s, and
    a window's last cue may end past the audio or overlap the next window's first."""
    segment = faster_segment
    decoded = [segment(0.0, 2.0, " Hej.")]
    tr = load_transcriber(str(ct2_model))
    tr.model.transcribe = lambda audio, **kwargs: (iter(decoded), None)  # what the model decodes next
    result = tr.transcribe(np.zeros(SAMPLE_RATE // 10, np.float32), timestamps=True)
    assert result.segments == (Segment(0.0, 0.1, "Hej."),) and result.text == "Hej."
    decoded = [segment(0.0, 28.0, " Jag kommer tillbaka."), segment(27.5, 31.0, " Nej, lägg av."),
               segment(2.0, 5.0, " Jag kommer tillbaka."), segment(31.0, 31.0, " Vi behöver polisen."),
               segment(31.0, 33.0, " "), segment(44.0, 46.0, " Vill du inte skjuta?")]
    result = tr.transcribe(np.zeros(45 * SAMPLE_RATE, np.float32), timestamps=True)
    assert result.segments == (Segment(0.0, 28.0, "Jag kommer tillbaka."),
                               Segment(28.0, 31.0, "Nej, lägg av. Vi behöver polisen."),
                               Segment(44.0, 45.0, "Vill du inte skjuta?"))
    assert_cues(result.segments, 45.0)
    assert result.text == "Jag kommer tillbaka. Nej, lägg av. Vi behöver polisen. Vill du inte skjuta?"


@pytest.fixture(scope="module")
def real_ct2_model(real_model_dir, tmp_path_factory):
    """The real checkpoint (as links to its files) with its CTranslate2 int8 export."""
    from bench.bench_inference import link_model

    model = link_model(real_model_dir, tmp_path_factory.mktemp("real"))
    ct2.export(model)
    return model


@pytest.mark.slow
def test_real_model_ct2_path_transcribes_all_the_speech(real_ct2_model, tmp_path):
    """36 s of Swedish, 90 words in 16 sentences, on the CTranslate2 path: faster-whisper's batched
    pipeline put 0 to 28 s into one window, which looped (37 words kept) or, with timestamps, ended
    after 8 s of speech (31 words, nothing from 8 to 28 s)."""
    wave, text = spoken_sample(50, 65, tmp_path / "mid.wav")
    tr = load_transcriber(str(real_ct2_model), cpu_threads=2)
    plain, timed = tr.transcribe(wave), tr.transcribe(wave, timestamps=True)
    for result in (plain, timed):
        assert len(result.text.split()) > 0.7 * len(text.split()), result.text  # 74 with whisper-base
    assert_cues(timed.segments, timed.audio_seconds)
    assert timed.segments[0].start < 1 and timed.segments[-1].end > timed.audio_seconds - 1
    assert max(after.start - before.end for before, after in zip(timed.segments, timed.segments[1:])) < 2


@pytest.fixture(scope="module")
def tokenizer(processor_dir):
    return load_processor(str(processor_dir)).tokenizer


def test_compression_ratio_is_openai_whispers_and_flags_loops(sentences):
    loop = "Det regnar idag." + " och" * 60
    assert compression_ratio(loop) == len(loop.encode()) / len(zlib.compress(loop.encode()))
    assert compression_ratio(loop) > COMPRESSION_RATIO_THRESHOLD
    assert compression_ratio("Jag bor i Stockholm. " * 8) > COMPRESSION_RATIO_THRESHOLD
    for i in range(0, len(sentences), 10):  # about a 30 s window of normal Swedish each
        assert compression_ratio(" ".join(sentences[i:i + 10])) < COMPRESSION_RATIO_THRESHOLD
    assert compression_ratio("") == 0.0


def test_cut_loop_keeps_the_text_up_to_where_the_loop_starts(sentences, tokenizer):
    assert cut_loop("Det regnar idag och och och och och och och och") == "Det regnar idag och"
    # the loop starts at the first character that repeats, here the "." of "Hej."
    assert cut_loop("Hej. Jag bor i Stockholm. Jag bor i Stockholm. Jag bor i Stockholm. Jag bor i Sto"
                    "ckholm. Jag bor i") == "Hej. Jag bor i Stockholm"
    assert cut_loop([5, 6, 7, 8, 9, 8, 9, 8, 9, 8, 9, 8]) == [5, 6, 7, 8, 9]
    assert find_loop("ja ja ja och nej") is None  # three in a row is speech, not a loop
    # the loop that runs to the end is cut, not an earlier "000000" in a number
    speech = "Priset var 1000000 kronor och sedan gick vi hem till mormor för att äta middag. "
    assert cut_loop(speech + "Tack för att ni tittade. " * 12) == speech + "Tack för att ni tittade"
    for i in range(0, len(sentences), 10):  # about a 30 s window of normal Swedish each
        text = " ".join(sentences[i:i + 10])
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert cut_loop(text) == text and cut_loop(ids) == ids


def test_looping_windows_are_cut_in_the_text_not_the_timestamps(tokenizer):
    import torch

    def text(s):
        return tokenizer(s, add_special_tokens=False).input_ids

    prefix = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|sv|>", "<|transcribe|>", "<|0.00|>"])
    eot, t1 = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|1.00|>"])
    hej, och = text("Hej"), text(" och")
    looping = prefix + hej + (och + [t1, t1]) * 30  # a loop with timestamps between its copies
    normal = prefix + text(" Jag bor i Stockholm.") + [t1, eot]
    tokens = torch.tensor([looping, normal + [eot] * (len(looping) - len(normal))])
    out = cut_looping_windows(tokens, tokenizer)
    assert out.shape == tokens.shape
    assert out[0].tolist() == prefix + hej + och + [eot] * (len(looping) - len(prefix + hej + och))
    assert tokenizer.decode(out[0], skip_special_tokens=True) == "Hej och"
    assert torch.equal(out[1], tokens[1])


@pytest.fixture(scope="module")
def looping_model(tiny_model_dir):
    """The tiny random model with room for 48 tokens a window: greedy decoding of random weights loops."""
    model = load_model(str(tiny_model_dir)).eval()
    model.generation_config.max_length = 48
    return model, load_processor(str(tiny_model_dir))


@pytest.fixture(scope="module")
def noise():
    """Four seconds of noise: the random model loops on any audio."""
    return np.random.default_rng(0).normal(0, 0.1, 4 * SAMPLE_RATE).astype(np.float32)


def test_a_looping_window_is_decoded_again_at_higher_temperatures(looping_model, noise):
    import torch

    unchecked = PipelineTranscriber(*looping_model, compression_ratio_threshold=None).transcribe(noise).text
    assert LOOP.search(unchecked)  # what the window gives without the check
    torch.manual_seed(0)
    text = PipelineTranscriber(*looping_model).transcribe(noise).text
    assert text and not LOOP.search(text)
    assert compression_ratio(text) < COMPRESSION_RATIO_THRESHOLD
    assert not unchecked.startswith(text)  # a new decode (sampled), not the greedy one cut


def test_a_window_that_loops_at_every_temperature_is_cut(looping_model, noise):
    import torch

    unchecked = PipelineTranscriber(*looping_model, compression_ratio_threshold=None).transcribe(noise).text
    torch.manual_seed(0)
    # at temperature 0.01 sampling is as good as greedy, so the fallback loops again
    text = PipelineTranscriber(*looping_model, temperatures=(0.01,)).transcribe(noise).text
    assert text and not LOOP.search(text)
    assert unchecked.startswith(text) and len(text) < len(unchecked) // 4


def test_a_looping_ct2_segment_is_cut_and_normal_text_kept():
    from whisper_ft.transcribe import cut_looping_text

    looping = "Jag vet inte vad det är. " + "och " * 100
    assert cut_looping_text(looping) == "Jag vet inte vad det är. och"
    normal = "Hon fick bra betyg för att hon pluggade på kvällen."
    assert cut_looping_text(normal) == normal


def test_a_window_that_loops_at_every_temperature_is_cut_on_either_path(model_dir, ct2_model):
    """faster-whisper, and transformers' long-form generation, give a window that loops at every
    temperature as it came (up to the token cap): the visitor gets it cut where the loop starts."""
    import torch

    looping = " Jag vet inte vad det är." + " och" * 100
    tr = load_transcriber(str(ct2_model))
    tr.model.transcribe = lambda audio, **kwargs: (iter([faster_segment(0.0, 4.0, looping)]), None)
    assert tr.transcribe(np.zeros(4 * SAMPLE_RATE, np.float32)).text == "Jag vet inte vad det är. och"
    tr = load_transcriber(str(model_dir), use_ctranslate2=False)
    ids = torch.tensor(tr.pipe.tokenizer(looping, add_special_tokens=False).input_ids)
    windows = [{"tokens": ids, "start": torch.tensor(0.0), "end": torch.tensor(28.0)},
               {"tokens": ids, "start": torch.tensor(28.0), "end": torch.tensor(35.0)}]
    tr.pipe.model.generate = lambda *args, **kwargs: {"segments": [windows]}  # what the windows decoded to
    result = tr.transcribe(np.zeros(35 * SAMPLE_RATE, np.float32), timestamps=True)
    assert [s.text for s in result.segments] == ["Jag vet inte vad det är. och"] * 2


def test_transformers_path_decodes_greedily_whatever_the_beam(tiny_model_dir):
    from whisper_ft.transcribe import PipelineTranscriber, load_transcriber

    transcriber = load_transcriber(str(tiny_model_dir), beam_size=5, use_ctranslate2=False)
    assert isinstance(transcriber, PipelineTranscriber) and transcriber.beam_size == 1


def test_the_app_runs_a_hub_models_ctranslate2_export(ct2_model, tmp_path, monkeypatch):
    """`--model USER/NAME` as the Space serves it: from the Hugging Face cache, with its export
    (downloaded files have new times: the export is known by the hash of the weights)."""
    from huggingface_hub import constants

    from whisper_ft.config import load_config
    from whisper_ft.transcribe import load_app_transcriber

    repo = tmp_path / "hub" / "models--me--sv"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(ct2_model, repo / "snapshots" / ("0" * 40), copy_function=shutil.copyfile)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = load_config(None, ["app.temperature_fallback=false"])
    transcriber = load_app_transcriber("me/sv", cfg)
    assert isinstance(transcriber, CT2Transcriber) and transcriber.backend == "ctranslate2"


def test_the_app_loads_the_backend_beam_and_fallback_its_settings_name(ct2_model):
    """app.use_ctranslate2, app.beam_size and app.temperature_fallback as the operator set them: an
    operator who turns the export off, narrows the beam or bounds the request time by decoding each
    window once would otherwise get the defaults."""
    from whisper_ft.config import load_config
    from whisper_ft.transcribe import load_app_transcriber

    def loaded(*overrides):
        return load_app_transcriber(str(ct2_model), load_config(None, list(overrides)), device="cpu")

    tr = loaded("app.beam_size=2", "app.temperature_fallback=false")
    assert isinstance(tr, CT2Transcriber) and tr.beam_size == 2 and tr.temperatures == ()
    tr = loaded()
    assert isinstance(tr, CT2Transcriber) and tr.beam_size == 5 and tr.temperatures == FALLBACK_TEMPERATURES
    tr = loaded("app.use_ctranslate2=false", "app.temperature_fallback=false")
    assert isinstance(tr, PipelineTranscriber) and tr.temperatures == ()


def test_the_app_transcribes_in_the_language_the_model_was_fine_tuned_for(tiny_model_dir, tmp_path):
    """A model trained here for Norwegian carries `no` in its generation config: the app decodes
    and translates from `no` whatever model.language says; a model without one takes model.language."""
    from whisper_ft.app import Handlers
    from whisper_ft.config import load_config
    from whisper_ft.model import own_language
    from whisper_ft.transcribe import load_app_transcriber

    norwegian = tmp_path / "no"
    shutil.copytree(tiny_model_dir, norwegian)
    gen = json.loads((norwegian / "generation_config.json").read_text())
    (norwegian / "generation_config.json").write_text(json.dumps({**gen, "language": "no", "task": "transcribe"}))
    cfg = load_config(None, ["app.use_ctranslate2=false", "model.language=sv"])
    assert own_language(norwegian) == "no" and own_language(tiny_model_dir) is None
    transcriber = load_app_transcriber(str(norwegian), cfg)
    assert transcriber.language == "no" and Handlers(transcriber, cfg, tmp_path / "out").language == "no"
    assert load_app_transcriber(str(tiny_model_dir), cfg).language == "sv"
    (norwegian / "generation_config.json").write_text(json.dumps({**gen, "language": "<|da|>"}))
    assert own_language(norwegian) == "da"


def test_app_device_is_the_gpu_torch_sees_else_the_cpu(monkeypatch):
    import torch

    from whisper_ft.errors import UserError
    from whisper_ft.transcribe import app_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert app_device("auto") == "cpu" and app_device("cpu") == "cpu"
    with pytest.raises(UserError, match=r"^app\.device is cuda, but torch \(.*\) sees no CUDA GPU: use auto or cpu"):
        app_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert app_device("auto") == "cuda" and app_device("cuda:1") == "cuda:1" and app_device("cpu") == "cpu"
    with pytest.raises(UserError, match=r"sees 2 CUDA GPU\(s\), cuda:0 to cuda:1$"):
        app_device("cuda:2")


def test_on_a_gpu_the_app_runs_transformers_in_float16_even_beside_an_export(ct2_model, monkeypatch):
    """The CTranslate2 int8 export is the CPU path: on a GPU the transformers model runs there, in
    float16. (The model's move to the GPU is recorded here instead of made.)"""
    import torch

    moved = []

    def to(self, *args, **kwargs):
        if args and args[0] == "cuda:1":
            moved.append(args[0])
            return self
        return original_to(self, *args, **kwargs)

    original_to = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", to)
    tr = load_transcriber(str(ct2_model), temperature_fallback=False, device="cuda:1")
    assert isinstance(tr, PipelineTranscriber) and moved == ["cuda:1"] and tr.beam_size == 1
    assert tr.pipe.model.dtype == torch.float16 and not tr.pipe.model.training
    result = tr.transcribe(np.zeros(SAMPLE_RATE, np.float32))
    assert result.audio_seconds == 1.0
    assert isinstance(load_transcriber(str(ct2_model), device="cpu"), CT2Transcriber)

    # The page and the log say where it runs. The model above stays on the CPU, so the label is
    # checked on a stand-in that reports the GPU, with the pipeline it is handed to recorded, not built.
    from types import SimpleNamespace

    import transformers

    handed = []
    monkeypatch.setattr(transformers, "pipeline", lambda *args, **kwargs: handed.append(kwargs))
    on_gpu = SimpleNamespace(device=torch.device("cuda:1"), dtype=torch.float16)
    processor = SimpleNamespace(tokenizer=tr.pipe.tokenizer, feature_extractor=tr.pipe.feature_extractor)
    assert PipelineTranscriber(on_gpu, processor).backend == "transformers on cuda:1, float16"
    assert handed[0]["model"] is on_gpu and handed[0]["device"] == torch.device("cuda:1")
