"""Loading Whisper models and processors from a hub id or a local folder, with language and
task set everywhere they matter, and errors that say what to do when offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import requests

from whisper_ft.errors import UserError, first_line

HUB_PROBE_TIMEOUT = 5.0


class ModelNotFound(UserError, OSError):
    """A model or processor that can be found neither locally nor on the Hub."""


def resolve(name_or_path: str) -> str:
    """Return a local folder or a hub id that loads now; fail in seconds when neither will.

    A hub id that is in the local cache loads offline. Otherwise the Hub is probed with a
    short timeout first, because transformers retries for minutes before giving up.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in ("config.json", "preprocessor_config.json", "processor_config.json")):
            raise ModelNotFound(f"{path} is not a Whisper model folder (no config.json)")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or os.sep + os.sep in name_or_path or name_or_path.count("/") > 1:
        raise ModelNotFound(f"model folder not found: {name_or_path}")
    if _in_cache(name_or_path):
        return name_or_path
    hint = (f"pass a local folder instead (e.g. --set model.name_or_path=/path/to/whisper), or download "
            f"{name_or_path} on a machine with network access first")
    if hub_offline():
        raise ModelNotFound(f"{name_or_path} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: {hint}")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        requests.head(f"{endpoint}/api/models/{name_or_path}", timeout=HUB_PROBE_TIMEOUT)
    except requests.RequestException as e:
        raise ModelNotFound(f"cannot reach the Hugging Face Hub for {name_or_path} ({type(e).__name__}): {hint}") from e
    return name_or_path


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE forbids the network, read as huggingface_hub reads it (1, on, yes, true)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _in_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(hit, str)


class UnknownLanguage(UserError, ValueError):
    """A language or task the Whisper tokenizer does not know."""


def load_processor(name_or_path: str, language: str = "sv", task: str = "transcribe"):
    """WhisperProcessor whose tokenizer adds <|sv|><|transcribe|><|notimestamps|> prefixes."""
    from transformers import WhisperProcessor

    try:
        processor = WhisperProcessor.from_pretrained(resolve(name_or_path))
    except OSError as e:
        raise ModelNotFound(f"cannot load a Whisper processor from {name_or_path}: {first_line(e)}") from e
    set_language(processor.tokenizer, language, task)
    return processor


def set_language(tokenizer, language: str, task: str) -> None:
    """Set the tokenizer's prefix tokens; an unknown language fails with the valid choices."""
    try:
        tokenizer.set_prefix_tokens(language=language, task=task, predict_timestamps=False)
        tokenizer.prefix_tokens  # noqa: B018 - validates the language lazily
    except ValueError as e:
        raise UnknownLanguage(f"model.language: {first_line(e)}") from e


def load_model(name_or_path: str, language: str = "sv", task: str = "transcribe", **kwargs):
    """WhisperForConditionalGeneration with the generation config fixed to `language`/`task`,
    the encoder's fixed sinusoidal position table frozen again (Whisper never trains it, but
    transformers 5 loads every weight with requires_grad=True, and fine-tuning on short clips
    would then change the positions past them by padding alone), and the encoder and attention
    without their layout copies (`whisper_ft.layout`)."""
    from safetensors import SafetensorError
    from transformers import WhisperForConditionalGeneration

    from whisper_ft.layout import use_contiguous_layout

    try:
        model = WhisperForConditionalGeneration.from_pretrained(resolve(name_or_path), **kwargs)
    except (OSError, SafetensorError) as e:  # not there, or its weights cut short
        raise ModelNotFound(f"cannot load a Whisper model from {name_or_path}: {first_line(e)}") from e
    model.model.encoder.embed_positions.requires_grad_(False)
    use_contiguous_layout(model)
    set_generation_language(model, language, task)
    return model


def own_language(model_dir: str | Path) -> str | None:
    """The Whisper language code a local model's generation config forces: what a model trained
    here (or fine-tuned elsewhere for one language) was trained for. None without one, as for
    OpenAI's multilingual checkpoints, or when it is no code Whisper knows."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    try:
        language = json.loads((Path(model_dir) / "generation_config.json").read_text(encoding="utf-8")).get("language")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(language, str):
        return None
    language = language.strip("<|>").lower()  # "<|sv|>", "sv" or "swedish": generate takes all three
    language = TO_LANGUAGE_CODE.get(language, language)
    return language if language in LANGUAGES else None


def language_name(code: str) -> str:
    """"Swedish" for "sv": the name of a Whisper language code, for text shown to people."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return LANGUAGES.get(code, code).title()


def set_generation_language(model, language: str, task: str) -> None:
    """Force language and task at generation; drop stale forced_decoder_ids that override them."""
    gen = model.generation_config
    gen.language = language
    gen.task = task
    gen.forced_decoder_ids = None
    if hasattr(model.config, "forced_decoder_ids"):
        model.config.forced_decoder_ids = None

