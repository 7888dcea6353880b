"""The collator ships compact batches, `expand` rebuilds exactly the padded inputs of
`features.input_features`, and labels are padded."""

import numpy as np
import torch

from whisper_ft.collator import IGNORE_INDEX, SpeechCollator, expand
from whisper_ft.features import input_features, load_split

SOT, SV, TRANSCRIBE, NOTS, EOT = 50258, 50273, 50359, 50363, 50257


def _example(frames: int, fill: float, labels: list[int], n_mels: int = 80, seed: int = 0) -> dict:
    x = np.random.default_rng(seed).normal(size=(frames, n_mels)).astype(np.float16)
    return {"input_features": x, "fill": fill, "labels": labels}


def test_inputs_match_store_padding():
    examples = [_example(120, -0.5, [SOT, 1, EOT], seed=1), _example(3000, -1.5, [SOT, 2, EOT], seed=2),
                _example(7, 0.25, [SOT, EOT], seed=3)]
    batch = SpeechCollator(SOT)(examples)
    assert batch["features"].dtype == torch.float16 and batch["features"].shape == (3, 3000, 80)
    assert batch["frames"].tolist() == [120, 3000, 7]
    x = expand(batch)["input_features"]
    assert x.dtype == torch.float32 and x.shape == (3, 80, 3000)
    for i, ex in enumerate(examples):
        np.testing.assert_array_equal(x[i].numpy(), input_features(ex))
    assert (x[2, :, 7:] == 0.25).all()


def test_labels_padded_with_ignore_index_and_start_token_dropped():
    examples = [_example(10, 0.0, [SOT, SV, TRANSCRIBE, NOTS, 11, 12, EOT]), _example(10, 0.0, [SOT, SV, TRANSCRIBE, NOTS, EOT])]
    labels = SpeechCollator(SOT, label_multiple=1)(examples)["labels"]
    assert labels.dtype == torch.int64
    assert labels.tolist() == [[SV, TRANSCRIBE, NOTS, 11, 12, EOT],
                               [SV, TRANSCRIBE, NOTS, EOT, IGNORE_INDEX, IGNORE_INDEX]]


def test_labels_without_start_token_are_kept_whole():
    labels = SpeechCollator(SOT, label_multiple=1)([_example(5, 0.0, [SV, 5, EOT])])["labels"]
    assert labels.tolist() == [[SV, 5, EOT]]


def test_labels_are_padded_to_a_multiple_of_eight_tokens():
    """A few label lengths, not one per longest label: each new one costs a slow step on a GPU."""
    collate = SpeechCollator(SOT)
    assert collate.label_multiple == 8
    widths = {n: collate([_example(5, 0.0, [SOT, *range(1, n + 1)])])["labels"].shape[1] for n in range(1, 25)}
    assert widths == {n: 8 * ((n + 7) // 8) for n in range(1, 25)}
    labels = collate([_example(5, 0.0, [SOT, SV, 5, EOT]), _example(5, 0.0, [SOT, SV, EOT])])["labels"]
    assert labels.tolist() == [[SV, 5, EOT] + [IGNORE_INDEX] * 5, [SV, EOT] + [IGNORE_INDEX] * 6]


def test_compact_batch_is_a_fraction_of_the_padded_bytes():
    examples = [_example(450, -0.5, [SOT, 1, EOT], seed=1), _example(300, -1.0, [SOT, 2, EOT], seed=2)]
    batch = SpeechCollator(SOT)(examples)
    compact = sum(batch[k].numel() * batch[k].element_size() for k in ("features", "frames", "fill"))
    assert compact * 10 < expand(batch)["input_features"].numel() * 4


def test_expand_passes_other_keys_and_padded_batches_through():
    batch = SpeechCollator(SOT)([_example(10, 0.0, [SOT, 5, EOT])])
    inputs = expand(batch)
    assert set(inputs) == {"input_features", "labels"} and inputs["labels"] is batch["labels"]
    assert expand(inputs) is inputs


def test_on_the_feature_store(features_dir):
    ds = load_split(features_dir, "eval").with_format("numpy", columns=["input_features", "fill", "labels"])
    rows = [ds[i] for i in range(3)]
    batch = expand(SpeechCollator(SOT)(rows))
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(batch["input_features"][i].numpy(), input_features(row))
        n = len(row["labels"]) - 1
        assert batch["labels"][i, :n].tolist() == row["labels"][1:].tolist()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
