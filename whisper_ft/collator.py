"""Batches for Whisper training and evaluation from the trimmed feature store.

The store keeps only the frames that hold audio (`whisper_ft.features`); the collator
rebuilds the padded (n_mels, 3000) float32 inputs in one vectorized pass per batch, which is
exactly `features.input_features` applied to each example.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from whisper_ft.audio import N_FRAMES

IGNORE_INDEX = -100  # label value the cross-entropy loss skips


@dataclass(frozen=True)
class SpeechCollator:
    """examples (input_features (frames, n_mels), fill, labels) -> model tensors.

    Returns `input_features` (B, n_mels, n_frames) float32 and `labels` (B, T) int64 padded
    with -100. A leading decoder-start token is dropped from the labels because the model
    prepends it itself when it shifts the labels right into decoder inputs.
    """

    decoder_start_token_id: int
    n_frames: int = N_FRAMES

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        return {"input_features": torch.from_numpy(self.pad_inputs(examples)),
                "labels": torch.from_numpy(self.pad_labels([e["labels"] for e in examples]))}

    def pad_inputs(self, examples: Sequence[dict]) -> np.ndarray:
        feats = [np.asarray(e["input_features"]) for e in examples]
        fills = np.asarray([float(e["fill"]) for e in examples], dtype=np.float32)
        out = np.empty((len(feats), feats[0].shape[1], self.n_frames), dtype=np.float32)
        out[:] = fills[:, None, None]
        for i, f in enumerate(feats):
            n = min(len(f), self.n_frames)
            out[i, :, :n] = f[:n].T
        return out

    def pad_labels(self, labels: Sequence[Sequence[int]]) -> np.ndarray:
        rows = [list(map(int, ids)) for ids in labels]
        rows = [ids[1:] if ids and ids[0] == self.decoder_start_token_id else ids for ids in rows]
        out = np.full((len(rows), max(map(len, rows), default=0)), IGNORE_INDEX, dtype=np.int64)
        for i, ids in enumerate(rows):
            out[i, :len(ids)] = ids
        return out
