"""Long-form transcription: chunked and batched windows, timestamps, .txt/.srt, CTranslate2 export."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest

from app_helpers import fast_model, speech_wav
from whisper_ft import ct2
from whisper_ft.audio import SAMPLE_RATE, load_audio
from whisper_ft.transcribe import (CT2Transcriber, PipelineTranscriber, Segment, Transcript, load_transcriber,
                                   to_srt, to_txt)

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("ffmpeg") is None,
                                reason="espeak-ng and ffmpeg are needed for synthetic speech")


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    return fast_model(tiny_model_dir, tmp_path_factory.mktemp("fast-whisper"))


@pytest.fixture(scope="module")
def long_speech(tmp_path_factory):
    """About 36 s of Swedish speech: longer than one 30 s window."""
    path = speech_wav("Hej, jag heter Anna och jag bor i Stockholm. Det regnar idag.",
                      tmp_path_factory.mktemp("speech") / "long.wav", repeat=8)
    return load_audio(path)


def test_srt_and_txt_writers():
    t = Transcript("Hej. Hur mår du?", (Segment(0.0, 1.5, "Hej."), Segment(61.25, 3725.5, "Hur mår du?")), 3726.0, 10.0)
    assert to_srt(t) == ("1\n00:00:00,000 --> 00:00:01,500\nHej.\n\n"
                         "2\n00:01:01,250 --> 01:02:05,500\nHur mår du?\n")
    assert to_txt(t) == "[00:00 - 00:01] Hej.\n[01:01 - 1:02:05] Hur mår du?\n"
    plain = Transcript("Hej.", (), 2.0, 1.0)
    assert to_txt(plain) == "Hej.\n"
    assert to_srt(plain) == "1\n00:00:00,000 --> 00:00:02,000\nHej.\n"
    assert plain.rtf == 0.5
    assert Transcript("", (), 0.0, 1.0).rtf == 0.0


def test_pipeline_transcribes_long_audio_in_batched_windows(model_dir, long_speech):
    tr = load_transcriber(str(model_dir), use_ctranslate2=False, batch_size=8)
    assert isinstance(tr, PipelineTranscriber)
    batches = []
    generate = tr.pipe.model.generate

    def spy(*args, **kwargs):
        features = kwargs.get("input_features", args[0] if args else None)
        batches.append(features.shape[0])
        return generate(*args, **kwargs)

    tr.pipe.model.generate = spy
    result = tr.transcribe(long_speech)
    assert batches == [2]  # 36 s with 30 s windows and 5 s stride: two windows in one batch
    assert result.text and result.text == result.text.strip()
    assert result.audio_seconds == pytest.approx(len(long_speech) / SAMPLE_RATE)
    assert 0 < result.rtf < 5 and result.segments == ()


def test_pipeline_timestamps(model_dir, long_speech):
    result = load_transcriber(str(model_dir), use_ctranslate2=False).transcribe(long_speech, timestamps=True)
    assert result.segments
    for s in result.segments:
        assert 0 <= s.start <= s.end <= result.audio_seconds and s.text
    assert "-->" in to_srt(result)


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

    later = time.time() + 10
    os.utime(model / "model.safetensors", (later, later))  # weights retrained after the export
    assert ct2.find_export(model) is None


def test_ct2_export_command(model_dir, tmp_path):
    from whisper_ft.cli import run

    model = shutil.copytree(model_dir, tmp_path / "model")
    assert run(ct2.main, [str(model)]) == 0
    assert (model / "ct2" / "model.bin").is_file()
    assert run(ct2.main, [str(tmp_path / "nothing")]) == 2
