"""Long-form transcription shared by the app and the benchmark.

Two backends behind one `transcribe(wave, task, timestamps)` call, both taking mono float32
16 kHz audio (see `whisper_ft.audio`) of any length:

- `PipelineTranscriber`: transformers, the reference path. Audio of one window goes through
  the ASR pipeline; longer audio through Whisper's own sequential long-form generation, each
  window starting where the last one's speech ended, with timestamps or without. A window
  that loops ("och och och ...") is decoded again at rising temperatures, and cut where its
  loop starts if every try loops.
- `CT2Transcriber`: a CTranslate2 int8 export (see `whisper_ft.ct2`) run by faster-whisper's
  sequential transcription, one 30 s window after another as above, with its own temperature
  fallback. The fast CPU path; on a GPU (`app_device`) the app runs the transformers path.

`to_srt` / `to_txt` write the result; `Transcript.rtf` is processing time over audio time.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from whisper_ft.audio import N_SAMPLES, SAMPLE_RATE

log = logging.getLogger(__name__)

TASKS = ("transcribe", "translate")

# A window whose text compresses more than this is a loop (openai/whisper's default, on the text's bytes).
COMPRESSION_RATIO_THRESHOLD = 2.4
# transformers measures the ratio on token ids instead, where it documents 1.35 (normal Swedish windows
# measure under 1.1 there, loops over 1.5).
TOKEN_COMPRESSION_RATIO_THRESHOLD = 1.35
# Temperatures tried, in order, after the greedy (or beam) decode of a window that loops (openai/whisper's).
FALLBACK_TEMPERATURES = (0.2, 0.4, 0.6, 0.8, 1.0)
# A unit (token, word, phrase) repeated this many times in a row is where a loop starts.
MIN_LOOP_REPEATS = 4


@dataclass(frozen=True)
class Segment:
    start: float  # seconds
    end: float  # seconds
    text: str


@dataclass(frozen=True)
class Transcript:
    text: str
    segments: tuple[Segment, ...] = field(default_factory=tuple)
    audio_seconds: float = 0.0
    elapsed_seconds: float = 0.0

    @property
    def rtf(self) -> float:
        """Real-time factor: seconds of processing per second of audio (below 1 is faster than real time)."""
        return self.elapsed_seconds / self.audio_seconds if self.audio_seconds > 0 else 0.0


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def compression_ratio(text: str) -> float:
    """Bytes of `text` over bytes of its zlib compression, as openai/whisper computes it; loops score high.
    (transformers' own ratio is private and measured on token ids, not on the text.)"""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def find_loop(seq: Sequence, min_repeats: int = MIN_LOOP_REPEATS) -> tuple[int, int] | None:
    """(start, period) of the longest run in `seq` (tokens or a string) where a unit of `period`
    items repeats at least `min_repeats` times in a row, or None; among equally long runs the
    earliest, with the shortest unit. The longest, not the first: a loop that ran to the token
    cap outweighs a "1000000" earlier in the text."""
    best = None  # (items covered, -start, -period)
    for period in range(1, len(seq) // min_repeats + 1):
        need = period * (min_repeats - 1)  # positions in a row where seq[i] == seq[i + period]
        run = 0
        for i in range(len(seq) - period + 1):
            if i < len(seq) - period and seq[i] == seq[i + period]:
                run += 1
                continue
            if run >= need:
                key = (run + period, run - i, -period)
                best = key if best is None or key > best else best
            run = 0
    return None if best is None else (-best[1], -best[2])


def cut_loop(seq: Sequence, min_repeats: int = MIN_LOOP_REPEATS) -> Sequence:
    """`seq` up to where its loop (`find_loop`) starts, keeping one copy of the repeated unit
    (hand-written: openai/whisper, faster-whisper and transformers return a loop as it is)."""
    loop = find_loop(seq, min_repeats)
    return seq if loop is None else seq[:loop[0] + loop[1]]


def cut_looping_text(text: str, threshold: float = COMPRESSION_RATIO_THRESHOLD) -> str:
    """`text` cut where its loop starts when it compresses more than `threshold`, else as it is."""
    return cut_loop(text) if compression_ratio(text) > threshold else text


def cut_looping_windows(tokens, tokenizer, threshold: float = COMPRESSION_RATIO_THRESHOLD):
    """Generated windows (batch x tokens, padded with the end token) with each window whose text
    compresses over `threshold` cut where its loop starts; the others unchanged."""
    import torch

    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    rows = []
    for ids in tokens.tolist():
        text_at = [i for i, t in enumerate(ids) if t < eot]  # the loop is found in the text, not the timestamps
        text_ids = [ids[i] for i in text_at]
        if compression_ratio(tokenizer.decode(text_ids)) > threshold:
            kept = len(cut_loop(text_ids))
            if kept < len(text_ids):
                log.info("a window still loops: kept %d of its %d text tokens", kept, len(text_ids))
                ids = ids[:text_at[kept - 1] + 1]
        rows.append(ids + [eot] * (tokens.shape[1] - len(ids)))
    return torch.tensor(rows, dtype=tokens.dtype, device=tokens.device)


class LoopCutMixin:
    """Mixed into transformers' ASR pipeline: when every fallback temperature still loops, generate
    keeps the last try as it is (up to the token cap), so its windows are cut here, one batch at a time."""

    compression_ratio_threshold: float | None = None

    def _forward(self, model_inputs, **kwargs):
        out = super()._forward(model_inputs, **kwargs)
        if self.compression_ratio_threshold is not None:
            out["tokens"] = cut_looping_windows(out["tokens"], self.tokenizer, self.compression_ratio_threshold)
        return out


class PipelineTranscriber:
    """Transcription with transformers (reference path): the ASR pipeline for one window,
    `generate`'s sequential long-form decoding for longer audio.

    A window that loops is decoded again by transformers' own temperature fallback: sampling at each
    of `temperatures` in turn, it keeps the first try whose token ids compress less than
    TOKEN_COMPRESSION_RATIO_THRESHOLD. A window whose text still compresses more than
    `compression_ratio_threshold` is cut where its loop starts. None turns both off."""

    backend = "transformers"

    def __init__(self, model, processor, language: str = "sv", beam_size: int = 1,
                 temperatures: tuple[float, ...] = FALLBACK_TEMPERATURES,
                 compression_ratio_threshold: float | None = COMPRESSION_RATIO_THRESHOLD):
        from transformers import AutomaticSpeechRecognitionPipeline, pipeline

        self.language = language
        self.beam_size = beam_size
        self.temperatures = tuple(temperatures)
        self.compression_ratio_threshold = compression_ratio_threshold
        pipeline_class = type("LoopCuttingASRPipeline", (LoopCutMixin, AutomaticSpeechRecognitionPipeline),
                              {"compression_ratio_threshold": compression_ratio_threshold})
        if model.device.type != "cpu":  # the page and the log say where it runs
            self.backend = f"transformers on {model.device}, {str(model.dtype).removeprefix('torch.')}"
        self.pipe = pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                             feature_extractor=processor.feature_extractor, device=model.device,
                             pipeline_class=pipeline_class)

    def _generate_kwargs(self, task: str) -> dict:
        kwargs = {"language": self.language, "task": task, "num_beams": self.beam_size}
        if self.compression_ratio_threshold is not None and self.temperatures:
            # Whisper's generate does the fallback per window of a batch, short-form windows included.
            kwargs.update(temperature=(0.0, *self.temperatures),
                          compression_ratio_threshold=TOKEN_COMPRESSION_RATIO_THRESHOLD)
        return kwargs

    def transcribe(self, wave: np.ndarray, task: str = "transcribe", timestamps: bool = False) -> Transcript:
        _check_task(task)
        start = time.perf_counter()
        wave = np.asarray(wave, dtype=np.float32)
        audio_seconds = len(wave) / SAMPLE_RATE
        if len(wave) > N_SAMPLES:
            # Long-form decoding whether or not timestamps are shown: the pipeline's overlapping
            # windows are joined on a common token sequence, which fails when two windows word the
            # overlap differently (its speech came out twice, 109 words for 90 spoken)
            segments = self._long_form_segments(wave, task, audio_seconds)
            return Transcript(" ".join(s.text for s in segments), segments if timestamps else (), audio_seconds,
                              time.perf_counter() - start)
        out = self.pipe({"raw": wave, "sampling_rate": SAMPLE_RATE}, return_timestamps=timestamps,
                        generate_kwargs=self._generate_kwargs(task))
        segments = tuple(_pipeline_segments(out.get("chunks", []), audio_seconds)) if timestamps else ()
        return Transcript(out["text"].strip(), segments, audio_seconds, time.perf_counter() - start)

    def _long_form_segments(self, wave: np.ndarray, task: str, audio_seconds: float) -> tuple[Segment, ...]:
        """Timestamped segments of audio over one window from generate's sequential long-form
        decoding (what transformers recommends for Whisper). The pipeline's windows overlap, and
        its merger folds a window whose timestamps go back (`<|28.18|><|28.18|><|0.00|>...`) into
        one cue (a 27 s first cue, zero-length cues, cues going back in time), and joins windows
        that word their overlap differently with its text twice."""
        import torch

        features = self.pipe.feature_extractor(wave, sampling_rate=SAMPLE_RATE, truncation=False, padding="longest",
                                               return_attention_mask=True, return_tensors="pt")
        model = self.pipe.model
        with torch.inference_mode():  # the features in the model's dtype (a float16 model, say), as the pipeline does
            out = model.generate(features.input_features.to(model.device, model.dtype),
                                 attention_mask=features.attention_mask.to(model.device),
                                 return_timestamps=True, return_segments=True, **self._generate_kwargs(task))
        tokenizer = self.pipe.tokenizer
        raw = []
        for seg in out["segments"][0]:
            text = tokenizer.decode(seg["tokens"], skip_special_tokens=True).strip()
            if self.compression_ratio_threshold is not None:  # every temperature may still loop
                text = cut_looping_text(text, self.compression_ratio_threshold)
            raw.append(Segment(float(seg["start"]), float(seg["end"]), text))
        return tuple(ordered_segments(raw, audio_seconds))


def _pipeline_segments(chunks: list[dict], audio_seconds: float) -> list[Segment]:
    segments = []
    for c in chunks:
        begin, end = c["timestamp"]
        end = end if end is not None else audio_seconds  # the last segment may lack an end
        segments.append(Segment(float(begin or 0.0), float(end), c["text"].strip()))
    return ordered_segments(segments, audio_seconds)


def ordered_segments(segments: Sequence[Segment], audio_seconds: float) -> list[Segment]:
    """Cues fit for SubRip: within the audio, in time order, never overlapping, none empty or of
    zero length. A segment that lies wholly in time already covered is a second decoding of that
    speech and is dropped; one that starts inside the previous cue starts where it ends; text
    left with no time of its own (a zero-length segment) joins the previous cue, or the next."""
    out: list[Segment] = []
    pending = ""  # text of zero-length segments before the first cue
    for s in segments:
        covered = out[-1].end if out else 0.0
        start = min(max(s.start, covered), audio_seconds)  # a window's timestamps can overrun the audio's end
        end = min(max(s.end, start), audio_seconds)
        if not s.text:
            continue
        if out and s.end <= covered and s.start < covered:
            continue  # wholly inside earlier time: the same speech again
        if end > start:
            out.append(Segment(start, end, f"{pending} {s.text}".strip()))
            pending = ""
        elif out:
            out[-1] = Segment(out[-1].start, out[-1].end, f"{out[-1].text} {s.text}")
        else:
            pending = f"{pending} {s.text}".strip()
    if pending:  # no segment had any length: one cue over the audio
        out.append(Segment(0.0, audio_seconds, pending))
    return out


class CT2Transcriber:
    """Transcription of a CTranslate2 export with faster-whisper's sequential `transcribe` (fast
    CPU path): each 30 s window starts where the last one's speech ended, and a window that loops
    or that the model is unsure of is decoded again at rising temperatures (openai/whisper's
    checks). No window is conditioned on the text before it, so a loop cannot carry over into the
    next. A segment whose text still compresses more than COMPRESSION_RATIO_THRESHOLD is cut
    where its loop starts."""

    backend = "ctranslate2"

    def __init__(self, ct2_dir: str | Path, language: str = "sv", beam_size: int = 5, compute_type: str = "int8",
                 cpu_threads: int = 0, temperatures: tuple[float, ...] = FALLBACK_TEMPERATURES):
        from faster_whisper import WhisperModel

        self.language = language
        self.beam_size = beam_size
        self.temperatures = tuple(temperatures)
        self.model = WhisperModel(str(ct2_dir), device="cpu", compute_type=compute_type,
                                  cpu_threads=cpu_threads or (os.cpu_count() or 1), local_files_only=True)

    def transcribe(self, wave: np.ndarray, task: str = "transcribe", timestamps: bool = False) -> Transcript:
        _check_task(task)
        start = time.perf_counter()
        # Sequential, with timestamps whether or not they are shown (they say where the next window
        # starts): faster-whisper's batched pipeline decodes each window once, at one temperature,
        # and lost what followed a window that ended early or looped (20 of 36 s of speech)
        segs, _info = self.model.transcribe(np.asarray(wave, dtype=np.float32), language=self.language, task=task,
                                            beam_size=self.beam_size, temperature=[0.0, *self.temperatures],
                                            condition_on_previous_text=False)
        audio_seconds = len(wave) / SAMPLE_RATE
        # faster-whisper's timestamps can run past the audio's end (a 0.1 s clip got a cue to 2 s)
        segments = tuple(ordered_segments([Segment(float(s.start), float(s.end), cut_looping_text(s.text.strip()))
                                           for s in segs], audio_seconds))
        text = " ".join(s.text for s in segments)
        return Transcript(text, segments if timestamps else (), audio_seconds, time.perf_counter() - start)


def app_device(setting: str) -> str:
    """The torch device `app.device` names: `auto` is the first CUDA GPU torch sees, else the CPU.
    UserError for a GPU that torch does not see (a CPU build of torch, no driver, another index)."""
    import torch

    from whisper_ft.errors import UserError

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cpu":
        return setting
    index = int(setting.partition(":")[2] or 0)
    if not torch.cuda.is_available():
        build = "a CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise UserError(f"app.device is {setting}, but torch ({torch.__version__}, {build}) sees no CUDA GPU: "
                        "use auto or cpu (--device cpu)")
    if index >= torch.cuda.device_count():
        raise UserError(f"app.device is {setting}, but torch sees {torch.cuda.device_count()} CUDA GPU(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return setting


def load_transcriber(model_dir: str, language: str = "sv", use_ctranslate2: bool = True, beam_size: int = 5,
                     cpu_threads: int = 0, temperature_fallback: bool = True, device: str = "cpu"):
    """On the CPU, the CTranslate2 path when `use_ctranslate2` and an up-to-date export sits in
    `<model_dir>/ct2`; else, and on a GPU (`device` "cuda" or "cuda:N", float16 weights), the
    transformers pipeline on `model_dir` (a folder or hub id), which decodes greedily whatever
    `beam_size` says. `cpu_threads` is for CTranslate2 (0: all cores); torch takes its own
    `torch.set_num_threads`. Without `temperature_fallback` each window is decoded once (a loop
    is still cut where it starts)."""
    temperatures = FALLBACK_TEMPERATURES if temperature_fallback else ()
    from whisper_ft import ct2
    from whisper_ft.model import load_model, load_processor

    on_cpu = device == "cpu"
    export = ct2.find_export(model_dir) if use_ctranslate2 and on_cpu else None
    if export is not None and importlib.util.find_spec("faster_whisper") is None:
        log.warning("%s holds a CTranslate2 export, but faster-whisper is not installed (pip install faster-whisper): "
                    "using transformers", model_dir)
        export = None
    if export is not None:
        log.info("using the CTranslate2 int8 export at %s", export)
        return CT2Transcriber(export, language=language, beam_size=beam_size, cpu_threads=cpu_threads,
                              temperatures=temperatures)
    if not on_cpu:
        log.info("on %s: transformers with float16 weights (the CTranslate2 export is the CPU path)", device)
    elif use_ctranslate2 and Path(model_dir).is_dir():
        log.info("no CTranslate2 export in %s; using transformers. For the faster CPU path run: "
                 "python -m whisper_ft.ct2 %s", model_dir, model_dir)
    processor = load_processor(model_dir, language=language)
    if on_cpu:
        model = load_model(model_dir, language=language)
    else:
        import torch

        model = load_model(model_dir, language=language, dtype=torch.float16).to(device)
    if beam_size > 1:  # measured at about 4 s per token for 8 windows on 2 cores (docs/app.md)
        log.info("beam search on the transformers path reorders the whole cache at every token: decoding greedily%s",
                 f" (export to CTranslate2 for beam {beam_size})" if on_cpu else "")
    return PipelineTranscriber(model.eval(), processor, language, beam_size=1, temperatures=temperatures)


def load_app_transcriber(model_dir: str | Path, cfg, device: str | None = None):
    """The transcriber `inference_app.py` runs on `model_dir`, as cfg's model and app settings
    say (`device` for app.device); the served model's scores after training use the same, on the
    CPU. A hub id is downloaded (or found in the Hugging Face cache) with its CTranslate2 export,
    as a Space does. The language is the one the model was fine-tuned for (its generation
    config's); model.language for a model without one (a base model)."""
    from whisper_ft.hub import local_model
    from whisper_ft.model import own_language

    app = cfg.app
    device = app_device(device or app.device)  # before a download: a GPU torch does not see is refused at once
    path = local_model(str(model_dir))
    language = own_language(path) or cfg.model.language
    if language != cfg.model.language:
        log.info("%s was fine-tuned for language %s (its generation config): transcribing %s, not model.language %s",
                 model_dir, language, language, cfg.model.language)
    return load_transcriber(path, language, app.use_ctranslate2, app.beam_size,
                            temperature_fallback=app.temperature_fallback, device=device)


def _srt_time(seconds: float) -> str:
    ms = int(round(max(seconds, 0.0) * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def to_srt(transcript: Transcript) -> str:
    """SubRip text; without timestamped segments the whole text is one cue over the audio. A
    segment without text gets no cue (SubRip has no empty cue): no text, no cues."""
    segments = transcript.segments or (Segment(0.0, transcript.audio_seconds, transcript.text),)
    segments = [s for s in segments if s.text.strip()]
    cues = [f"{i}\n{_srt_time(s.start)} --> {_srt_time(s.end)}\n{s.text}\n" for i, s in enumerate(segments, 1)]
    return "\n".join(cues)


def to_txt(transcript: Transcript) -> str:
    """Plain text; with timestamps one `[mm:ss - mm:ss] text` line per segment."""
    if not transcript.segments:
        return transcript.text + "\n"
    return "".join(f"[{_clock(s.start)} - {_clock(s.end)}] {s.text}\n" for s in transcript.segments)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m:02d}:{s:02d}"
