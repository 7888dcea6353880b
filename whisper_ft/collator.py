"""Batches for Whisper training and evaluation from the trimmed feature store.

The store keeps only the frames that hold audio (`whisper_ft.features`). The collator ships
them as they are stored (float16 by default) with each clip's frame count and fill value, a
tenth of the bytes of padded inputs; `expand` rebuilds the padded (n_mels, 3000) float32
inputs on the device that runs the model, exactly `features.input_features` per example.

    batch = SpeechCollator(decoder_start_token_id)(examples)   # CPU, in data-loader workers
    inputs = expand(to_device(batch))                           # {"input_features", "labels"}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from whisper_ft.audio import N_FRAMES

IGNORE_INDEX = -100  # label value the cross-entropy loss skips
# Labels are padded to a multiple of this many tokens, so that a batch's decoder shapes take a
# few values rather than one per longest label: on an H200 the first step at each new label
# length took about 0.4 s instead of 0.1 (docs/training.md, "Speed"). The loss ignores the
# padding, which costs well under 1% of a step.
LABEL_MULTIPLE = 8
COMPACT_KEYS = ("features", "frames", "fill")  # what `expand` turns into input_features


@dataclass(frozen=True)
class SpeechCollator:
    """examples (input_features (frames, n_mels), fill, labels) -> compact tensors.

    Returns `features` (B, longest, n_mels) in the stored dtype, `frames` (B,) int64, `fill`
    (B,) float32 and `labels` (B, T) int64 padded with -100, T the longest label rounded up to
    a multiple of `label_multiple`. A leading decoder-start token is dropped from the labels
    because the model prepends it itself when it shifts the labels right into decoder inputs.
    """

    decoder_start_token_id: int
    n_frames: int = N_FRAMES
    label_multiple: int = LABEL_MULTIPLE

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        feats = [np.asarray(e["input_features"])[:self.n_frames] for e in examples]
        frames = np.array([len(f) for f in feats], dtype=np.int64)
        out = np.zeros((len(feats), max(frames.max(initial=0), 1), feats[0].shape[1]), dtype=feats[0].dtype)
        for i, f in enumerate(feats):
            out[i, :len(f)] = f
        return {"features": torch.from_numpy(out), "frames": torch.from_numpy(frames),
                "fill": torch.tensor([float(e["fill"]) for e in examples], dtype=torch.float32),
                "labels": torch.from_numpy(self.pad_labels([e["labels"] for e in examples]))}

    def pad_labels(self, labels: Sequence[Sequence[int]]) -> np.ndarray:
        rows = [list(map(int, ids)) for ids in labels]
        rows = [ids[1:] if ids and ids[0] == self.decoder_start_token_id else ids for ids in rows]
        width = -(-max(map(len, rows), default=0) // self.label_multiple) * self.label_multiple
        out = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        for i, ids in enumerate(rows):
            out[i, :len(ids)] = ids
        return out


def expand(batch: dict[str, torch.Tensor], n_frames: int = N_FRAMES) -> dict[str, torch.Tensor]:
    """A collated batch -> model inputs: `input_features` (B, n_mels, n_frames) float32 on the
    batch's device, each clip's frames followed by its fill value; other keys pass through."""
    if "features" not in batch:
        return batch
    rest = {k: v for k, v in batch.items() if k not in COMPACT_KEYS}
    feats, frames, fill = batch["features"], batch["frames"], batch["fill"].float()
    b, t, n_mels = feats.shape
    fill3 = fill.view(b, 1, 1)
    out = fill3.expand(b, n_mels, n_frames).clone()
    valid = torch.arange(t, device=feats.device).view(1, 1, t) < frames.view(b, 1, 1)
    out[:, :, :t] = torch.where(valid, feats.transpose(1, 2).float(), fill3)
    return {"input_features": out, **rest}
