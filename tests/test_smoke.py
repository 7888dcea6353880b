import numpy as np

from whisper_ft.features import input_features, load_split, read_manifest


def test_fixture_features_load(features_dir, tiny_model_dir):
    manifest = read_manifest(features_dir)
    splits = manifest["splits"]
    assert [splits[s]["clips"] for s in ("train", "validation", "eval")] == [27, 3, 10]
    ds = load_split(features_dir, "eval").with_format("numpy")
    x = input_features(ds[0])
    assert x.shape == (80, 3000) and np.isfinite(x).all()
