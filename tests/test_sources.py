"""Every source kind (Common Voice folder, parent folder, .tar.gz, Mozilla Data Collective,
Hugging Face audiofolder and save_to_disk folders) and several sources mixed in one store."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import PROCESSOR_DIR, ROOT

import feature_pipeline
from whisper_ft.config import SourceConfig
from whisper_ft.features import load_split, read_manifest
from whisper_ft.sources import EVAL, TRAIN, VALIDATION, Row, SourceError, carve_validation, read_cv_tsv, read_source
from whisper_ft.synth import write_tsv


def rows_summary(rows):
    return {split: [(r.source, r.id, r.sentence, r.speaker) for r in rs] for split, rs in rows.items()}


def audio_bytes(rows):
    return [Path(r.audio).read_bytes() for r in rows[TRAIN] + rows[EVAL]]


@pytest.fixture(scope="module")
def cv_tarball(tmp_path_factory, cv_release) -> Path:
    """The synthetic release packed like a downloaded Common Voice tarball (cv-corpus-*/sv-SE/...)."""
    out = tmp_path_factory.mktemp("tarball") / "cv-corpus-99.0-2099-01-01-sv-SE.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(cv_release, arcname="cv-corpus-99.0-2099-01-01/sv-SE")
    return out


@pytest.fixture(scope="module")
def audiofolder(tmp_path_factory, cv_release) -> Path:
    """An HF audiofolder: train/ and test/ with metadata.csv (file_name, transcription), its clips
    under names of its own, as a corpus of its own recordings has them (a Common Voice clip's
    name is that recording in any source)."""
    root = tmp_path_factory.mktemp("audiofolder")
    for split, tsv in (("train", "train.tsv"), ("test", "test.tsv")):
        (root / split).mkdir()
        rows = read_cv_tsv(cv_release / tsv)[:4]
        with open(root / split / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["file_name", "transcription", "who"])
            for i, r in enumerate(rows):
                shutil.copy(cv_release / "clips" / r["path"], root / split / f"clip-{i}.mp3")
                w.writerow([f"clip-{i}.mp3", r["sentence"], r["client_id"][:8]])
    return root


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory, cv_release) -> Path:
    """A DatasetDict saved with save_to_disk; audio embedded as bytes in a column named `speech`."""
    import datasets

    parts = {}
    for split, tsv in (("train", "train.tsv"), ("validation", "dev.tsv")):
        rows = read_cv_tsv(cv_release / tsv)[:3]
        parts[split] = datasets.Dataset.from_dict(
            {"speech": [{"bytes": (cv_release / "clips" / r["path"]).read_bytes(), "path": None} for r in rows],
             "text": [r["sentence"] for r in rows], "spk": [r["client_id"][:8] for r in rows]},
            features=datasets.Features({"speech": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
                                        "text": datasets.Value("string"), "spk": datasets.Value("string")}),
        ).cast_column("speech", datasets.Audio())  # a cast, unlike encoding, needs no torchcodec
    out = tmp_path_factory.mktemp("saved") / "ds"
    datasets.DatasetDict(parts).save_to_disk(str(out))
    return out


def test_common_voice_folder_parent_and_tarball_agree(cv_release, cv_tarball, tmp_path, monkeypatch):
    src = SourceConfig(name="cv", path=str(cv_release))
    folder = read_source(src, tmp_path)
    assert [len(folder[TRAIN]), len(folder[VALIDATION]), len(folder[EVAL])] == [27, 3, 10]  # dev's 10% as whole speakers
    assert all(r.source == "cv" and r.split == TRAIN for r in folder[TRAIN])
    parent = read_source(SourceConfig(name="cv", path=str(cv_release.parent)), tmp_path)
    monkeypatch.setenv("HOME", str(cv_release.parents[1]))
    home = read_source(SourceConfig(name="cv", path=f"~/{cv_release.parent.name}/sv-SE"), tmp_path)
    packed = read_source(SourceConfig(name="cv", path=str(cv_tarball)), tmp_path)
    assert rows_summary(parent) == rows_summary(folder) == rows_summary(packed) == rows_summary(home)
    assert audio_bytes(packed) == audio_bytes(folder)
    [extracted] = (tmp_path / "raw").glob("cv-corpus-99.0-2099-01-01-sv-SE-*")
    assert (extracted / ".extracted").is_file()
    again = read_source(SourceConfig(name="cv", path=str(cv_tarball)), tmp_path)  # no second extraction
    assert rows_summary(again) == rows_summary(folder)


def test_processes_started_together_unpack_a_tarball_once(cv_tarball, cv_release, tmp_path, monkeypatch):
    """Two takers at once (feature_pipeline.py --num-shards 2): one unpacks, the other waits for
    its marker; neither sees a half-unpacked release."""
    import threading
    import time

    from whisper_ft.sources import extract_tarball

    calls = []
    real = tarfile.TarFile.extractall

    def slow_extractall(self, *args, **kwargs):
        calls.append(1)
        time.sleep(1.0)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extractall", slow_extractall)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(extract_tarball(cv_tarball, tmp_path, poll=0.05)))
               for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
    clips = sorted(p.name for p in results[0].glob("*/*/clips/*"))
    assert clips and clips == sorted(p.name for p in (cv_release / "clips").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == [results[0].name]  # no claim or partial folder left


def test_common_voice_sentences_keep_quote_marks(tmp_path, cv_release):
    release = tmp_path / "rel"
    shutil.copytree(cv_release, release)
    lines = (release / "test.tsv").read_text(encoding="utf-8").splitlines()
    cols = lines[1].split("\t")
    cols[3] = 'Han sa "hej" och gick.'
    (release / "test.tsv").write_text("\n".join([lines[0], "\t".join(cols), *lines[2:]]) + "\n", encoding="utf-8")
    rows = read_source(SourceConfig(name="cv", path=str(release)), tmp_path)
    assert rows[EVAL][0].sentence == 'Han sa "hej" och gick.'
    assert len(rows[EVAL]) == 10


def test_common_voice_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        read_source(SourceConfig(name="cv", path=str(tmp_path / "nope")), tmp_path)
    with pytest.raises(SourceError, match="test.tsv"):
        read_source(SourceConfig(name="cv", path=str(tmp_path)), tmp_path)
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"\x1f\x8b\x08not a tarball")
    with pytest.raises(SourceError, match="cannot unpack"):
        read_source(SourceConfig(name="cv", path=str(broken)), tmp_path)
    broken.write_text("<html>Sign in to download</html>")  # a page saved under the tarball's name
    with pytest.raises(SourceError) as e:
        read_source(SourceConfig(name="cv", path=str(broken)), tmp_path)
    assert str(e.value) == (f"cannot unpack {broken}: not a tar archive, plain or compressed (incomplete download? "
                            "delete it and fetch again)")


def test_mdc_without_api_key_says_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.delenv("MDC_API_KEY", raising=False)
    with pytest.raises(SourceError, match="MDC_API_KEY"):
        read_source(SourceConfig(name="mdc", kind="mdc", dataset_id="common-voice-sv"), tmp_path)


def test_mdc_downloads_with_datacollective_then_reads_the_release(monkeypatch, tmp_path, cv_tarball, cv_release):
    import datacollective

    calls = []

    def fake_download(dataset_id, download_directory=None, show_progress=True, overwrite_existing=False,
                      enable_logging=False, extract=False, overwrite_extracted=False):
        calls.append((dataset_id, download_directory, extract))
        dest = Path(download_directory) / cv_tarball.name
        shutil.copy(cv_tarball, dest)
        return dest

    monkeypatch.setenv("MDC_API_KEY", "test-key")
    monkeypatch.setattr(datacollective, "download_dataset", fake_download)
    rows = read_source(SourceConfig(name="mdc", kind="mdc", dataset_id="cv-sv-99"), tmp_path)
    assert calls == [("cv-sv-99", str(tmp_path / "raw"), False)]
    assert rows_summary(rows) == rows_summary(read_source(SourceConfig(name="mdc", path=str(cv_release)), tmp_path))

    def offline(dataset_id, download_directory=None, **kwargs):
        raise OSError("Max retries exceeded with url")

    monkeypatch.setattr(datacollective, "download_dataset", offline)
    monkeypatch.delenv("MDC_API_KEY")  # a complete download needs neither the server nor the key
    assert rows_summary(read_source(SourceConfig(name="mdc", kind="mdc", dataset_id="cv-sv-99"), tmp_path)) == (
        rows_summary(rows))
    with pytest.raises(SourceError, match="needs MDC_API_KEY"):  # another release: not downloaded
        read_source(SourceConfig(name="mdc", kind="mdc", dataset_id="cv-sv-100"), tmp_path)
    (tmp_path / "raw" / cv_tarball.name).write_bytes(b"cut short")  # not the tarball that was downloaded
    monkeypatch.setenv("MDC_API_KEY", "test-key")
    with pytest.raises(SourceError, match="cannot download 'cv-sv-99'.*rerun to resume"):
        read_source(SourceConfig(name="mdc", kind="mdc", dataset_id="cv-sv-99"), tmp_path)


def test_mdc_download_failure_is_a_source_error(monkeypatch, tmp_path):
    import datacollective

    def refused(dataset_id, download_directory=None, **kwargs):
        raise RuntimeError("rate limit exceeded")

    monkeypatch.setenv("MDC_API_KEY", "test-key")
    monkeypatch.setattr(datacollective, "download_dataset", refused)
    with pytest.raises(SourceError, match="rate limit exceeded.*rerun to resume"):
        read_source(SourceConfig(name="mdc", kind="mdc", dataset_id="cv-sv-99"), tmp_path)


def test_hf_audiofolder_with_custom_columns(audiofolder, cv_release, tmp_path):
    src = SourceConfig(name="af", kind="hf", path=str(audiofolder), text_column="transcription",
                       speaker_column="who", train_splits=("train",), eval_splits=("test",))
    rows = read_source(src, tmp_path)
    for split, tsv in ((TRAIN, "train.tsv"), (EVAL, "test.tsv")):
        cv = read_cv_tsv(cv_release / tsv)[:4]
        assert [r.sentence for r in rows[split]] == [r["sentence"] for r in cv]
        assert [r.speaker for r in rows[split]] == [r["client_id"][:8] for r in cv]
        assert [Path(r.audio).read_bytes() for r in rows[split]] == [
            (cv_release / "clips" / r["path"]).read_bytes() for r in cv]
    assert all(r.source == "af" for r in rows[TRAIN] + rows[EVAL])
    with pytest.raises(SourceError, match="no split 'validation'"):
        read_source(SourceConfig(name="af", kind="hf", path=str(audiofolder), text_column="transcription",
                                 eval_splits=("validation",), train_splits=()), tmp_path)


def test_hf_missing_column_names_the_columns(audiofolder, tmp_path):
    src = SourceConfig(name="af", kind="hf", path=str(audiofolder), text_column="sentence",
                       train_splits=("train",), eval_splits=())
    with pytest.raises(SourceError, match="no column 'sentence'.*transcription"):
        read_source(src, tmp_path)


def test_hf_save_to_disk_with_custom_columns(saved_dataset, cv_release, tmp_path):
    src = SourceConfig(name="saved", kind="hf", path=str(saved_dataset), audio_column="speech", text_column="text",
                       speaker_column="spk", train_splits=("train",), eval_splits=("validation",))
    rows = read_source(src, tmp_path)
    assert [r.sentence for r in rows[TRAIN]] == [r["sentence"] for r in read_cv_tsv(cv_release / "train.tsv")[:3]]
    assert [r.sentence for r in rows[EVAL]] == [r["sentence"] for r in read_cv_tsv(cv_release / "dev.tsv")[:3]]
    assert all(r.speaker for r in rows[TRAIN] + rows[EVAL])
    # audio stays on disk until a worker decodes it: rows are small to hold and to send
    assert all(len(pickle.dumps(r)) < 2000 for r in rows[TRAIN] + rows[EVAL])
    clips = [read_cv_tsv(cv_release / tsv)[:3] for tsv in ("train.tsv", "dev.tsv")]
    assert [r.audio.read() for r in rows[TRAIN] + rows[EVAL]] == [
        (cv_release / "clips" / c["path"]).read_bytes() for part in clips for c in part]


class _NoTorchcodec:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torchcodec":
            raise ImportError(f"{name} is blocked in this test")


def without_torchcodec(monkeypatch) -> None:
    """Act as if torchcodec were not installed (datasets then needs it to encode or decode audio)."""
    import datasets

    for name in [m for m in sys.modules if m.split(".")[0] == "torchcodec"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_NoTorchcodec(), *sys.meta_path])
    monkeypatch.setattr(datasets.config, "TORCHCODEC_AVAILABLE", False)


def test_mixed_sources_keep_their_names(tmp_path, cv_tarball, audiofolder, saved_dataset, monkeypatch):
    without_torchcodec(monkeypatch)  # the pipeline must never need it
    sets = [
        "features.sources.0.name=cv", f"features.sources.0.path={cv_tarball}", "features.sources.0.limit=5",
        "features.sources.0.train_splits=[train]",
        "features.sources.1.name=af", "features.sources.1.kind=hf", f"features.sources.1.path={audiofolder}",
        "features.sources.1.text_column=transcription", "features.sources.1.train_splits=[train]",
        "features.sources.2.name=saved", "features.sources.2.kind=hf", f"features.sources.2.path={saved_dataset}",
        "features.sources.2.audio_column=speech", "features.sources.2.text_column=text",
        "features.sources.2.train_splits=[train]", "features.sources.2.eval_splits=[validation]",
        f"model.name_or_path={PROCESSOR_DIR}", f"features.data_dir={tmp_path}", "features.name=mixed",
        "features.shard_size=8",
    ]
    args = ["--config", str(ROOT / "config.yaml"), "--workers", "2"]  # rows travel to worker processes
    for s in sets:
        args += ["--set", s]
    assert feature_pipeline.main(args) == 0
    root = tmp_path / "features" / "mixed"
    manifest = read_manifest(root)
    assert manifest["splits"]["train"]["by_source"] == {"cv": 5, "af": 4, "saved": 3}
    assert manifest["splits"]["eval"]["by_source"] == {"cv": 5, "af": 4, "saved": 3}
    assert [s["name"] for s in manifest["sources"]] == ["cv", "af", "saved"]
    train = load_split(root, "train")
    assert train["source"] == ["cv"] * 5 + ["af"] * 4 + ["saved"] * 3
    assert len(set(zip(train["source"], train["id"]))) == 12
    assert json.loads((root / "plan.json").read_text())["settings"]["features"]["sources"][2]["text_column"] == "text"


def test_hf_hub_id_offline_is_a_source_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    src = SourceConfig(name="hub", kind="hf", path="mozilla-foundation/common_voice_17_0", hf_config="sv-SE")
    with pytest.raises(SourceError, match="cannot load split 'train'.*local folder"):
        read_source(src, tmp_path)


def test_common_voice_tsv_with_a_byte_order_mark_keeps_its_speakers(tmp_path, cv_release):
    release = tmp_path / "rel"
    shutil.copytree(cv_release, release)
    for split in ("train", "dev", "test"):
        tsv = release / f"{split}.tsv"
        tsv.write_bytes(b"\xef\xbb\xbf" + tsv.read_bytes())
    got = read_source(SourceConfig(name="cv", path=str(release)), tmp_path)
    want = read_source(SourceConfig(name="cv", path=str(cv_release)), tmp_path)
    assert [(r.id, r.speaker) for rows in got.values() for r in rows] == \
        [(r.id, r.speaker) for rows in want.values() for r in rows]
    assert all(r.speaker for rows in got.values() for r in rows)


def test_unreadable_common_voice_tsvs_are_source_errors(tmp_path, cv_release):
    release = tmp_path / "rel"
    shutil.copytree(cv_release, release)
    tsv = release / "test.tsv"
    tsv.write_bytes(tsv.read_bytes().replace("ä".encode(), b"\xe4", 1))  # one Latin-1 byte
    with pytest.raises(SourceError, match=r"test.tsv: cannot read it as UTF-8"):
        read_source(SourceConfig(name="cv", path=str(release)), tmp_path)
    tsv.write_text("client_id\tfile\ttext\nabc\tx.mp3\thej\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"test.tsv has no path or sentence column: not a Common Voice TSV"):
        read_source(SourceConfig(name="cv", path=str(release)), tmp_path)
    lines = (cv_release / "test.tsv").read_text(encoding="utf-8").splitlines()
    fields = lines[2].split("\t")
    fields[lines[0].split("\t").index("sentence")] += "\tmed en tabb"  # its age, gender... one column off
    tsv.write_text("\n".join([*lines[:2], "\t".join(fields), *lines[3:]]) + "\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"test.tsv line 3 has more tab-separated fields than its header's \d+: "
                                          r"a tab in a sentence\? Replace it by a space"):
        read_source(SourceConfig(name="cv", path=str(release)), tmp_path)
    fields = lines[2].split("\t")
    sentence = fields[lines[0].split("\t").index("sentence")]
    fields[lines[0].split("\t").index("sentence")] = sentence.replace(" ", "\r", 1)  # csv reads it as a line end
    tsv.write_text("\n".join([*lines[:2], "\t".join(fields), *lines[3:]]) + "\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"test.tsv line 3 ends inside its sentence: a line break in the "
                                          r"sentence\? Join it onto one line"):
        read_source(SourceConfig(name="cv", path=str(release)), tmp_path)
    fields[lines[0].split("\t").index("sentence")] = sentence.replace(" ", "\n", 1)  # Alt+Enter in a spreadsheet
    tsv.write_text("\n".join([*lines[:2], "\t".join(fields), *lines[3:]]) + "\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"test.tsv line 3 ends inside its sentence"):
        read_source(SourceConfig(name="cv", path=str(release)), tmp_path)
    assert read_cv_tsv(tsv, limit=1) == read_cv_tsv(cv_release / "test.tsv", limit=1)  # read no further than needed
    tsv.write_text("\n".join(line.rstrip() for line in lines) + "\n", encoding="utf-8")  # trailing tabs stripped
    stripped = read_cv_tsv(tsv)
    assert stripped == read_cv_tsv(cv_release / "test.tsv") and stripped[0]["segment"] == ""  # empty, as they were
    tsv.write_bytes("\r\n".join(lines).encode() + b"\r\n")  # Windows line ends
    assert read_cv_tsv(tsv) == read_cv_tsv(cv_release / "test.tsv")
    header = lines[0].split("\t")
    fields = lines[3].split("\t")
    fields[header.index("path")] = lines[1].split("\t")[header.index("path")]  # another sentence, same clip
    tsv.write_text("\n".join([*lines[:3], "\t".join(fields), *lines[4:]]) + "\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"test.tsv lists the clip \S+\.mp3 twice \(lines 2 and 4\): one row per "
                                          r"clip, as in a release; delete one of them"):
        read_source(SourceConfig(name="cv", path=str(release)), tmp_path)


def test_limit_applies_to_each_source_split_before_validation_is_carved(tmp_path, cv_release):
    """limit=5 keeps 5 rows of train, dev and test each, and validation is still carved from dev's."""
    full = {split: read_cv_tsv(cv_release / f"{split}.tsv") for split in ("train", "dev", "test")}
    rows = read_source(SourceConfig(name="cv", path=str(cv_release), limit=5, validation_fraction=0.4), tmp_path)
    assert len(rows[TRAIN]) + len(rows[VALIDATION]) == 10 and len(rows[EVAL]) == 5 and rows[VALIDATION]
    assert {r.id for r in rows[TRAIN] + rows[VALIDATION]} == \
        {f"{split}/{r['path']}" for split in ("train", "dev") for r in full[split][:5]}
    assert all(r.id.startswith("dev/") for r in rows[VALIDATION])


def test_common_voice_11_columns(tmp_path, cv_release):
    """Version 11 TSVs lack sentence_id, sentence_domain and variant."""
    v11 = ("client_id", "path", "sentence", "up_votes", "down_votes", "age", "gender", "accents", "locale", "segment")
    release = tmp_path / "cv-corpus-11.0-2022-09-21" / "sv-SE"
    shutil.copytree(cv_release, release)
    for split in ("train", "dev", "test"):
        rows = read_cv_tsv(cv_release / f"{split}.tsv")
        write_tsv(release / f"{split}.tsv", [{k: r[k] for k in v11} for r in rows], v11)
    got = read_source(SourceConfig(name="cv11", path=str(release.parent)), tmp_path)
    want = read_source(SourceConfig(name="cv11", path=str(cv_release)), tmp_path)
    assert rows_summary(got) == rows_summary(want)
    assert got[TRAIN][0].meta == want[TRAIN][0].meta and got[TRAIN][0].meta["gender"]


def _rows(split: str, speakers: list[str]) -> list[Row]:
    return [Row("cv", TRAIN, f"{split}/{i}.mp3", f"/clips/{split}-{i}.mp3", f"mening {split} {i}", spk)
            for i, spk in enumerate(speakers)]


def test_validation_is_carved_from_whole_speakers_of_one_split():
    train = _rows("train", ["a", "a", "b", "c"]) + _rows("dev", ["d"] * 4 + ["e"] * 3 + ["f"] * 3 + ["g"] * 10)
    rest, validation = carve_validation(train, "dev", 0.2, 1000, seed="cv")
    speakers = {r.speaker for r in validation}
    assert speakers and speakers <= {"d", "e", "f", "g"}  # only dev speakers, and whole ones
    assert not speakers & {r.speaker for r in rest}
    assert len(validation) >= 4 and all(r.split == VALIDATION for r in validation)
    assert sorted(r.id for r in rest + validation) == sorted(r.id for r in train)
    assert carve_validation(train, "dev", 0.2, 1000, seed="cv") == (rest, validation)  # reruns pick the same
    _, capped = carve_validation(train, "dev", 0.9, 4, seed="cv")
    assert len(capped) <= 4  # a speaker who would overshoot the cap is skipped
    for seed in map(str, range(20)):  # a prolific speaker never swamps validation: it stays near its target
        dev = _rows("dev", ["big"] * 60 + [f"s{i // 2}" for i in range(40)])
        _, validation = carve_validation(dev, "dev", 0.1, 1000, seed=seed)
        assert 8 <= len(validation) <= 12 and "big" not in {r.speaker for r in validation}
    assert carve_validation(train, "nosuch", 0.2, 1000) == (train, [])
    assert carve_validation(train, "dev", 0.0, 1000) == (train, [])


def test_named_validation_split_replaces_the_carving(cv_release, tmp_path):
    src = SourceConfig(name="cv", path=str(cv_release), train_splits=("train",), validation_splits=("dev",))
    rows = read_source(src, tmp_path)
    assert [len(rows[TRAIN]), len(rows[VALIDATION]), len(rows[EVAL])] == [24, 6, 10]
    assert [r.sentence for r in rows[VALIDATION]] == [r["sentence"] for r in read_cv_tsv(cv_release / "dev.tsv")]


def test_a_newer_download_under_the_same_name_is_unpacked_again(cv_release, tmp_path, capsys):
    """The marker records which archive was unpacked: a release fetched again under the same
    name (a newer one, or a finished download of a cut one) replaces the old files; the same
    archive is not unpacked twice, and a marker of an older version (the path only) is trusted."""
    import os

    from whisper_ft.sources import DONE_MARK, extract_tarball

    archive = tmp_path / "dl" / "cv-corpus-sv-SE.tar.gz"
    archive.parent.mkdir()

    def pack(extra: str, mtime: int) -> None:
        release = tmp_path / f"release-{mtime}"
        shutil.copytree(cv_release, release)
        (release / "extra.txt").write_text(extra)
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(release, arcname="cv-corpus/sv-SE")
        os.utime(archive, (mtime, mtime))

    out = tmp_path / "raw"
    pack("first", 1_700_000_000)
    dest = extract_tarball(archive, out)
    assert (dest / "cv-corpus" / "sv-SE" / "extra.txt").read_text() == "first"
    assert "extracting" in capsys.readouterr().err
    assert extract_tarball(archive, out) == dest and capsys.readouterr().err == ""  # unpacked once

    pack("second", 1_700_000_100)
    assert extract_tarball(archive, out) == dest
    assert (dest / "cv-corpus" / "sv-SE" / "extra.txt").read_text() == "second"
    assert "has changed since it was unpacked" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [dest.name]  # no partial folder or claim left

    (dest / DONE_MARK).write_text(str(archive))  # a marker from before it recorded size and time
    pack("third", 1_700_000_200)
    assert extract_tarball(archive, out) == dest and capsys.readouterr().err == ""
    assert (dest / "cv-corpus" / "sv-SE" / "extra.txt").read_text() == "second"


def test_two_archives_of_one_name_unpack_apart(cv_release, tmp_path, capsys):
    """/a/x.tar.gz and /b/x.tar.gz (two sources of one config) each keep their own unpacked
    folder: neither replaces the other's clips, and a rerun unpacks neither again."""
    from whisper_ft.sources import extract_tarball

    archives = []
    for folder in ("a", "b"):
        release = tmp_path / f"release-{folder}"
        shutil.copytree(cv_release, release)
        (release / "which.txt").write_text(folder)
        archive = tmp_path / folder / "cv-sv-SE.tar.gz"
        archive.parent.mkdir()
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(release, arcname="cv-corpus/sv-SE")
        archives.append(archive)
    out = tmp_path / "raw"
    dests = [extract_tarball(a, out) for a in archives]
    assert dests[0] != dests[1]
    assert [(d / "cv-corpus" / "sv-SE" / "which.txt").read_text() for d in dests] == ["a", "b"]
    capsys.readouterr()
    assert [extract_tarball(a, out) for a in archives] == dests
    assert capsys.readouterr().err == ""  # both still complete: nothing unpacked again


def test_an_unpack_under_the_bare_archive_name_is_moved_not_unpacked_again(cv_release, tmp_path, capsys):
    """A release unpacked into raw/<archive name> (the folder's name before it carried the
    path's hash) is taken over when its marker names this very archive."""
    from whisper_ft.sources import DONE_MARK, archive_identity, extract_tarball

    archive = tmp_path / "rel.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cv_release / "test.tsv", arcname="sv-SE/test.tsv")
    old = tmp_path / "raw" / "rel"
    (old / "sv-SE").mkdir(parents=True)
    (old / "sv-SE" / "test.tsv").write_text("earlier")
    (old / DONE_MARK).write_text(json.dumps(archive_identity(archive)))
    dest = extract_tarball(archive, tmp_path / "raw")
    assert (dest / "sv-SE" / "test.tsv").read_text() == "earlier" and not old.exists()
    assert capsys.readouterr().err == ""


def test_a_download_landing_while_the_old_file_is_unpacked_is_unpacked_next(tmp_path, monkeypatch, capsys):
    """The marker describes the file that was unpacked, not the one found at its name after."""
    import io
    import os

    from whisper_ft.sources import extract_tarball, unpacked_state

    archive = tmp_path / "rel.tar.gz"

    def pack(path: Path, text: str, mtime: int) -> None:
        with tarfile.open(path, "w:gz") as tar:
            info = tarfile.TarInfo("v.txt")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
        os.utime(path, (mtime, mtime))

    pack(archive, "old", 1_700_000_000)
    real = tarfile.TarFile.extractall

    def and_a_new_download_lands(self, *args, **kwargs):
        real(self, *args, **kwargs)
        pack(tmp_path / "rel.part", "new", 1_700_000_500)
        os.replace(tmp_path / "rel.part", archive)

    monkeypatch.setattr(tarfile.TarFile, "extractall", and_a_new_download_lands)
    dest = extract_tarball(archive, tmp_path / "raw")
    monkeypatch.setattr(tarfile.TarFile, "extractall", real)
    assert (dest / "v.txt").read_text() == "old" and unpacked_state(dest, archive) == "changed"
    assert (extract_tarball(archive, tmp_path / "raw") / "v.txt").read_text() == "new"


def test_a_dataset_without_splits_is_not_every_split_at_once(saved_dataset, tmp_path):
    """A plain Dataset saved with save_to_disk has no split names: as the source of training and
    test at once it would train on the test clips; as one split of a source it is read."""
    import datasets

    plain = tmp_path / "plain"
    datasets.load_from_disk(str(saved_dataset))["train"].save_to_disk(str(plain))
    columns = {"audio_column": "speech", "text_column": "text", "speaker_column": "spk"}
    with pytest.raises(SourceError, match="one Dataset, without splits, but the source asks for 2"):
        read_source(SourceConfig(name="p", kind="hf", path=str(plain), train_splits=("train",), eval_splits=("test",),
                                 validation_from="", **columns), tmp_path)
    rows = read_source(SourceConfig(name="p", kind="hf", path=str(plain), train_splits=(), eval_splits=("test",),
                                    validation_from="", **columns), tmp_path)
    assert len(rows[EVAL]) == 3 and not rows[TRAIN]


def test_embedded_audio_in_training_and_test_is_a_shared_clip(saved_dataset, tmp_path):
    """Audio inside Arrow files is not hashed: the same source, speaker and sentence in training
    and test is taken as the same clip (a configuration mistake: refused), not as a sentence
    recorded again (dropped)."""
    from whisper_ft.features import FeaturesError, check_leakage

    src = SourceConfig(name="saved", kind="hf", path=str(saved_dataset), audio_column="speech", text_column="text",
                       speaker_column="spk", train_splits=("train",), eval_splits=("train",), validation_from="")
    rows = read_source(src, tmp_path)
    with pytest.raises(FeaturesError, match="shares 3 clips and 3 sentences with the 3 test clips"):
        check_leakage(rows, "refuse")


def test_audiofolder_metadata_quirks(audiofolder, tmp_path):
    """A spreadsheet's byte-order mark is read past; a JSON line that is broken, or that lacks
    file_name, is a one-line error; a record without the text has an empty sentence (dropped later)."""
    import csv

    folder = tmp_path / "af"
    shutil.copytree(audiofolder, folder)
    meta = folder / "train" / "metadata.csv"
    meta.write_text("\ufeff" + meta.read_text(encoding="utf-8"), encoding="utf-8")
    src = SourceConfig(name="af", kind="hf", path=str(folder), text_column="transcription", speaker_column="who",
                       train_splits=("train",), eval_splits=(), validation_from="")
    assert len(read_source(src, tmp_path)[TRAIN]) == 4
    with open(meta, encoding="utf-8-sig", newline="") as f:
        records = list(csv.DictReader(f))
    meta.unlink()
    jsonl = folder / "train" / "metadata.jsonl"
    lines = [json.dumps(r) for r in records]
    keyless = json.dumps({"file_name": records[1]["file_name"]})  # first: the columns are every record's keys
    jsonl.write_text("\n".join([keyless, lines[0], *lines[2:]]))
    rows = read_source(src, tmp_path)[TRAIN]
    assert [r.sentence for r in rows] == ["", records[0]["transcription"], *(r["transcription"] for r in records[2:])]
    assert [r.speaker for r in rows] == ["", *(r["who"] for r in [records[0], *records[2:]])]
    for bad, message in (("{not json", "line 2 is not JSON"), ('{"who": "x"}', "no file_name for record 2")):
        jsonl.write_text("\n".join([lines[0], bad]))
        with pytest.raises(SourceError, match=message):
            read_source(src, tmp_path)


def audiofolder_records(audiofolder: Path, folder: Path) -> list[dict]:
    """A copy of the audiofolder fixture at `folder`, its train metadata.csv removed; returns its records."""
    shutil.copytree(audiofolder, folder)
    meta = folder / "train" / "metadata.csv"
    with open(meta, encoding="utf-8", newline="") as f:
        records = list(csv.DictReader(f))
    meta.unlink()
    return records


AF_SOURCE = {"name": "af", "kind": "hf", "text_column": "transcription", "speaker_column": "who",
             "train_splits": ("train",), "eval_splits": (), "validation_from": ""}


def test_audiofolder_null_file_names_short_rows_and_numeric_transcripts(audiofolder, tmp_path):
    """A null or empty file_name is the one-line 'no file_name' error, a CSV row with fewer
    fields than the header names its line, and a transcript that JSON reads as a number is
    its text (a null one is empty and dropped later)."""
    folder = tmp_path / "af"
    records = audiofolder_records(audiofolder, folder)
    src = SourceConfig(path=str(folder), **AF_SOURCE)
    jsonl = folder / "train" / "metadata.jsonl"
    for bad in (None, ""):
        jsonl.write_text("\n".join(json.dumps(r) for r in [records[0], {**records[1], "file_name": bad}]))
        with pytest.raises(SourceError, match="has no file_name for record 2"):
            read_source(src, tmp_path)
    jsonl.write_text("\n".join(json.dumps(r) for r in [{**records[0], "transcription": 1984},
                                                      {**records[1], "transcription": None}, records[2]]))
    assert [r.sentence for r in read_source(src, tmp_path)[TRAIN]] == ["1984", "", records[2]["transcription"]]
    jsonl.unlink()
    (folder / "train" / "metadata.csv").write_text(
        f"file_name,transcription,who\n{records[0]['file_name']},Hej,a\n{records[1]['file_name']}\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"metadata.csv line 3 has fewer fields than its header's 3"):
        read_source(src, tmp_path)


@pytest.mark.parametrize("name", ["metadata.csv", "metadata.jsonl"])
def test_audiofolder_metadata_in_another_encoding_is_one_line(audiofolder, tmp_path, name):
    """A spreadsheet saved in Latin-1 (Excel on Windows)."""
    folder = tmp_path / "af"
    records = audiofolder_records(audiofolder, folder)
    text = (f"file_name,transcription,who\n{records[0]['file_name']},Hej på dig,a\n" if name.endswith(".csv") else
            json.dumps({**records[0], "transcription": "Hej på dig"}, ensure_ascii=False) + "\n")
    (folder / "train" / name).write_bytes(text.encode("latin-1"))
    with pytest.raises(SourceError, match=rf"^source af: {folder / 'train' / name} is not UTF-8 text "
                                          r"\(invalid .* at byte \d+\): save it as UTF-8$"):
        read_source(SourceConfig(path=str(folder), **AF_SOURCE), tmp_path)


def test_a_local_folder_only_datasets_audiofolder_reader_could_read_is_one_line(audiofolder, tmp_path, monkeypatch):
    """Without metadata.csv or .jsonl (WAVs alone, a metadata.parquet), datasets' audiofolder
    reader would encode every clip with torchcodec, which the pipeline does without."""
    without_torchcodec(monkeypatch)
    folder = tmp_path / "af"
    audiofolder_records(audiofolder, folder)  # train/ keeps its clips, without a metadata file
    (folder / "test" / "metadata.csv").unlink()
    with pytest.raises(SourceError, match=rf"^source af: cannot load split 'train' of {folder} without torchcodec: a "
                                          rf"local audiofolder is read with {folder}/train/metadata.csv or "
                                          r"metadata.jsonl \(a file_name and a text column\)$"):
        read_source(SourceConfig(path=str(folder), **AF_SOURCE), tmp_path)


@pytest.mark.parametrize("path, hint", [
    ("/data/no-such-folder", " (no such folder)"), ("no-such-folder", " (no such folder)"),
    ("someone/sv-speech", " (HF_HUB_OFFLINE is set: a Hub id loads only from the cache of an earlier download; or "
                          "pass a local folder)")])
def test_an_hf_source_that_is_not_there_says_what_it_may_be(tmp_path, path, hint):
    src = SourceConfig(name="x", kind="hf", path=path, train_splits=("train",), eval_splits=(), validation_from="")
    with pytest.raises(SourceError) as e:  # HF_HUB_OFFLINE=1 in the tests
        read_source(src, tmp_path)
    assert str(e.value).startswith(f"source x: cannot load split 'train' of {path}: ") and str(e.value).endswith(hint)


def test_a_speaker_numbered_zero_is_a_speaker(tmp_path, cv_release):
    """An integer speaker column: speaker 0 was stored as no speaker, each of its clips apart."""
    import datasets

    rows = read_cv_tsv(cv_release / "train.tsv")[:4]
    ds = datasets.Dataset.from_dict({"path": [str(cv_release / "clips" / r["path"]) for r in rows],
                                     "text": [r["sentence"] for r in rows], "speaker_id": [0, 1, 0, 2]})
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "ds"))
    src = SourceConfig(name="n", kind="hf", path=str(tmp_path / "ds"), audio_column="path", text_column="text",
                       speaker_column="speaker_id", train_splits=("train",), eval_splits=(), validation_from="")
    assert [r.speaker for r in read_source(src, tmp_path)[TRAIN]] == ["0", "1", "0", "2"]


@pytest.mark.parametrize("header", ["file_name,transcription,who", "file_name,who"], ids=["text", "no-text-column"])
def test_audiofolder_csv_row_with_an_unquoted_comma_is_refused(audiofolder, tmp_path, header):
    """A sentence with an unquoted comma is more fields than the header: a one-line error with
    the line and what to do, never a sentence cut at the comma (nor, without the text column,
    a TypeError)."""
    folder = tmp_path / "af"
    records = audiofolder_records(audiofolder, folder)
    src = SourceConfig(path=str(folder), **AF_SOURCE)
    good = ",".join(records[0][c] for c in header.split(","))
    (folder / "train" / "metadata.csv").write_text(
        f"{header}\n{good}\n{records[1]['file_name']},Ja, tack,b\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"metadata.csv line 3 has more fields than its header's "
                                          f"{header.count(',') + 1}: put a field that holds a comma in double quotes"):
        read_source(src, tmp_path)
    if "transcription" in header:  # quoted, the comma is the sentence's
        (folder / "train" / "metadata.csv").write_text(
            f"{header}\n{good}\n{records[1]['file_name']},\"Ja, tack\",b\n", encoding="utf-8")
        assert [r.sentence for r in read_source(src, tmp_path)[TRAIN]] == [records[0]["transcription"], "Ja, tack"]


def test_make_sample_rebuilds_the_embedded_sample_and_replaces_only_a_release(tmp_path):
    """Its defaults are the embedded sample's split sizes, and its --out is deleted only when it
    is empty or an earlier release."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_sample

    sample = ROOT / "data" / "sample" / "cv-corpus-sample"
    rows = {split: len((sample / "sv-SE" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()) - 1
            for split in ("train", "dev", "test")}
    parser_defaults = {a.dest: a.default for a in make_sample.make_parser()._actions}
    assert rows == {split: parser_defaults[split] for split in rows}
    assert make_sample.replaceable(sample) and make_sample.replaceable(tmp_path / "new")
    assert make_sample.replaceable(tmp_path)  # empty
    (tmp_path / "notes.txt").write_text("mine")
    assert not make_sample.replaceable(tmp_path) and not make_sample.replaceable(tmp_path / "notes.txt")


def test_make_sample_checks_its_inputs_before_it_replaces_the_release(tmp_path, monkeypatch, capsys, sentences):
    """Too few sentences, or espeak-ng or ffmpeg missing, is one line and exit 2, and the earlier
    release in --out is still there; a complete build replaces it, leaving no staging folder."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_sample

    from whisper_ft import cli

    out = tmp_path / "cv-corpus-sample"
    (out / "sv-SE" / "clips").mkdir(parents=True)
    (out / "sv-SE" / "validated.tsv").write_text("earlier")
    two = tmp_path / "two.txt"
    two.write_text("Hej.\nHej då.\n", encoding="utf-8")
    many = tmp_path / "many.txt"
    many.write_text("\n".join(sentences), encoding="utf-8")
    small = ["--train", "1", "--dev", "1", "--test", "1", "--speakers", "3", "--out", str(out)]
    with monkeypatch.context() as m:
        m.setenv("PATH", str(tmp_path / "no-tools"))
        for text, message in ((two, "3 clips asked for, only 2 usable sentences"),
                              (many, "needs espeak-ng and ffmpeg")):
            assert cli.run(make_sample.main, ["--sentences", str(text), *small]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and message in err
            assert (out / "sv-SE" / "validated.tsv").read_text() == "earlier"
    if shutil.which("espeak-ng") is None or shutil.which("ffmpeg") is None:
        pytest.skip("espeak-ng and ffmpeg are needed to build a release")
    assert cli.run(make_sample.main, ["--sentences", str(many), *small]) == 0
    assert len(read_cv_tsv(out / "sv-SE" / "validated.tsv")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cv-corpus-sample", "many.txt", "two.txt"]


def test_a_folder_of_two_releases_names_both(tmp_path):
    """Two releases of one locale under the folder given: both named by their place, not as
    'sv-SE, sv-SE'."""
    for release in ("cv-corpus-17.0/sv-SE", "cv-corpus-18.0/sv-SE"):
        (tmp_path / "two" / release / "clips").mkdir(parents=True)
        (tmp_path / "two" / release / "test.tsv").write_text("client_id\tpath\tsentence\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"several Common Voice folders under \S+/two \(cv-corpus-17\.0/sv-SE, "
                                          r"cv-corpus-18\.0/sv-SE\): point at one of them"):
        read_source(SourceConfig(name="cv", path=str(tmp_path / "two")), tmp_path / "raw")


def test_a_speaker_one_clip_over_the_validation_cap_is_not_taken():
    """validation_max_clips is a cap: a speaker whose clips would put validation one clip over it
    is skipped (a smaller speaker is taken instead), whichever order the seed gives."""
    dev = _rows("dev", ["three"] * 3 + ["two"] * 2 + ["one"])
    for seed in map(str, range(20)):
        _, validation = carve_validation(dev, "dev", 1.0, 2, seed=seed)
        assert 0 < len(validation) <= 2 and "three" not in {r.speaker for r in validation}, seed
