"""CTranslate2 int8 export of a transformers Whisper folder, for the app's fast CPU path.

    python -m whisper_ft.ct2 checkpoints/<run>/best          # writes checkpoints/<run>/best/ct2/

The export lives in `<model_dir>/ct2/` and is used by the app when it was made from the
weights beside it: `ct2/source.json` records their size, time and SHA-256, so a copy of the
folder (`cp -r`, `scp`, a Hub download: new file times) is recognised by its hash and a
retrained model's stale export is ignored with a warning. An export without that record (an
older one) is used when it is newer than the weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

EXPORT_NAME = "ct2"
# faster-whisper reads the tokenizer and the feature settings (preprocessor_config.json) from
# the export folder; newer transformers folders keep the latter inside processor_config.json.
COPY_FILES = ("tokenizer.json",)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def export_dir(model_dir: str | Path) -> Path:
    return Path(model_dir) / EXPORT_NAME


SOURCE = "source.json"  # in the export: the weights it was made from


def find_export(model_dir: str | Path) -> Path | None:
    """The export of `model_dir` when it is complete and made from the weights there."""
    out = export_dir(model_dir)
    if not (out / "model.bin").is_file():
        return None
    weights = [Path(model_dir) / w for w in WEIGHT_FILES if (Path(model_dir) / w).is_file()]
    if not weights:
        return out
    try:
        source = json.loads((out / SOURCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        source = None
    if isinstance(source, dict):
        fresh = _same_weights(Path(model_dir) / str(source.get("weights")), source)
    else:  # an export made before the record
        fresh = max(w.stat().st_mtime for w in weights) <= (out / "model.bin").stat().st_mtime
    if not fresh:
        log.warning("ignoring %s: it was made from other weights than %s holds; re-export with "
                    "python -m whisper_ft.ct2 %s", out, model_dir, model_dir)
        return None
    return out


def _fingerprint(weights: Path) -> dict:
    st = weights.stat()
    return {"weights": weights.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(weights)}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _same_weights(weights: Path, source: dict) -> bool:
    """Whether `weights` are those `source` recorded: the same size and time, else the same hash
    (1.3 s for whisper-small's 0.97 GB on 2 cores; only for a copied folder)."""
    if not weights.is_file():
        return False
    st = weights.stat()
    if st.st_size != source.get("size"):
        return False
    return st.st_mtime_ns == source.get("mtime_ns") or _sha256(weights) == source.get("sha256")


def export(model_dir: str | Path, quantization: str = "int8", force: bool = False) -> Path:
    """Convert a local transformers Whisper folder to `<model_dir>/ct2/`; returns that folder.

    Written to a temporary name and renamed, so a crash never leaves a half export in use.
    """
    from ctranslate2.converters import TransformersConverter
    from transformers import WhisperFeatureExtractor

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a transformers model folder (no config.json)")
    out = export_dir(model_dir)
    if out.exists() and not force and find_export(model_dir) is not None:
        return out
    missing = [f for f in COPY_FILES if not (model_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} lacks {', '.join(missing)}, which the export needs")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    TransformersConverter(str(model_dir), copy_files=list(COPY_FILES)).convert(str(tmp), quantization=quantization)
    WhisperFeatureExtractor.from_pretrained(str(model_dir)).to_json_file(str(tmp / "preprocessor_config.json"))
    if (weights := next((model_dir / w for w in WEIGHT_FILES if (model_dir / w).is_file()), None)) is not None:
        (tmp / SOURCE).write_text(json.dumps(_fingerprint(weights), indent=1), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log.info("wrote the CTranslate2 %s export to %s", quantization, out)
    return out


def main(argv: list[str] | None = None) -> int:
    from whisper_ft.cli import UserError

    parser = argparse.ArgumentParser(description="Export a Whisper model folder to CTranslate2 for the app.")
    parser.add_argument("model_dir", help="transformers Whisper folder, e.g. checkpoints/<run>/best")
    parser.add_argument("--quantization", default="int8", help="int8 (default), int8_float32, float32, ...")
    parser.add_argument("--force", action="store_true", help="re-export even when an up-to-date export exists")
    args = parser.parse_args(argv)
    try:
        print(export(args.model_dir, args.quantization, args.force))
    except FileNotFoundError as e:
        raise UserError(str(e)) from e
    return 0


if __name__ == "__main__":
    from whisper_ft.cli import run

    raise SystemExit(run(main))
