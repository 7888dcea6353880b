"""The feature pipeline end to end: drops by reason, exact features, labels, resume after a
kill, shard splitting across processes and machines, store/config mismatches and the offline
hub-id error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import PROCESSOR_DIR, ROOT, run_cli
from test_claims import plant_claim

import feature_pipeline
from whisper_ft import cli, features
from whisper_ft.audio import load_audio
from whisper_ft.claims import HOST_ENV, ClaimError, ClaimSet
from whisper_ft.features import (Shard, commit_shard, input_features, load_split, read_manifest, summary_lines,
                                 write_shard)
from whisper_ft.sources import read_cv_tsv
from whisper_ft.synth import CV_COLUMNS, write_tsv
from whisper_ft.text import tidy_sentence

PREFIX = [50258, 50273, 50359, 50363]  # <|startoftranscript|><|sv|><|transcribe|><|notimestamps|>
EOT = 50257


def pipeline_args(data_dir: Path, name: str, source: Path, *sets: str, workers: int = 1) -> list[str]:
    args = ["--config", str(ROOT / "config.yaml"), "--workers", str(workers),
            "--set", f"model.name_or_path={PROCESSOR_DIR}", "--set", f"features.data_dir={data_dir}",
            "--set", f"features.name={name}", "--set", f"features.sources.0.path={source}"]
    for s in sets:
        args += ["--set", s]
    return args


def run_main(*args, workers: int = 1) -> int:
    return feature_pipeline.main(pipeline_args(*args, workers=workers))


def store_content(root: Path) -> dict:
    """Everything a later stage reads from a store, per split, in order."""
    out = {}
    for split in ("train", "eval"):
        ds = load_split(root, split).with_format("numpy")
        out[split] = {"id": list(ds["id"]), "sentence": list(ds["sentence"]),
                      "labels": [list(x) for x in ds["labels"]], "fill": np.asarray(ds["fill"]),
                      "features": [np.asarray(x) for x in ds["input_features"]]}
    return out


def assert_same_store(a: Path, b: Path) -> None:
    ca, cb = store_content(a), store_content(b)
    for split in ca:
        assert ca[split]["id"] == cb[split]["id"]
        assert len(set(ca[split]["id"])) == len(ca[split]["id"])
        assert ca[split]["sentence"] == cb[split]["sentence"]
        assert ca[split]["labels"] == cb[split]["labels"]
        assert np.array_equal(ca[split]["fill"], cb[split]["fill"])
        assert all(np.array_equal(x, y) for x, y in zip(ca[split]["features"], cb[split]["features"]))
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma["splits"] == mb["splits"]


def leftovers(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob(".*") if ".tmp" in p.name]


# --------------------------------------------------------------------------- a release with every kind of bad row


def cv_row(clip: str, sentence: str, **extra) -> dict:
    return {c: "" for c in CV_COLUMNS} | {"client_id": "spk", "path": clip, "sentence": sentence,
                                          "locale": "sv-SE"} | extra


@pytest.fixture(scope="module")
def messy_release(tmp_path_factory, cv_release) -> Path:
    """Good clips plus one row for every drop reason (test.tsv) and exactness edge cases (train.tsv)."""
    root = tmp_path_factory.mktemp("messy") / "sv-SE"
    clips = root / "clips"
    clips.mkdir(parents=True)
    good = read_cv_tsv(cv_release / "train.tsv")[:4]
    for r in good:
        shutil.copy(cv_release / "clips" / r["path"], clips / r["path"])
    waves = [load_audio(cv_release / "clips" / r["path"]) for r in read_cv_tsv(cv_release / "train.tsv")]
    speech = np.concatenate(waves)
    sf.write(clips / "long.mp3", np.tile(speech, 1 + int(31 * 16000 // len(speech)))[:31 * 16000], 16000, format="MP3")
    sf.write(clips / "near30.mp3", np.tile(speech, 1 + int(30 * 16000 // len(speech)))[:int(29.95 * 16000)], 16000,
             format="MP3")
    sf.write(clips / "short.mp3", speech[16000:16000 + int(0.2 * 16000)], 16000, format="MP3")
    sf.write(clips / "tiny.mp3", speech[16000:16000 + int(0.55 * 16000)], 16000, format="MP3")
    (clips / "zero.mp3").write_bytes(b"")
    (clips / "truncated.mp3").write_bytes((cv_release / "clips" / good[0]["path"]).read_bytes()[:100])
    (clips / "garbage.mp3").write_bytes(b"this is not an mp3 file at all\n" * 40)
    # test rows get recordings of their own: a clip shared with training would be refused as leakage
    shutil.copy(clips / good[0]["path"], clips / "no-sentence.mp3")
    shutil.copy(clips / good[1]["path"], clips / "long-labels.mp3")
    long_text = " ".join([good[0]["sentence"]] * 200)  # far over 448 tokens
    write_tsv(root / "train.tsv", [
        cv_row(good[0]["path"], good[0]["sentence"]),
        cv_row("near30.mp3", "Ett nästan trettio sekunder långt klipp."),
        cv_row("tiny.mp3", "Kort."),
        cv_row(good[1]["path"], '  „Hej”,   sa   hon – «välkommen»!  ', gender="female_feminine", accents="Skåne"),
    ], CV_COLUMNS)
    write_tsv(root / "dev.tsv", [cv_row(good[2]["path"], '"Hela meningen inom citattecken."')], CV_COLUMNS)
    write_tsv(root / "test.tsv", [
        cv_row(good[3]["path"], good[3]["sentence"]),
        cv_row("zero.mp3", "Tom fil."),
        cv_row("truncated.mp3", "Avklippt fil."),
        cv_row("garbage.mp3", "Ingen ljudfil."),
        cv_row("missing.mp3", "Saknas."),
        cv_row("no-sentence.mp3", "   "),
        cv_row("long.mp3", "För lång."),
        cv_row("short.mp3", "För kort."),
        cv_row("long-labels.mp3", long_text),
    ], CV_COLUMNS)
    return root


@pytest.fixture(scope="module")
def messy_stores(tmp_path_factory, messy_release) -> dict[str, Path]:
    """The messy release encoded twice: float16 with two worker processes, float32 with one."""
    work = tmp_path_factory.mktemp("messy-stores")
    assert run_main(work, "f16", messy_release, "features.shard_size=3", "features.batch_size=2", workers=2) == 0
    assert run_main(work, "f32", messy_release, "features.dtype=float32") == 0
    return {"float16": work / "features" / "f16", "float32": work / "features" / "f32"}


def test_every_drop_reason_is_counted(messy_stores, messy_release):
    for root in messy_stores.values():
        manifest = read_manifest(root)
        ev = manifest["splits"]["eval"]
        assert ev["rows"] == 9 and ev["clips"] == 1
        assert ev["dropped"] == {"missing_file": 1, "empty_file": 1, "undecodable": 2, "empty_sentence": 1,
                                 "too_short": 1, "too_long": 1, "labels_too_long": 1}
        assert manifest["splits"]["train"]["clips"] == 5 and not manifest["splits"]["train"]["dropped"]
        assert load_split(root, "eval")["id"] == ["test/" + read_cv_tsv(messy_release / "test.tsv")[0]["path"]]


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float16", 2e-3)])
def test_stored_features_rebuild_the_extractor_input(messy_stores, messy_release, dtype, tol):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor.from_pretrained(PROCESSOR_DIR)
    root = messy_stores[dtype]
    ds = load_split(root, "train").with_format("numpy")
    assert ds.features["input_features"].dtype == dtype
    durations = sorted(float(d) for d in ds["duration"])
    assert durations[0] < 0.6 and durations[-1] > 29.9  # the edge cases are in
    for ex in ds:
        wave = load_audio(messy_release / "clips" / ex["id"].split("/", 1)[1])
        ref = fe(wave, sampling_rate=16000, return_tensors="np").input_features[0]
        got = input_features(ex)
        assert got.shape == ref.shape == (80, 3000) and got.dtype == np.float32
        assert np.abs(got - ref).max() <= tol, ex["id"]
    if dtype == "float16":  # trimmed: far fewer frames than the padded 3000 for short clips
        frames = [x.shape[0] for x in ds["input_features"]]
        assert min(frames) < 60 and max(frames) > 2990


def test_labels_carry_prefix_and_orthographic_text(messy_stores, messy_release):
    from transformers import WhisperTokenizer

    tok = WhisperTokenizer.from_pretrained(PROCESSOR_DIR)
    ds = load_split(messy_stores["float16"], "train")
    by_id = {ex["id"]: ex for ex in ds}
    for ex in ds:
        assert ex["labels"][:4] == PREFIX and ex["labels"][-1] == EOT
        assert tok.decode(ex["labels"], skip_special_tokens=True) == " " + ex["sentence"]  # as Whisper writes text
        assert tok.convert_ids_to_tokens(ex["labels"][4]).startswith("Ġ")  # the first word's token has the space
    assert read_manifest(messy_stores["float16"])["labels"] == {"leading_space": True}
    tidy = [ex for ex in ds if ex["gender"] == "female_feminine"][0]
    assert tidy["sentence"] == '"Hej", sa hon – "välkommen"!' and tidy["accents"] == "Skåne"
    quoted = [ex for ex in ds if ex["id"].startswith("dev/")][0]
    assert quoted["sentence"] == "Hela meningen inom citattecken."
    first = read_cv_tsv(messy_release / "train.tsv")[0]
    assert by_id[f"train/{first['path']}"]["sentence"] == first["sentence"]  # case and punctuation kept


def test_a_sentence_that_spells_a_special_token_is_labelled_as_written():
    """"<|en|>" in a sentence is text: read as Whisper's language token it would vanish from the
    label, and the model would be scored against another sentence than the clip's."""
    from transformers import WhisperTokenizer

    from whisper_ft.features import label_ids

    tok = WhisperTokenizer.from_pretrained(PROCESSOR_DIR)
    ids = label_ids(tok, "Skriv <|en|> och <|endoftext|> här.")
    assert ids[:4] == PREFIX and ids[-1] == EOT and EOT not in ids[4:-1]
    assert tok.decode(ids, skip_special_tokens=True) == " Skriv <|en|> och <|endoftext|> här."


@pytest.mark.parametrize("raw, tidy", [
    ("  Hej   på\tdig  ", "Hej på dig"),
    ("“Kom hit”, sa han.", '"Kom hit", sa han.'),
    ("»Ja», sa hon.", '"Ja", sa hon.'),
    ("»Ja«", "Ja"),
    ("'Hela meningen.'", "Hela meningen."),
    ("Det är Öresund, inte öresund!", "Det är Öresund, inte öresund!"),
    ("Han sa ’nej’.", "Han sa 'nej'."),
    ("Sam\u00adhället\u200b är\ufeff stort.", "Samhället är stort."),  # soft hyphen, zero-width space, BOM
    ("\u200b", ""),  # nothing heard: an empty sentence
    ("\u0645\u06cc\u200c\u062e\u0648\u0627\u0645", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0645"),  # ZWNJ spells
    ("Pa\u030a o\u0308n a\u0308r det ga\u030aende.", "På ön är det gående."),  # decomposed (NFD, as macOS writes)
    ('"Ja", sa han, "nej"', '"Ja", sa han, "nej"'),  # quotes at both ends, but not one pair around it all
    ("'Jag', sa hon, 'vet inte'", "'Jag', sa hon, 'vet inte'"),
])
def test_tidy_sentence(raw, tidy):
    assert tidy_sentence(raw) == tidy


def test_saved_processor_serves_the_next_stages(features_dir, tiny_model_dir):
    from transformers import WhisperConfig, WhisperFeatureExtractor

    from whisper_ft.features import check_compatible
    from whisper_ft.model import load_processor

    processor = load_processor(str(features_dir / read_manifest(features_dir)["processor"]), "sv", "transcribe")
    assert processor.feature_extractor.to_dict() == WhisperFeatureExtractor.from_pretrained(PROCESSOR_DIR).to_dict()
    assert processor.tokenizer.prefix_tokens == PREFIX
    check_compatible(read_manifest(features_dir), WhisperConfig.from_pretrained(tiny_model_dir), processor.tokenizer)


def test_fixture_store_labels_match_the_release(features_dir, cv_release):
    validation = load_split(features_dir, "validation")
    held_out = set(validation["speaker"])
    dev = read_cv_tsv(cv_release / "dev.tsv")
    assert held_out and held_out < {r["client_id"] for r in dev}  # whole speakers carved out of dev
    assert validation["sentence"] == [tidy_sentence(r["sentence"]) for r in dev if r["client_id"] in held_out]
    expected = read_cv_tsv(cv_release / "train.tsv") + [r for r in dev if r["client_id"] not in held_out]
    ds = load_split(features_dir, "train")
    assert ds["sentence"] == [tidy_sentence(r["sentence"]) for r in expected]
    assert not held_out & set(ds["speaker"])
    assert all(labels[:4] == PREFIX for labels in ds["labels"])


# --------------------------------------------------------------------------- resume, shards, reruns


STORE_SETS = ("features.shard_size=3", "features.batch_size=2")


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, cv_release) -> Path:
    """The synthetic release in 14 shards of 3, built in one uninterrupted run."""
    work = tmp_path_factory.mktemp("reference")
    assert run_main(work, "ref", cv_release, *STORE_SETS) == 0
    return work / "features" / "ref"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_resume_after_kill_equals_an_uninterrupted_run(tmp_path, cv_release, reference_store):
    root = tmp_path / "features" / "ref"
    args = pipeline_args(tmp_path, "ref", cv_release, *STORE_SETS, "features.batch_size=1")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "feature_pipeline.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while not list(root.glob("train/shard-*/stats.json")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no shard written within 120 s"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = list(root.glob("*/shard-*/stats.json"))
    assert 1 <= len(done) < 14 and not (root / "manifest.json").exists()
    stale = root / "train" / f".shard-00009-of-00010.tmp-{dead_pid()}"  # as if killed while writing
    stale.mkdir()
    (stale / "data-00000-of-00001.arrow").write_bytes(b"half")
    (root / f".manifest.json.tmp-{dead_pid()}").write_text("{")
    mtimes = {p: p.stat().st_mtime_ns for p in done}

    assert feature_pipeline.main(args) == 0
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in done)  # finished shards were kept, not redone
    assert leftovers(root) == []
    assert_same_store(root, reference_store)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in Linux's /proc")
def test_ctrl_c_with_decoding_workers_is_one_line(tmp_path, cv_release):
    """Ctrl-C signals the whole process group, the decoding workers too: the pipeline says it
    in one line, with no traceback from any worker, and leaves no worker behind."""
    root = tmp_path / "features" / "ref"
    args = pipeline_args(tmp_path, "ref", cv_release, *STORE_SETS, "features.batch_size=1", workers=2)
    # at the lowest priority: on a busy machine the pipeline, 2 s of work, must not finish
    # between the first shard and the signal (`nice` runs python in its own process)
    proc = subprocess.Popen(["nice", "-n", "19", sys.executable, str(ROOT / "feature_pipeline.py"), *args],
                            cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True, text=True)
    deadline = time.time() + 120
    while not list(root.glob("train/shard-*/stats.json")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "no shard written within 120 s"
        time.sleep(0.01)
    assert proc.poll() is None, "the pipeline finished before it could be interrupted"
    workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    os.killpg(proc.pid, signal.SIGINT)
    try:
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted; rerun the same command to go on from what it saved"
    assert len(workers) >= 2
    deadline = time.time() + 10
    while any(running(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(running(pid) for pid in workers)


def running(pid: int) -> bool:
    """Whether `pid` runs (a zombie no longer does: an orphan waits for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_decoding_workers_die_with_a_killed_pipeline(tmp_path):
    """After `kill -9` of the process that runs the decoding pool, its workers end within
    seconds instead of living on, each holding a processor."""
    script = (
        "import multiprocessing, os, time\n"
        "from whisper_ft.features import Limits, Processor, decoding_pool\n"
        "pool = decoding_pool(2, Processor(None, None), Limits(0.5, 30.0, 448))\n"
        "pool.submit(os.getpid).result()\n"
        "print(' '.join(str(p.pid) for p in multiprocessing.active_children()), flush=True)\n"
        "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        workers = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(workers) == 2 and all(running(pid) for pid in workers)
        proc.kill()
        proc.wait()
        deadline = time.time() + 10
        while any(running(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(running(pid) for pid in workers)
    finally:
        proc.kill()
        for pid in workers:  # left running only when the test fails
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def test_spawned_decoding_workers_write_the_store_forked_ones_do(tmp_path, cv_release, monkeypatch):
    """Outside Linux the workers start by the platform's default method, spawn on macOS (where a
    forked child may crash in system libraries): each gets the processor pickled rather than
    inherited, and the store is the same as with forked workers."""
    import multiprocessing
    from multiprocessing import resource_tracker

    import psutil

    asked: list[str | None] = []
    get_context = multiprocessing.get_context
    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: asked.append(method) or get_context(method))
    try:
        for method in ("fork", "spawn"):
            asked.clear()
            monkeypatch.setattr(features, "POOL_START_METHOD", method)
            assert run_main(tmp_path / method, "ref", cv_release, *STORE_SETS, workers=2) == 0
            assert method in asked
    finally:  # spawn starts multiprocessing's resource tracker, which would live on as this process's child
        resource_tracker._resource_tracker._stop()
    assert_same_store(tmp_path / "fork" / "features" / "ref", tmp_path / "spawn" / "features" / "ref")
    assert psutil.Process().children() == []


@pytest.mark.skipif(features.POOL_START_METHOD != "fork", reason="the test's encoder reaches the workers by fork")
def test_a_decoding_worker_that_dies_is_one_line_and_the_rerun_keeps_the_shards_written(tmp_path, cv_release,
                                                                                       monkeypatch, capsys):
    """A worker killed mid-build (the out-of-memory killer, a crash in native code) stops the
    pipeline with one line that says what to do; the shards finished by then stay, and the
    rerun it asks for goes on from them."""
    root = tmp_path / "features" / "ref"
    args = pipeline_args(tmp_path, "ref", cv_release, *STORE_SETS, workers=2)
    last_clip = read_cv_tsv(cv_release / "test.tsv")[-1]["path"]  # the last shard's: earlier ones finish first
    pipeline, encode = os.getpid(), features.encode_batch

    def killed_on_the_last_clip(rows, *rest):
        if os.getpid() != pipeline and any(Path(str(r.audio)).name == last_clip for r in rows):
            deadline = time.time() + 60
            while not list(root.glob("*/shard-*/stats.json")) and time.time() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        return encode(rows, *rest)

    monkeypatch.setattr(features, "encode_batch", killed_on_the_last_clip)
    assert cli.run(feature_pipeline.main, args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "error: a decoding worker died (for example killed when out of memory; any error it printed is above): the "
        "shards written so far are kept, and a rerun of the same command goes on from them; try fewer workers than 2 "
        "(--workers N, or features.workers)")
    done = {p: p.stat().st_mtime_ns for p in root.glob("*/shard-*/stats.json")}
    assert 1 <= len(done) < 14 and not (root / "manifest.json").exists()
    monkeypatch.undo()
    assert cli.run(feature_pipeline.main, args) == 0
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in done.items())  # kept, not written again
    assert len(list(root.glob("*/shard-*/stats.json"))) == 14 and leftovers(root) == []


def test_rerun_of_a_finished_store_does_nothing(reference_store, cv_release, capsys, monkeypatch):
    files = {p: p.stat().st_mtime_ns for p in reference_store.rglob("*") if p.is_file()}
    data_dir = reference_store.parents[1]
    monkeypatch.chdir(data_dir.parent)  # a relative data_dir: the folder is printed whole
    assert run_main(Path(data_dir.name), "ref", cv_release, *STORE_SETS, "features.workers=2") == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and out.endswith(f"features ready in {reference_store}\n")
    for split, s in read_manifest(reference_store)["splits"].items():
        assert f"{split}: {s['clips']} of {s['rows']} clips kept, {s['hours']:.2f} h; dropped: " in out
    assert {p: p.stat().st_mtime_ns for p in reference_store.rglob("*") if p.is_file()} == files


def test_summary_names_the_speakers_each_held_out_split_shares():
    manifest = {"splits": {"train": {"clips": 9, "rows": 10, "hours": 0.01, "dropped": {"too_short": 1}},
                           "eval": {"clips": 3, "rows": 3, "hours": 0.0, "dropped": {}}},
                "overlap": {"eval": {"clips": 0, "sentences": 0, "speakers": 2},
                            "validation": {"clips": 0, "sentences": 0, "speakers": 0},
                            "validation_vs_test": {"clips": 0, "sentences": 0, "speakers": 1},
                            "dropped_training_rows": 4}}
    assert summary_lines(manifest) == [
        "train: 9 of 10 clips kept, 0.01 h; dropped: too_short 1", "eval: 3 of 3 clips kept, 0.00 h; dropped: none",
        "note: 2 test speakers also speak in the training data",
        "note: 1 test speakers also speak in the validation data"]


def test_shard_split_across_processes_equals_one_process(tmp_path, cv_release, reference_store, capsys):
    root = tmp_path / "features" / "ref"
    assert feature_pipeline.main(["--num-shards", "2", "--shard-index", "1",
                                  *pipeline_args(tmp_path, "ref", cv_release, *STORE_SETS)]) == 0
    assert not (root / "manifest.json").exists()
    assert "still to be written by other processes" in capsys.readouterr().out
    # every second shard of train (27 rows in 9 shards), validation (3 in 1) and test (10 in 4), in that order
    assert sorted(str(p.parent.relative_to(root)) for p in root.glob("*/shard-*/stats.json")) == sorted(
        [f"train/shard-{i:05d}-of-00009" for i in (1, 3, 5, 7)] + ["validation/shard-00000-of-00001"]
        + [f"eval/shard-{i:05d}-of-00004" for i in (1, 3)])
    assert feature_pipeline.main(["--num-shards", "2", "--shard-index", "0",
                                  *pipeline_args(tmp_path, "ref", cv_release, *STORE_SETS)]) == 0
    assert (root / "manifest.json").is_file() and leftovers(root) == []
    assert_same_store(root, reference_store)


@pytest.mark.parametrize("hosts", [("", ""), ("host-a", "host-b")], ids=["one-machine", "two-hosts"])
def test_concurrent_shard_processes(tmp_path, cv_release, reference_store, hosts):
    """Two processes at once, on one machine or presenting two host names (as two machines
    sharing the folder do), build the same store as one process."""
    root = tmp_path / "features" / "ref"
    procs = [subprocess.Popen([sys.executable, str(ROOT / "feature_pipeline.py"), "--num-shards", "2",
                               "--shard-index", str(i), *pipeline_args(tmp_path, "ref", cv_release, *STORE_SETS)],
                              cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1", HOST_ENV: host},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i, host in enumerate(hosts)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    assert_same_store(root, reference_store)
    assert not list(root.rglob(".*.claim*"))


def test_another_hosts_shard_in_progress_is_left_alone_until_its_claim_is_stale(tmp_path, cv_release,
                                                                               reference_store, capsys):
    """host-b writes train shard 1 (of --shard-index 1) under a claim: its temporary folder
    survives this machine's start although its pid means nothing here, --overwrite is refused,
    and once host-b's heartbeat is stale the shard is taken over and the store completed."""
    root = tmp_path / "features" / "ref"
    args = pipeline_args(tmp_path, "ref", cv_release, *STORE_SETS)
    assert feature_pipeline.main(["--num-shards", "2", "--shard-index", "0", *args]) == 0
    peer = dead_pid()
    in_progress = root / "train" / f".shard-00001-of-00009.tmp-host-b-{peer}"
    in_progress.mkdir()
    claim = root / "train" / ".shard-00001-of-00009.claim"
    plant_claim(claim, "host-b", peer, age=0)
    capsys.readouterr()
    assert feature_pipeline.main(["--num-shards", "2", "--shard-index", "1", *args]) == 0
    assert in_progress.is_dir() and not (root / "manifest.json").exists()
    assert f"still to be written by other processes: 1 by host-b pid {peer};" in capsys.readouterr().out
    assert cli.run(feature_pipeline.main, ["--overwrite", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"--overwrite refused: {root} is still being written by host-b pid {peer}" in err
    assert in_progress.is_dir() and (root / "train" / "shard-00000-of-00009" / "stats.json").is_file()
    plant_claim(claim, "host-b", peer, age=1000)  # host-b stopped
    assert feature_pipeline.main(["--num-shards", "2", "--shard-index", "1", *args]) == 0
    assert leftovers(root) == [] and not list(root.rglob(".*.claim*"))
    assert_same_store(root, reference_store)


def test_a_shard_whose_claim_was_lost_is_not_written(tmp_path):
    shard = Shard("train", 0, 1, ())
    (tmp_path / "train").mkdir()
    with ClaimSet(60) as claims:
        assert claims.take(shard.claim(tmp_path))
        shard.claim(tmp_path).unlink()  # taken over by host-b while this process was stalled
        plant_claim(shard.claim(tmp_path), "host-b", 7, age=0)
        with pytest.raises(ClaimError, match="host-b pid 7"):
            commit_shard(tmp_path, shard, [], Counter(), 80, "float16", claims)
    assert list((tmp_path / "train").iterdir()) == [shard.claim(tmp_path)]  # no shard, no temporary folder



def test_a_shard_in_progress_whose_claim_cannot_be_read_yet_is_left_alone_until_it_is_stale(tmp_path):
    """A claim file is created, then written: a clean-up that reads it in between finds no
    holder in it, and must not take the writer's shard in progress for a dead one's."""
    from whisper_ft.features import clean_partial

    in_progress = tmp_path / "train" / ".shard-00000-of-00001.tmp-host-b-7"
    in_progress.mkdir(parents=True)
    claim = tmp_path / "train" / ".shard-00000-of-00001.claim"
    claim.write_text('{"host": "host-b", "pid": 7, "tok')
    clean_partial(tmp_path, stale_seconds=300)
    assert in_progress.is_dir()
    old = time.time() - 1000  # never written in full: its writer died, and the claim is stale
    os.utime(claim, (old, old))
    clean_partial(tmp_path, stale_seconds=300)
    assert not in_progress.exists()


def test_a_shard_that_cannot_be_renamed_into_place_is_an_error_not_a_shard(tmp_path, monkeypatch):
    def refused(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(features.os, "replace", refused)
    with pytest.raises(PermissionError):
        write_shard(tmp_path / "shard-00000-of-00001", [], Counter(), 0, 80, "float16")
    assert list(tmp_path.iterdir()) == []  # no temporary folder either


def test_a_shard_another_process_finished_first_is_kept(tmp_path):
    path = tmp_path / "shard-00000-of-00001"
    write_shard(path, [], Counter({"too_short": 1}), 1, 80, "float16")
    write_shard(path, [], Counter(), 0, 80, "float16")
    assert json.loads((path / "stats.json").read_text())["rows"] == 1 and len(list(tmp_path.iterdir())) == 1

def copy_of(store: Path, tmp_path: Path) -> Path:
    """A copy of a finished store under tmp_path, the same store to the pipeline (same name and inputs)."""
    root = tmp_path / "features" / store.name
    shutil.copytree(store, root)
    return root


@pytest.mark.parametrize("stats", ["", '{"rows": 3, "cli'], ids=["emptied", "cut-short"])
def test_a_shard_with_damaged_stats_is_one_line_in_training_and_rebuilt_by_a_rerun(tmp_path, cv_release,
                                                                                 reference_store, stats, capsys):
    from whisper_ft.features import FeaturesError, FeatureStore

    root = copy_of(reference_store, tmp_path)
    (root / "train" / "shard-00001-of-00009" / "stats.json").write_text(stats)
    with pytest.raises(FeaturesError) as e:
        FeatureStore(root).load("train")
    assert str(e.value).startswith(f"{root}/train/shard-00001-of-00009 is damaged or missing")
    assert "rerun python feature_pipeline.py" in str(e.value) and len(str(e.value).splitlines()) == 1
    assert run_main(tmp_path, "ref", cv_release, *STORE_SETS) == 0
    out = capsys.readouterr()
    assert "rebuilding train/shard-00001-of-00009: its stats.json is missing or damaged" in out.out
    assert "wrote train/shard-00001-of-00009: 3 of 3 clips kept" in out.out
    assert leftovers(root) == [] and out.out.endswith(f"features ready in {root}\n")
    assert_same_store(root, reference_store)


@pytest.mark.parametrize("damage", ["cut-short", "deleted"])
def test_a_shard_with_a_damaged_arrow_file_is_one_line_in_training(tmp_path, cv_release, reference_store, damage,
                                                                    capsys):
    """The Arrow file is not read whole to check it (it is memory-mapped); loading it names the
    shard, and the rerun the message asks for rebuilds that shard alone."""
    from whisper_ft.features import FeaturesError, FeatureStore

    root = copy_of(reference_store, tmp_path)
    shard = root / "train" / "shard-00001-of-00009"
    arrow = next(shard.glob("*.arrow"))
    if damage == "cut-short":
        os.truncate(arrow, arrow.stat().st_size // 2)
    else:
        arrow.unlink()
    with pytest.raises(FeaturesError) as e:
        FeatureStore(root).load("train")
    message = str(e.value)
    assert message.startswith(f"{shard} is damaged (") and len(message.splitlines()) == 1
    assert message.endswith("delete that folder and rerun python feature_pipeline.py with the same config, which "
                            "rebuilds only that shard")
    shutil.rmtree(shard)
    assert run_main(tmp_path, "ref", cv_release, *STORE_SETS) == 0
    assert "wrote train/shard-00001-of-00009: 3 of 3 clips kept" in capsys.readouterr().out
    assert_same_store(root, reference_store)


def test_a_damaged_manifest_is_one_line_and_written_again_by_the_rerun_it_asks_for(tmp_path, cv_release,
                                                                                    reference_store, capsys):
    from whisper_ft.features import FeatureStore

    root = copy_of(reference_store, tmp_path)
    manifest = root / "manifest.json"
    manifest.write_text(manifest.read_text()[:200])
    argv = pipeline_args(tmp_path, "ref", cv_release, *STORE_SETS)
    assert cli.run(feature_pipeline.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {manifest} is damaged (it does not parse): delete it and rerun python feature_pipeline.py "
                   "with the config that built the store, which writes it again from the finished shards")
    with pytest.raises(features.FeaturesError, match="is damaged"):
        FeatureStore(root).load("train")
    manifest.unlink()
    assert cli.run(feature_pipeline.main, argv) == 0
    assert "wrote" not in capsys.readouterr().out  # nothing encoded again
    assert_same_store(root, reference_store)


@pytest.mark.parametrize("change, differs", [
    ("features.min_seconds=1.0", "features.min_seconds 0.5, this run has 1.0"),
    ("features.sources.0.train_splits=[train]",
     'features.sources.0.train_splits ["train", "dev"], this run has ["train"]'),
], ids=["limit", "source"])
def test_changed_config_on_an_existing_store_is_refused(reference_store, cv_release, change, differs, capsys):
    argv = pipeline_args(reference_store.parents[1], "ref", cv_release, *STORE_SETS, change)
    assert cli.run(feature_pipeline.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {reference_store} holds features built with {differs}; choose another features.name "
                   "or pass --overwrite to rebuild it")
    assert read_manifest(reference_store)["config"]["features"]["min_seconds"] == 0.5


def test_paths_spelled_with_a_trailing_slash_are_the_same_store(reference_store, cv_release, capsys):
    """Tab completion adds the slash; the rerun finds the finished store, not another one."""
    argv = pipeline_args(reference_store.parents[1], "ref", cv_release, *STORE_SETS,
                         f"features.sources.0.path={cv_release}/", f"model.name_or_path={PROCESSOR_DIR}/")
    assert cli.run(feature_pipeline.main, argv) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_a_store_planned_with_a_trailing_slash_before_paths_were_normalised_is_still_this_store(
        tmp_path, cv_release, monkeypatch, capsys):
    """Its plan's fingerprint hashes the slash: a rerun, with or without it, resumes the store."""
    root = tmp_path / "features" / "old"
    with monkeypatch.context() as m:
        m.setattr(features, "normal_settings", lambda settings: settings)  # as before
        assert run_main(tmp_path, "old", f"{cv_release}/", "features.shard_size=20") == 0
    shutil.rmtree(root / "train" / "shard-00001-of-00002")
    capsys.readouterr()
    assert run_main(tmp_path, "old", cv_release, "features.shard_size=20") == 0
    assert "wrote train/shard-00001-of-00002" in capsys.readouterr().out
    assert run_main(tmp_path, "old", f"{cv_release}/", "features.shard_size=20") == 0
    assert "nothing to do" in capsys.readouterr().out


# --------------------------------------------------------------------------- errors through the command line


@pytest.mark.parametrize("flags, message", [
    (["--num-shards", "0"], "--num-shards must be at least 1, got 0"),
    (["--num-shards", "2", "--shard-index", "2"], "--shard-index must be in 0..1"),
    (["--workers", "-1"], "--workers must be at least 0 (0 = all cores), got -1"),
])
def test_bad_process_counts_are_refused_before_any_work(tmp_path, flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        feature_pipeline.main(["--config", str(ROOT / "config.yaml"), "--set", f"features.data_dir={tmp_path}",
                               "--set", f"model.name_or_path={tmp_path / 'no-model'}", *flags])
    assert e.value.code == 2 and capsys.readouterr().err.strip().endswith(f"error: {message}")


def test_unreachable_hub_id_offline_fails_fast(tmp_path, cv_release):
    start = time.time()
    proc = run_cli("feature_pipeline.py", "--config", str(ROOT / "config.yaml"),
                   "--set", "model.name_or_path=openai/whisper-small", "--set", f"features.data_dir={tmp_path}",
                   "--set", f"features.sources.0.path={cv_release}", cwd=tmp_path, timeout=120,
                   env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")})
    assert time.time() - start < 30
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "openai/whisper-small" in proc.stderr and "local folder" in proc.stderr
    assert not (tmp_path / "features").exists()


@pytest.mark.parametrize("data_dir", ["a-file", "a-file/data"])
def test_data_dir_on_a_file_is_one_line_exit_2(tmp_path, cv_release, data_dir, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    assert cli.run(feature_pipeline.main, pipeline_args(tmp_path / data_dir, "x", cv_release)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: features.data_dir: {tmp_path / 'a-file'}") and "is a file, not a folder" in err


def test_missing_source_is_one_line_exit_2(tmp_path, capsys):
    assert cli.run(feature_pipeline.main, pipeline_args(tmp_path, "x", tmp_path / "no-such-release")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "features.sources.0" in err and "no such file or folder" in err


@pytest.mark.parametrize("keep", [0, 1], ids=["no-clips-folder", "partly-copied"])
def test_a_release_missing_most_clips_is_refused_and_built_once_they_are_there(tmp_path, cv_release, keep, capsys):
    """A clips/ folder that is absent or still being copied stops the run before the store is
    begun, naming the split and the folder; with the copy finished, the same command builds it."""
    release = tmp_path / "sv-SE"
    shutil.copytree(cv_release, release)
    clips = release / "clips"
    test_clips = [r["path"] for r in read_cv_tsv(release / "test.tsv")][:3]
    aside = tmp_path / "aside"
    shutil.move(clips, aside)
    if keep:  # one of the three test clips copied so far, and every other clip
        shutil.copytree(aside, clips, ignore=lambda _d, names: [n for n in names if n in test_clips[keep:]])
    args = pipeline_args(tmp_path, "late", release, "features.sources.0.limit=3")
    assert cli.run(feature_pipeline.main, args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    first = "3 of the 3 audio files of split 'train'" if not keep else "2 of the 3 audio files of split 'test'"
    assert f"{first} are missing (looked in {clips})" in err
    assert "finish copying" in err
    assert not (tmp_path / "features" / "late").exists()
    shutil.rmtree(clips, ignore_errors=True)
    shutil.move(aside, clips)
    assert cli.run(feature_pipeline.main, args) == 0
    manifest = read_manifest(tmp_path / "features" / "late")
    assert manifest["splits"]["eval"]["clips"] == 3 and not manifest["splits"]["eval"]["dropped"]


# --------------------------------------------------------------------------- leakage between splits


def test_training_on_validated_is_refused_with_the_overlap_count(tmp_path, cv_release, capsys):
    args = pipeline_args(tmp_path, "leaky", cv_release, "features.sources.0.train_splits=[validated]",
                         "features.sources.0.validation_from=validated")
    assert cli.run(feature_pipeline.main, args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "training data shares 10 clips and 10 sentences with the 10 test clips (sample `validated`: " in err
    assert "on_overlap=drop" in err
    assert not (tmp_path / "features" / "leaky" / "manifest.json").exists()


def test_dropping_the_overlap_trains_on_the_rest(tmp_path, cv_release):
    assert run_main(tmp_path, "dropped", cv_release, "features.sources.0.train_splits=[validated]",
                    "features.sources.0.validation_from=validated", "features.on_overlap=drop") == 0
    manifest = read_manifest(tmp_path / "features" / "dropped")
    overlap = manifest["overlap"]
    assert overlap["eval"]["clips"] == 10 and overlap["dropped_training_rows"] >= 10
    splits = manifest["splits"]
    dropped = overlap["dropped_training_rows"] + overlap["dropped_validation_rows"]
    assert splits["train"]["rows"] + splits["validation"]["rows"] == 40 - dropped
    validation_ids = {i.split("/", 1)[1] for i in load_split(tmp_path / "features" / "dropped", "validation")["id"]}
    test_ids = {i.split("/", 1)[1] for i in load_split(tmp_path / "features" / "dropped", "eval")["id"]}
    train_ids = {i.split("/", 1)[1] for i in load_split(tmp_path / "features" / "dropped", "train")["id"]}
    assert not test_ids & train_ids and not test_ids & validation_ids


def test_a_common_voice_clip_is_one_recording_in_every_release():
    """Two releases mixed (cv16 for training, cv17 for testing) hold the same recording in two
    folders, its sentence corrected in between: a shared clip, refused; and rows that name no
    file (an empty path cell) share none."""
    from whisper_ft.features import FeaturesError, check_leakage
    from whisper_ft.sources import Row

    clip = "common_voice_sv-SE_40000001.mp3"
    train = [Row("cv16", "train", f"train/{clip}", f"/d/cv16/sv-SE/clips/{clip}", "Jag gilar kaffe.", "a"),
             Row("cv16", "train", "train/", "/d/cv16/sv-SE/clips/", "Något annat.", "b")]
    test = [Row("cv17", "eval", f"test/{clip}", f"/d/cv17/sv-SE/clips/{clip}", "Jag gillar kaffe.", "a"),
            Row("cv17", "eval", "test/", "/d/cv17/sv-SE/clips/", "Helt annat.", "c")]
    with pytest.raises(FeaturesError, match="shares 1 clip with the 2 test clips"):
        check_leakage({"train": train, "validation": [], "eval": test}, "refuse")
    kept, report = check_leakage({"train": train, "validation": [], "eval": test}, "drop")
    assert [r.id for r in kept["train"]] == ["train/"] and report["eval"]["clips"] == 1


def test_a_clip_listed_in_two_training_splits_is_trained_on_once():
    """train_splits [train, validated]: validated.tsv lists train.tsv's clips again; each is kept
    once (it would count twice in the loss and the hours), and the manifest says how many went."""
    from whisper_ft.features import check_leakage
    from whisper_ft.sources import Row

    def row(split, i):
        clip = f"common_voice_sv-SE_{i}.mp3"
        return Row("cv", "train", f"{split}/{clip}", f"/d/sv-SE/clips/{clip}", f"Mening {i}.", f"s{i}")

    train = [row("train", 1), row("train", 2), row("validated", 1), row("validated", 2), row("validated", 3)]
    kept, report = check_leakage({"train": train, "validation": [], "eval": []}, "refuse")
    assert [r.id for r in kept["train"]] == ["train/common_voice_sv-SE_1.mp3", "train/common_voice_sv-SE_2.mp3",
                                             "validated/common_voice_sv-SE_3.mp3"]
    assert report["repeated_training_rows"] == 2 and report["repeated_test_rows"] == 0


def test_sentence_overlap_is_refused_and_speaker_overlap_only_counted():
    from whisper_ft.features import FeaturesError, check_leakage
    from whisper_ft.sources import Row

    def row(split, i, sentence, speaker):
        return Row("s", split, f"{split}/{i}", f"/c/{split}{i}.mp3", sentence, speaker)

    train = [row("train", 0, "Hej, hur mår du?", "a"), row("train", 1, "Vad heter du", "b")]
    test = [row("test", 0, "hej hur mår du", "c"), row("test", 1, "Något helt annat.", "b")]
    for policy in ("refuse", "drop"):  # a shared sentence alone is dropped, not refused
        kept, report = check_leakage({"train": train, "validation": [], "eval": test}, policy)
        assert [r.id for r in kept["train"]] == ["train/1"] and report["dropped_training_rows"] == 1
        assert report["eval"] == {"rows": 2, "clips": 0, "sentences": 1, "speakers": 1, "training_rows": 1}
    shared_clip = [*train, Row("s", "train", "train/2", "/c/test1.mp3", "Annan text.", "d")]
    with pytest.raises(FeaturesError, match="shares 1 clip and 1 sentence with the 2 test clips"):
        check_leakage({"train": shared_clip, "validation": [], "eval": test})
    kept, report = check_leakage({"train": train, "validation": [], "eval": test}, "keep")
    assert kept["train"] == train and report["kept_overlapping_training_rows"] == 1
    _, report = check_leakage({"train": train[1:], "validation": [], "eval": test})  # speakers alone: no refusal
    assert report["eval"]["speakers"] == 1 and report["dropped_training_rows"] == 0


def test_served_clips_are_spread_over_the_whole_split():
    from whisper_ft.features import KEEP_AUDIO, mark_served_clips
    from whisper_ft.sources import Row

    for n_rows, n in ((399, 200), (10, 3), (5, 5), (3, 10), (1000, 7)):
        rows = [Row("a" if i < n_rows // 2 else "b", "eval", f"test/{i}", f"/c/{i}.mp3", "x") for i in range(n_rows)]
        marked = [i for i, r in enumerate(mark_served_clips(rows, n)) if r.meta.get(KEEP_AUDIO)]
        assert len(marked) == min(n, n_rows)
        gaps = {b - a for a, b in zip(marked, marked[1:])}
        assert max(gaps, default=1) - min(gaps, default=1) <= 1, (n_rows, n, gaps)  # evenly spaced
        assert n_rows - 1 - marked[-1] < n_rows / min(n, n_rows)  # down to the end of the split
    assert mark_served_clips(rows, 0) == rows


def test_validation_sharing_test_clips_is_refused_or_dropped():
    """Validation carved from a split that holds the test clips (validated.tsv) must not score
    test clips: refused, or dropped from validation with on_overlap=drop."""
    from whisper_ft.features import FeaturesError, check_leakage
    from whisper_ft.sources import Row

    def row(split, i, sentence, speaker, clip=None):
        return Row("s", split, f"validated/{clip or split + str(i)}", f"/c/{clip or split + str(i)}.mp3", sentence,
                   speaker)

    train = [row("train", 0, "En mening.", "a")]
    validation = [row("validation", 0, "Två meningar.", "b", clip="t0"), row("validation", 1, "Tre.", "c"),
                  row("validation", 2, "fyra", "d")]
    test = [row("eval", 0, "Två meningar.", "b", clip="t0"), row("eval", 1, "Fyra!", "e"), row("eval", 2, "Fem.", "f")]
    rows = {"train": train, "validation": validation, "eval": test}
    with pytest.raises(FeaturesError, match=r"validation data shares 1 clip and 2 sentences with the 3 test clips "
                                            r"\(s `validated`: 2 rows\): carve validation"):
        check_leakage(rows)
    kept, report = check_leakage(rows, "drop")
    assert [r.id for r in kept["validation"]] == ["validated/validation1"] and kept["train"] == train
    # speaker b read the dropped rows only: the stored splits share no speaker
    assert report["validation_vs_test"] == {"rows": 3, "clips": 1, "sentences": 2, "speakers": 0,
                                            "validation_rows": 2}
    assert report["dropped_validation_rows"] == 2 and report["dropped_training_rows"] == 0
    kept, report = check_leakage(rows, "keep")
    assert kept["validation"] == validation and report["kept_overlapping_validation_rows"] == 2
    assert report["validation_vs_test"]["speakers"] == 1


def test_stores_of_the_previous_format_still_read_and_older_ones_are_refused(tmp_path):
    """Version 3 added the age column; a version-2 store lacks only that and still trains."""
    from whisper_ft.features import FORMAT_VERSION, MANIFEST, FeaturesError

    for version in (FORMAT_VERSION, 2):
        (tmp_path / MANIFEST).write_text(json.dumps({"format_version": version, "name": "x"}))
        assert read_manifest(tmp_path)["format_version"] == version
    (tmp_path / MANIFEST).write_text(json.dumps({"format_version": 1, "name": "x"}))
    with pytest.raises(FeaturesError, match="rerun python feature_pipeline.py"):
        read_manifest(tmp_path)


def test_a_long_recording_is_dropped_without_decoding_past_the_limit(tmp_path, monkeypatch):
    import numpy as np
    import soundfile as sf

    from whisper_ft import features
    from whisper_ft.sources import Row

    sf.write(tmp_path / "long.wav", np.zeros(16000 * 40, np.float32), 16000)
    asked = []
    real = features.load_audio
    monkeypatch.setattr(features, "load_audio", lambda *a, **k: asked.append(k.get("max_seconds")) or real(*a, **k))
    assert features._decode(Row("s", "train", "train/long", str(tmp_path / "long.wav"), "x"), 30.0) == ("too_long", None)
    assert asked == [30.0]


def test_no_manifest_describes_a_store_rebuilt_meanwhile(tmp_path, cv_release, monkeypatch):
    """Between a process's last shard and its manifest, another one's --overwrite may rebuild the
    store: the plan is checked again under the manifest's claim, and nothing is written."""
    from whisper_ft.features import MANIFEST, FeatureStore, FeaturesError

    calls = []
    check = FeatureStore.check_unchanged

    def rebuilt_before_the_manifest(self, fp):
        calls.append(fp)
        if len(calls) == 2:  # the first check is at the start, the second under the manifest's claim
            (self.root / "plan.json").write_text(json.dumps({"fingerprint": "another build"}))
        return check(self, fp)

    monkeypatch.setattr(FeatureStore, "check_unchanged", rebuilt_before_the_manifest)
    with pytest.raises(FeaturesError, match="removed or rebuilt by another process"):
        run_main(tmp_path, "raced", cv_release)
    assert len(calls) == 2 and not (tmp_path / "features" / "raced" / MANIFEST).exists()


def test_a_store_removed_by_another_processs_overwrite_while_this_one_starts_is_one_line(tmp_path, cv_release,
                                                                                        monkeypatch, capsys):
    """--overwrite in another process removes the store between this process's look at its plan
    and its reading of it: one line that says so, not a traceback."""
    from whisper_ft.features import FeatureStore

    args = pipeline_args(tmp_path, "ref", cv_release, *STORE_SETS)
    assert feature_pipeline.main(["--num-shards", "100", "--shard-index", "99", *args]) == 0  # starts the store only
    real_read = features.read_plan
    removed = []

    def removed_first(path, *rest, **kwargs):
        if not removed:
            removed.append(FeatureStore(path.parent).remove(300))
        return real_read(path, *rest, **kwargs)

    monkeypatch.setattr(features, "read_plan", removed_first)
    capsys.readouterr()
    assert cli.run(feature_pipeline.main, ["--num-shards", "2", "--shard-index", "0", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert removed and len(err.splitlines()) == 1 and "removed or rebuilt by another process" in err


def test_two_overwrites_at_once_both_go_on(tmp_path, monkeypatch):
    """Two processes started with --overwrite both find the store and remove it: the one whose
    rename finds it gone already goes on, as if it had removed it itself."""
    from whisper_ft.features import FeatureStore

    root = tmp_path / "features" / "s"
    (root / "train").mkdir(parents=True)
    real_rename = os.rename

    def peer_removes_first(src, dst):
        if Path(src) == root:  # the other process renames it aside and deletes it
            real_rename(root, root.with_name(".s.removing-node-2-1"))
            shutil.rmtree(root.with_name(".s.removing-node-2-1"))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", peer_removes_first)
    FeatureStore(root).remove(300)
    assert list(root.parent.iterdir()) == []


def test_the_stores_config_is_staged_under_a_name_of_this_host_and_process(tmp_path, monkeypatch):
    """Machines sharing the store's folder may run processes of the same pid (containers): the
    config each writes is staged under the host's name too, as the processor and plan are."""
    from whisper_ft.claims import owner_tag
    from whisper_ft.config import load_config
    from whisper_ft.features import CONFIG, FeatureStore

    monkeypatch.setenv(HOST_ENV, "node-1")
    cfg = load_config(ROOT / "config.yaml", [f"features.data_dir={tmp_path}"])
    staged = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: staged.append((Path(src).name, Path(dst).name))
                        or real_replace(src, dst))

    class Processor:
        def save_pretrained(self, folder: str) -> None:
            Path(folder).mkdir(parents=True)

    FeatureStore(tmp_path / "features" / "s").prepare(cfg, Processor(), {}, "fp", overwrite=False)
    assert (f".{CONFIG}.tmp-{owner_tag()}", CONFIG) in staged and owner_tag().startswith("node-1-")


def test_processes_starting_a_new_store_at_once_agree_on_its_plan(tmp_path, monkeypatch):
    """Two processes both find no store and create it: the first plan stands. A process with
    another plan (other settings) stops before writing anything into the store; one with the
    same plan goes on. The process that starts the store writes the processor and config over
    leftovers of a killed start; a later one writes the processor only if it is missing, and
    one that loses that race to a peer keeps the peer's."""
    from whisper_ft import features
    from whisper_ft.config import load_config
    from whisper_ft.features import PROCESSOR_DIR, FeaturesError, FeatureStore

    cfg = load_config(ROOT / "config.yaml", [f"features.data_dir={tmp_path}"])

    class Processor:
        def __init__(self, marker: str):
            self.marker = marker

        def save_pretrained(self, folder: str) -> None:
            Path(folder).mkdir(parents=True)
            (Path(folder) / "processor.txt").write_text(self.marker)

    real_create = features.create_atomic
    peer_fp = "other"

    def peer_creates_first(path, text, tag=""):  # the other process wrote its plan after this one's check
        real_create(path, json.dumps({"fingerprint": peer_fp, "settings": {}}))
        return real_create(path, text, tag)

    store = FeatureStore(tmp_path / "features" / "racy")
    processor = lambda: (store.root / PROCESSOR_DIR / "processor.txt").read_text()  # noqa: E731
    with monkeypatch.context() as m:
        m.setattr(features, "create_atomic", peer_creates_first)
        with pytest.raises(FeaturesError, match="other inputs or settings"):
            store.prepare(cfg, Processor("mine"), {}, "mine", overwrite=False)
        assert sorted(p.name for p in store.root.iterdir()) == ["plan.json"]  # nothing of this process's
        shutil.rmtree(store.root)
        peer_fp = "same"
        store.prepare(cfg, Processor("this one"), {}, "same", overwrite=False)  # the same plan: goes on
        assert processor() == "this one" and (store.root / "config.yaml").is_file()

    store.prepare(cfg, Processor("a later one"), {}, "same", overwrite=False)  # the processor stands
    assert processor() == "this one"

    shutil.rmtree(store.root / PROCESSOR_DIR)  # missing: a later process of the same plan writes it ...
    real_rename = os.rename

    def peer_renames_first(src, dst):  # ... unless a peer renamed its own into place first
        Processor("the peer").save_pretrained(str(Path(dst).with_name("peer")))
        real_rename(Path(dst).with_name("peer"), dst)
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", peer_renames_first)
    store.prepare(cfg, Processor("loser"), {}, "same", overwrite=False)
    monkeypatch.setattr(os, "rename", real_rename)
    assert processor() == "the peer"
    assert not [p for p in store.root.iterdir() if ".tmp-" in p.name]

    shutil.rmtree(store.root)  # a start killed before its plan, by an earlier version: processor first
    Processor("half of another model's").save_pretrained(str(store.root / PROCESSOR_DIR))
    store.prepare(cfg, Processor("new"), {}, "same", overwrite=False)
    assert processor() == "new"

    from whisper_ft.claims import host_name

    killed = store.root / f".{PROCESSOR_DIR}.tmp-{host_name()}-{dead_pid()}"  # a writer killed on this machine
    elsewhere = store.root / f".{PROCESSOR_DIR}.tmp-node-2-{os.getpid()}"  # another machine's: cannot tell
    for folder in (killed, elsewhere):
        Processor("half").save_pretrained(str(folder))
    store.prepare(cfg, Processor("new"), {}, "same", overwrite=False)
    assert not killed.exists() and elsewhere.exists()

    (store.root / "plan.json").write_text("")  # a start killed between creating its plan and writing it
    with pytest.raises(FeaturesError, match="empty or cut short.*--overwrite"):
        features.read_plan(store.root / "plan.json", patience=0.1)


def test_another_machines_processor_and_plan_in_progress_are_left_alone(tmp_path, monkeypatch):
    """The store may be shared over NFS: node-2's processor folder, plan and config, still being
    written, survive this machine's clean-up even when a process of that pid has ended here;
    those of a writer killed on this machine go."""
    from whisper_ft.features import CONFIG, PLAN, PROCESSOR_DIR, clean_partial

    monkeypatch.setenv(HOST_ENV, "node-1")
    pid = dead_pid()
    ours = [tmp_path / f".{name}.tmp-node-1-{pid}" for name in (PROCESSOR_DIR, PLAN, CONFIG)]
    theirs = [tmp_path / f".{name}.tmp-node-2-{pid}" for name in (PROCESSOR_DIR, PLAN, CONFIG)]
    for folder, plan, config in (ours, theirs):
        folder.mkdir()
        plan.write_text("{")
        config.write_text("features:")
    clean_partial(tmp_path, stale_seconds=300)
    assert [p.exists() for p in ours + theirs] == [False, False, False, True, True, True]


def test_a_common_voice_release_of_another_language_than_model_language_is_pointed_out(tmp_path, cv_release):
    """Labels begin with model.language's token: a Norwegian release read with the default `sv`
    would teach the model Norwegian under <|sv|>."""
    from whisper_ft.config import load_config
    from whisper_ft.features import collect_rows

    norwegian = tmp_path / "cv-corpus-20.0" / "nb-NO"
    shutil.copytree(cv_release, norwegian)
    for tsv in norwegian.glob("*.tsv"):  # the locale column, where a release has one
        tsv.write_text(tsv.read_text(encoding="utf-8").replace("\tsv-SE\t", "\tnb-NO\t"), encoding="utf-8")
    sets = [f"features.data_dir={tmp_path}", f"features.sources.0.path={norwegian}"]
    said = []
    collect_rows(load_config(ROOT / "config.yaml", sets), said.append)
    [warning] = [line for line in said if line.startswith("warning:")]
    assert warning == ("warning: source sample is Common Voice nb-NO (Whisper's 'no'), but model.language is 'sv': its "
                       "labels say <|sv|>. For no speech set --set model.language=no for both stages")
    said.clear()
    collect_rows(load_config(ROOT / "config.yaml", [*sets, "model.language=no"]), said.append)
    assert not [line for line in said if line.startswith("warning:")]
    collect_rows(load_config(ROOT / "config.yaml", [f"features.data_dir={tmp_path}",
                                                    f"features.sources.0.path={cv_release}"]), said.append)
    assert not [line for line in said if line.startswith("warning:")]  # sv-SE, sv


def test_training_rows_sharing_clips_with_validation_are_refused():
    """validation_splits=[dev] while train_splits still lists dev: the checks that pick best/
    would score clips the model trained on. The store must be refused, not built."""
    from whisper_ft.features import FeaturesError, check_leakage
    from whisper_ft.sources import Row

    def row(split, i, sentence, speaker):
        return Row("s", split, f"dev/{i}", f"/c/dev{i}.mp3", sentence, speaker)

    validation = [row("validation", i, f"Mening nummer {i}.", "a") for i in range(3)]
    train = [row("train", i, f"Mening nummer {i}.", "a") for i in range(3)] + [
        Row("s", "train", "train/9", "/c/train9.mp3", "Något annat.", "b")]
    test = [Row("s", "eval", "test/0", "/c/test0.mp3", "Helt annan mening.", "c")]
    with pytest.raises(FeaturesError, match="training data shares 3 clips and 3 sentences with the 3 validation"):
        check_leakage({"train": train, "validation": validation, "eval": test})
    kept, report = check_leakage({"train": train, "validation": validation, "eval": test}, "drop")
    assert [r.id for r in kept["train"]] == ["train/9"] and report["dropped_training_rows"] == 3


def test_a_corrected_sentence_changes_the_store_fingerprint():
    """A sentence fixed in the source TSV (same clip, same id) must change the fingerprint, or the
    old store with the wrong label is reused as finished."""
    from whisper_ft.features import fingerprint, plan_shards
    from whisper_ft.sources import Row

    rows = [Row("s", "train", f"train/{i}", f"/c/{i}.mp3", f"Mening {i}.") for i in range(3)]
    corrected = [*rows[:2], Row("s", "train", "train/2", "/c/2.mp3", "Mening två, rättad.")]
    before = fingerprint({}, plan_shards({"train": rows}, 10))
    assert before == fingerprint({}, plan_shards({"train": list(rows)}, 10))
    assert before != fingerprint({}, plan_shards({"train": corrected}, 10))


def test_stats_that_parse_but_lack_a_key_are_no_finished_shard(tmp_path):
    """A stats.json edited or written by another version, missing a key, must count as unfinished
    (rebuilt by a rerun), not crash training later on the missing key."""
    from whisper_ft.features import STATS, STATS_KEYS, shard_stats

    whole = {k: 1 for k in STATS_KEYS}
    (tmp_path / STATS).write_text(json.dumps(whole))
    assert shard_stats(tmp_path) == whole
    for key in STATS_KEYS:
        (tmp_path / STATS).write_text(json.dumps({k: v for k, v in whole.items() if k != key}))
        assert shard_stats(tmp_path) is None, key
