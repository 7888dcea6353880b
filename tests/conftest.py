"""Shared test fixtures: the real Whisper tokenizer (committed), tiny random Whisper models,
and a synthetic Common Voice release spoken by espeak-ng, built once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PROCESSOR_DIR = FIXTURES / "whisper-processor"
SENTENCES = FIXTURES / "sv-sentences.txt"

sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs a real Whisper checkpoint (WHISPER_TEST_MODEL) or minutes of CPU")
    # A shell without job control starts background commands with Ctrl-C ignored, and every
    # process started from them inherits that (`bash .ci/run &`): the tests of what Ctrl-C
    # does need it delivered, here and in the commands they start.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """A tiny random multilingual Whisper (d_model 64, 2+2 layers) with the real tokenizer."""
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=51865, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=448, pad_token_id=50257, bos_token_id=50257,
        eos_token_id=50257, decoder_start_token_id=50258)
    model = WhisperForConditionalGeneration(config)
    gen = json.loads((PROCESSOR_DIR / "generation_config.json").read_text())
    gen.pop("alignment_heads", None)  # they name layers the tiny model does not have
    model.generation_config = GenerationConfig(**gen)
    model.save_pretrained(out_dir)
    WhisperProcessor.from_pretrained(PROCESSOR_DIR).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def processor_dir() -> Path:
    return PROCESSOR_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-whisper"))


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    return SENTENCES.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="session")
def cv_release(tmp_path_factory, sentences) -> Path:
    """A Common Voice style sv-SE folder: 24 train, 6 dev, 10 test clips of synthetic speech."""
    if shutil.which("espeak-ng") is None or shutil.which("ffmpeg") is None:
        pytest.skip("espeak-ng and ffmpeg are needed for synthetic speech (apt-get install espeak-ng ffmpeg)")
    from whisper_ft.synth import make_release

    return make_release(tmp_path_factory.mktemp("cv"), sentences, {"train": 24, "dev": 6, "test": 10}, seed=1,
                        n_speakers=6)


def run_cli(script: str, *args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None):
    """Run one of the entry scripts in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def features_dir(tmp_path_factory, cv_release) -> Path:
    """Features of the synthetic release, built by the feature pipeline with the real tokenizer."""
    work = tmp_path_factory.mktemp("features")
    proc = run_cli("feature_pipeline.py", "--config", str(ROOT / "config.yaml"),
                   "--set", f"model.name_or_path={PROCESSOR_DIR}",
                   "--set", f"features.data_dir={work}", "--set", "features.name=fixture",
                   "--set", f"features.sources.0.path={cv_release}", "--set", "features.shard_size=16",
                   "--workers", "1", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "features" / "fixture"


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """A real Whisper checkpoint folder named by WHISPER_TEST_MODEL (build one with
    ../shared/tools/offline_whisper.py); tests that need it skip without it."""
    path = os.environ.get("WHISPER_TEST_MODEL", "")
    if not path or not (Path(path) / "config.json").is_file():
        pytest.skip("set WHISPER_TEST_MODEL to a local Whisper checkpoint folder to run real-model tests")
    return Path(path)
