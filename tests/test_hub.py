"""Publishing on the Hugging Face Hub: the card's metadata, the file set and commit of a push
(huggingface_hub's HfApi calls replaced, as there is no network here), the order of training
and pushing, and the real error paths of the command line: no token, offline, no connection,
and a Hub that refuses the token."""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from app_helpers import free_port
from conftest import ROOT, run_cli
from whisper_ft import hub, report
from whisper_ft.config import ConfigError, load_config, save_config, to_dict

REPO = "me/whisper-sv"
FINAL = {"step": 3000, "split": "test", "purpose": "report", "wer": 0.1834, "wer_normalized": 0.1203, "cer": 0.0611,
         "eval_clips": 500}
SUMMARY = {"selection_split": "validation", "test_split": "test", "best_wer": 0.2104, "best_step": 3000,
           "selection_baseline": None, "wer": 0.1834, "wer_normalized": 0.1203, "cer": 0.0611, "eval_clips": 500,
           "final": FINAL, "baseline": {**FINAL, "step": 0, "wer": 0.45, "wer_normalized": 0.38, "cer": 0.2},
           "steps": 4000, "samples_seen": 64000, "train_runtime_seconds": 3600.0, "run_dir": ""}
MANIFEST = {"name": "cv-sv",
            "sources": [{"name": "cv", "kind": "common_voice", "where": "/data/cv-corpus-23.0-2025-09-05/sv-SE"}],
            "splits": {"train": {"clips": 100, "hours": 0.1, "by_source": {"cv": 100}}}}
BEST_FILES = {"config.json": "{}", "generation_config.json": "{}", "model.safetensors": "weights",
              "tokenizer.json": "{}", "preprocessor_config.json": "{}", "best.json": "{}", "training_curves.png": "png",
              "ct2/model.bin": "int8", "ct2/config.json": "{}"}
LEFTOVERS = {".README.md.tmp-99": "half a card", "ct2.tmp/model.bin": "half an export"}
RUN_LOGS = {"metrics.jsonl": '{"event": "start", "step": 0}\n',  # beside best/ in the run folder
            "predictions.jsonl": '{"id": "test/1", "speaker": "a1b2", "reference": "Hej.", "prediction": "hej"}\n'}


def run_config(root: Path, *overrides: str):
    return load_config(None, ["training.run_name=small-sv", f"training.output_dir={root}", "features.sources.0.name=cv",
                              "features.sources.0.path=/data/cv-corpus-23.0-2025-09-05/sv-SE", *overrides])


def card_data(summary: dict, cfg, repo: str = REPO):
    """`report.card_data` of a run whose store was built from `cfg`'s sources."""
    from whisper_ft.sources import describe

    return report.card_data(summary, to_dict(cfg), repo, [describe(s) for s in cfg.features.sources])


def make_run(root: Path, summary: dict = SUMMARY) -> Path:
    """A finished run folder as training_pipeline.py leaves it, with small stand-ins for the weights."""
    cfg = run_config(root)
    run = root / "small-sv"
    for name, text in {**BEST_FILES, **LEFTOVERS}.items():
        (run / "best" / name).parent.mkdir(parents=True, exist_ok=True)
        (run / "best" / name).write_text(text)
    (run / "best" / "README.md").write_text(report.model_card(summary, to_dict(cfg), MANIFEST))
    (run / "metrics.json").write_text(json.dumps({**summary, "run_dir": str(run)}))
    for name, text in RUN_LOGS.items():
        (run / name).write_text(text)
    save_config(cfg, run / "config.yaml")
    return run


def snapshot(folder: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def results(data) -> list[tuple]:
    return [(r.dataset_split, r.metric_name, r.metric_value) for r in data.eval_results or []]


def test_card_metadata_reports_test_and_names_every_split(tmp_path):
    cfg = run_config(tmp_path)
    config = to_dict(cfg)
    data = card_data(SUMMARY, cfg)
    assert (data.language, data.base_model, data.pipeline_tag) == ("sv", "openai/whisper-small",
                                                                   "automatic-speech-recognition")
    assert data.datasets == ["common_voice"] and data.model_name == REPO
    assert results(data) == [("test", "Test WER", 18.34), ("test", "Test WER (normalized)", 12.03),
                             ("test", "Test CER", 6.11), ("validation", "Validation WER (checkpoint selection)", 21.04)]
    assert {r.dataset_name for r in data.eval_results} == {"Common Voice 23.0 (cv)"}
    # picked on the test split (no validation split): only test numbers, each saying it is optimistic
    on_test = card_data({**SUMMARY, "selection_split": "test"}, cfg)
    assert [(split, name) for split, name, _ in results(on_test)] == [
        ("test", f"Test WER{report.OPTIMISTIC}"), ("test", f"Test WER (normalized){report.OPTIMISTIC}"),
        ("test", f"Test CER{report.OPTIMISTIC}")]
    assert "optimistic" not in hub.commit_message(SimpleNamespace(summary=SUMMARY, config=config))
    assert hub.commit_message(SimpleNamespace(summary={**SUMMARY, "selection_split": "test"}, config=config)) == (
        f"small-sv: best/ from step 3000, test WER 18.34%{report.OPTIMISTIC}")
    # trained on held-out clips (features.on_overlap: keep): every test figure says so
    leaky = {**SUMMARY, "overlapping_training_rows": 12}
    assert [name for _, name, _ in results(card_data(leaky, cfg))][:3] == [
        f"Test WER{report.NOT_HELD_OUT}", f"Test WER (normalized){report.NOT_HELD_OUT}", f"Test CER{report.NOT_HELD_OUT}"]
    assert hub.commit_message(SimpleNamespace(summary=leaky, config=config)).endswith(report.NOT_HELD_OUT)
    chosen = {**SUMMARY, "overlapping_validation_rows": 3}  # validation shares clips with test: picked on them
    assert results(card_data(chosen, cfg))[0][1] == f"Test WER{report.CHOSEN_ON_OVERLAP}"
    mixed = run_config(tmp_path, "features.sources.1.name=nst", "features.sources.1.kind=hf",
                       "features.sources.1.path=someone/nst-sv")
    assert card_data(SUMMARY, mixed).datasets == ["common_voice", "someone/nst-sv"]
    local = run_config(tmp_path, f"model.name_or_path={tmp_path}", "features.sources.0.kind=hf",
                       f"features.sources.0.path={tmp_path}")
    data = card_data(SUMMARY, local)  # local folders are no Hub ids
    assert data.base_model is None and data.datasets is None and data.eval_results[0].dataset_type == "cv"
    sample = card_data(SUMMARY, run_config(tmp_path, "features.sources.0.path=data/sample/cv-corpus-sample/sv-SE"))
    assert sample.datasets is None  # the embedded sample is synthetic speech: no Common Voice clip
    assert {r.dataset_name for r in sample.eval_results} == {"synthetic speech in Common Voice format (cv)"}
    from whisper_ft.sources import describe

    cfg = run_config(tmp_path)
    older = to_dict(cfg)
    older["model"]["language"] = "swedish"  # a run configured before names were refused
    named = report.card_data(SUMMARY, older, REPO, [describe(s) for s in cfg.features.sources])
    assert named.language == "sv" and named.license == "apache-2.0"  # the Hub takes ISO codes only
    assert report.language_code("jw") == "jv"  # Whisper's Javanese


def test_card_text_says_what_was_scored_and_the_steps_used(tmp_path):
    cfg = to_dict(run_config(tmp_path, "training.max_steps=12345"))
    card = report.model_card({**SUMMARY, "warmup_steps": 1235}, cfg, MANIFEST)
    assert "| warmup_steps | 1235 (from warmup_fraction) |" in card and "| max_steps | 12345 |" in card
    lowered = report.model_card({**SUMMARY, "steps": 12000, "schedule_steps": 20000}, cfg, MANIFEST)  # to finish
    assert "| max_steps | 12000 (stopped there: its learning-rate schedule ran towards 20000) |" in lowered
    assert "| max_steps | 12345 |" in report.model_card({**SUMMARY, "schedule_steps": 4000}, cfg, MANIFEST)
    assert "scored once before training and once on the shipped model" in card and "zero-shot (step 0)" in card
    card = report.model_card({**SUMMARY, "baseline": None}, cfg, MANIFEST)  # eval_before_training: false
    assert "scored on the shipped model." in card and "zero-shot" not in card
    assert "not held-out scores" not in card
    assert "64000 training samples seen, 3600 s.\n" in card
    resumed = report.model_card({**SUMMARY, "train_sessions": 3}, cfg, MANIFEST)  # runtime: the last session's
    assert "64000 training samples seen, 3600 s in the last of its 3 training sessions (resumed).\n" in resumed
    card = report.model_card({**SUMMARY, "overlapping_training_rows": 1234}, cfg, MANIFEST)
    assert "1,234 training rows share a clip or a sentence with validation or test rows" in card
    assert "not held-out scores" in card and "validation rows share" not in card
    card = report.model_card({**SUMMARY, "overlapping_validation_rows": 5}, cfg, MANIFEST)
    assert "5 validation rows share a clip or a sentence with test rows" in card and "training rows share" not in card


def test_card_says_how_many_checks_an_average_took():
    """A run with fewer checks than average_checkpoints (or N raised for a rerun) averages those
    it kept: the card says so rather than claiming N."""
    avg = {"mode": "last", "n": 3, "metric": "wer", "steps": [2, 4], "chosen": False, "score": 0.5,
           "single_score": 0.4, "single_step": 4, "wer": 0.5, "single_wer": 0.4}
    text = report.averaging_section(avg, "validation")
    assert text.startswith("Checkpoint averaging of the last 3 checks, only 2 kept (steps 2, 4): validation WER")
    assert "only" not in report.averaging_section({**avg, "n": 2}, "validation")
    skipped = report.averaging_section({**avg, "steps": [4], "skipped": "1 check(s) to average"}, "validation")
    assert skipped == "Checkpoint averaging of the last 3 checks: skipped (1 check(s) to average).\n"


def test_card_names_the_store_of_the_held_out_splits(tmp_path):
    """With training.eval_features, validation and test come from that store: the card says so
    and lists only the training split of the training store."""
    splits = {"train": {"clips": 100, "hours": 0.1, "by_source": {"cv": 100}},
              "validation": {"clips": 3, "hours": 0.01, "by_source": {"cv": 3}},
              "eval": {"clips": 10, "hours": 0.02, "by_source": {"cv": 10}}}
    manifest = {**MANIFEST, "splits": splits}
    own = report.model_card(SUMMARY, to_dict(run_config(tmp_path)), manifest)
    assert "Test split, 500 clips" in own and "- test: 10 clips" in own and "- validation: 3 clips" in own
    other = report.model_card(SUMMARY, to_dict(run_config(tmp_path, "training.eval_features=cv-other")), manifest)
    assert "Test split of feature store `cv-other`, 500 clips" in other
    assert "- validation and test: feature store `cv-other`" in other
    assert "- train: 100 clips" in other and "- test: 10 clips" not in other and "- validation: 3" not in other


def test_push_target_is_validated():
    assert load_config(None, [f"training.push_to_hub={REPO}"]).training.push_to_hub == REPO
    for bad, message in (("whisper-sv", "expected USER/NAME"), ("me/whisper sv", "not a Hub repository id")):
        with pytest.raises(ConfigError, match=f"training.push_to_hub: .*{message}"):
            load_config(None, [f"training.push_to_hub={bad}"])


def test_the_card_names_the_sources_the_store_was_built_from_not_the_training_config(tmp_path):
    """Stage 2 reads its store by name: the sources its config lists (the default, the sample)
    need not be the ones the store was built from, which its manifest records."""
    from huggingface_hub import ModelCard

    built = {**MANIFEST,
             "sources": [{"name": "cv", "kind": "common_voice", "where": "/d/cv-corpus-17.0-2024-03-15/sv-SE"}]}
    cfg = load_config(None, ["training.run_name=small-sv"])  # features.sources: the embedded sample
    data = ModelCard(report.model_card(SUMMARY, to_dict(cfg), built)).data
    assert data.datasets == ["common_voice"]
    assert {r.dataset_name for r in data.eval_results} == {"Common Voice 17.0 (cv)"}


def test_a_push_renames_the_cards_model_index_and_keeps_the_rest_of_its_metadata(tmp_path):
    from huggingface_hub import ModelCard

    run = hub.finished_run(make_run(tmp_path))
    trained, pushed = ModelCard(run.card).data, ModelCard(hub.readme(run, "someone/other-name")).data
    assert trained.model_name == "small-sv" and pushed.model_name == "someone/other-name"
    assert pushed.eval_results == trained.eval_results and pushed.datasets == trained.datasets
    assert ModelCard(hub.readme(run, "someone/other-name")).text == ModelCard(run.card).text


def test_training_card_carries_the_metadata(tmp_path):
    from huggingface_hub import ModelCard

    card = ModelCard.load(make_run(tmp_path) / "best" / "README.md")
    assert card.data.model_name == "small-sv" and results(card.data)[0] == ("test", "Test WER", 18.34)
    assert "## Results" in card.text


def test_the_card_names_only_files_the_repository_holds_or_says_they_stay_home(tmp_path):
    """Every file the published card names is pushed, except predictions.jsonl (the test
    sentences and speaker metadata), which the card says stays in the run folder."""
    import re

    from whisper_ft import breakdown

    run = make_run(tmp_path)
    pushed = set(hub.push_files(run / "best"))
    groups = breakdown.breakdowns([json.loads(line) for line in RUN_LOGS["predictions.jsonl"].splitlines()])
    card = (run / "best" / "README.md").read_text() + breakdown.markdown_section(groups)
    named = set(re.findall(r"`([\w.-]+\.(?:jsonl|json|png|safetensors|bin))`", card))
    assert "metrics.jsonl" in named and named - pushed == {"predictions.jsonl"}
    assert "stay in the training run's folder and are not published" in card
    assert "`predictions.jsonl` in the training run's folder" in card


def test_push_files_skip_the_readme_and_leftovers(tmp_path):
    assert set(hub.push_files(make_run(tmp_path) / "best")) == set(BEST_FILES) | {"metrics.jsonl"}
    with pytest.raises(hub.HubError, match="not a finished run"):
        hub.finished_run(tmp_path / "nothing")


class FakeHub:
    """HfApi's network calls, recording what a push sends; the repository keeps its files."""

    def __init__(self):
        self.files = {".gitattributes", "README.md", "old-weights.bin"}
        self.calls: list[tuple] = []
        self.commits: list[list] = []

    def whoami(self, *args, **kwargs):
        self.calls.append(("whoami",))
        return {"name": "me", "auth": {"accessToken": {"role": "write"}}}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs.get("private"), kwargs.get("exist_ok")))
        return f"https://huggingface.co/{repo_id}"

    def update_repo_settings(self, repo_id, **kwargs):
        self.calls.append(("update_repo_settings", repo_id, kwargs.get("private")))

    def list_repo_files(self, repo_id, **kwargs):
        return sorted(self.files)

    def create_commit(self, repo_id, operations, **kwargs):
        from huggingface_hub import CommitOperationDelete

        self.commits.append(list(operations))
        for op in operations:
            if isinstance(op, CommitOperationDelete):
                self.files.discard(op.path_in_repo)
            else:
                self.files.add(op.path_in_repo)


@pytest.fixture
def fake_hub(monkeypatch):
    from huggingface_hub import HfApi

    fake = FakeHub()
    for name in ("whoami", "create_repo", "update_repo_settings", "list_repo_files", "create_commit"):
        monkeypatch.setattr(HfApi, name, getattr(fake, name))
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    return fake


def cli_args(root: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "config.yaml"), "--set", f"training.output_dir={root}",
            "--set", "training.run_name=small-sv", "--push-to-hub", REPO, *extra]


def test_push_only_uploads_best_with_the_card_and_updates_in_place(tmp_path, fake_hub, capsys):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, ModelCard

    import training_pipeline

    run = make_run(tmp_path)
    before = snapshot(run)
    assert training_pipeline.main(cli_args(tmp_path, "--push-only", "--private")) == 0
    assert f"https://huggingface.co/{REPO}" in capsys.readouterr().out
    assert ("create_repo", REPO, True, True) in fake_hub.calls
    assert ("update_repo_settings", REPO, True) in fake_hub.calls
    added = {op.path_in_repo: op for op in fake_hub.commits[0] if isinstance(op, CommitOperationAdd)}
    assert set(added) == set(BEST_FILES) | {"README.md", "metrics.jsonl"}
    deleted = [op.path_in_repo for op in fake_hub.commits[0] if isinstance(op, CommitOperationDelete)]
    assert deleted == ["old-weights.bin"]  # what the run no longer has; .gitattributes stays
    card = ModelCard(added["README.md"].path_or_fileobj.decode())
    assert card.data.model_name == REPO and card.data.base_model == "openai/whisper-small"
    assert results(card.data)[0] == ("test", "Test WER", 18.34) and "## Results" in card.text
    assert snapshot(run) == before  # the local run is left as it was
    # a re-push (public this time) commits the same files to the same repository and deletes nothing
    assert training_pipeline.main(cli_args(tmp_path, "--push-only")) == 0
    assert fake_hub.calls[-1] == ("create_repo", REPO, None, True)
    assert not [op for op in fake_hub.commits[1] if isinstance(op, CommitOperationDelete)]
    assert {op.path_in_repo for op in fake_hub.commits[1]} == set(added)


def test_a_push_publishes_no_local_path_of_the_base_model(tmp_path, fake_hub):
    """Trained from a local folder: the public card names it by the folder's own name and the
    published best.json has no base model, neither says where it lies on this machine."""
    from huggingface_hub import CommitOperationAdd

    base = tmp_path / "home" / "alice" / "models" / "whisper-small"
    base.mkdir(parents=True)
    run = make_run(tmp_path)
    cfg = run_config(tmp_path, f"model.name_or_path={base}")
    save_config(cfg, run / "config.yaml")
    (run / "best" / "README.md").write_text(report.model_card(SUMMARY, to_dict(cfg), MANIFEST))
    (run / "best" / "best.json").write_text(json.dumps({"step": 3000, "base_model": str(base), "language": "sv"}))
    hub.push(run, REPO)
    added = {op.path_in_repo: op.path_or_fileobj for op in fake_hub.commits[0] if isinstance(op, CommitOperationAdd)}
    card, info = added["README.md"].decode(), json.loads(added["best.json"])
    assert "A local Whisper model (`whisper-small`) fine-tuned" in card and "alice" not in card
    assert info == {"step": 3000, "base_model": None, "language": "sv"}
    assert json.loads((run / "best" / "best.json").read_text())["base_model"] == str(base)  # kept at home


def test_a_run_whose_best_has_no_weights_is_not_pushed(tmp_path, fake_hub):
    """best/ with its card and config but no *.safetensors (a copy cut short, weights deleted to save
    space) would publish a model repository that nobody can load: the push refuses it, naming what
    is missing, before anything is created or uploaded."""
    import training_pipeline

    run = make_run(tmp_path)
    (run / "best" / "model.safetensors").unlink()
    with pytest.raises(hub.HubError, match=r"is not a finished run \(no best/\*\.safetensors\)"):
        training_pipeline.main(cli_args(tmp_path, "--push-only"))
    assert not fake_hub.commits and not [call for call in fake_hub.calls if call[0] != "whoami"]


def test_push_without_private_leaves_a_new_repository_to_the_owners_default(tmp_path, fake_hub):
    """private=False would make a repository public even in an organisation whose new
    repositories are private; without --private the Hub's default is asked for (None)."""
    hub.push(make_run(tmp_path), "my-org/whisper-sv")
    assert ("create_repo", "my-org/whisper-sv", None, True) in fake_hub.calls
    assert not [call for call in fake_hub.calls if call[0] == "update_repo_settings"]


@pytest.fixture
def trainings(tmp_path, monkeypatch) -> list[str]:
    """training_pipeline's run_training replaced by one that leaves a finished run in tmp_path."""
    import training_pipeline

    calls = []

    def fake_training(cfg, fresh=False):
        calls.append(cfg.training.run_name)
        return json.loads((make_run(tmp_path) / "metrics.json").read_text())

    monkeypatch.setattr(training_pipeline, "run_training", fake_training)
    return calls


def test_push_after_training_and_a_refusal_says_how_to_retry(tmp_path, fake_hub, trainings, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import httpx

    import training_pipeline

    assert training_pipeline.main(cli_args(tmp_path)) == 0
    assert trainings == ["small-sv"] and fake_hub.calls[0] == ("whoami",) and len(fake_hub.commits) == 1

    def refuse(*args, **kwargs):
        raise HfHubHTTPError("403 Forbidden", response=httpx.Response(403, request=httpx.Request("POST", "http://x")))

    monkeypatch.setattr(HfApi, "create_commit", refuse)
    with pytest.raises(hub.HubError, match=r"may not write there \(403\).*rerun the same command with --push-only"):
        training_pipeline.main(cli_args(tmp_path))


def test_no_token_stops_before_training(tmp_path, trainings, monkeypatch):
    from huggingface_hub import constants

    import training_pipeline

    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(hub.HubError, match="no Hugging Face token"):
        training_pipeline.main(cli_args(tmp_path))
    assert trainings == []


def fine_grained(*scoped: tuple[str, str, list[str]], everywhere: tuple[str, ...] = ()) -> dict:
    """HfApi.whoami's answer for alice (member of my-org) with a fine-grained token: its scoped
    entries as (entity type, entity name, permissions)."""
    scopes = [{"entity": {"type": kind, "name": name}, "permissions": perms} for kind, name, perms in scoped]
    return {"name": "alice", "orgs": [{"name": "my-org"}], "auth": {"accessToken": {
        "role": "fineGrained", "fineGrained": {"global": list(everywhere), "scoped": scopes}}}}


def test_access_check_refuses_tokens_that_cannot_write_to_the_repository(monkeypatch):
    """A token passes only where it may write: its owner's namespace or an organisation of theirs,
    and for a fine-grained token (the Hub's default kind) repo.write there. An answer without
    these fields is taken as it was."""
    from huggingface_hub import HfApi

    write = {"name": "alice", "orgs": [{"name": "my-org"}], "auth": {"accessToken": {"role": "write"}}}
    read_only = fine_grained(("user", "alice", ["repo.content.read"]))
    assert hub.write_refusal(write, "alice/whisper-sv") is None and hub.write_refusal(write, "My-Org/x") is None
    assert "alice is not a member of other-org; push to alice/NAME" in hub.write_refusal(write, "other-org/x")
    assert "no write access (repo.write) to the repositories of alice" in hub.write_refusal(read_only, "alice/x")
    assert hub.write_refusal(fine_grained(("user", "alice", ["repo.write"])), "alice/x") is None
    assert hub.write_refusal(fine_grained(("user", "alice", ["repo.write"])), "my-org/x") is not None
    assert hub.write_refusal(fine_grained(("org", "my-org", ["repo.content.read", "repo.write"])), "my-org/x") is None
    assert hub.write_refusal(fine_grained(("model", "my-org/x", ["repo.write"])), "my-org/x") is None
    assert hub.write_refusal(fine_grained(("model", "my-org/y", ["repo.write"])), "my-org/x") is not None
    assert hub.write_refusal(fine_grained(everywhere=("repo.write",)), "my-org/x") is None
    assert hub.write_refusal({"name": "alice"}, "anyone/x") is None  # nothing to go on: the push will say
    assert hub.write_refusal({"auth": {"accessToken": {"role": "read"}}}, "me/x").startswith("it is read-only")
    monkeypatch.setattr(HfApi, "whoami", lambda self, *a, **k: read_only)
    with pytest.raises(hub.HubError, match="token of alice cannot publish alice/whisper-sv: the fine-grained token"):
        hub.check_access("hf_x", "alice/whisper-sv")


class RefusingHub(http.server.BaseHTTPRequestHandler):
    """A Hub endpoint on 127.0.0.1 that refuses every token, as huggingface.co does a revoked one."""

    def do_GET(self):
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "Invalid credentials in Authorization header"}')

    def log_message(self, *args):
        pass


@pytest.fixture
def refusing_endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_push_errors_are_one_line_fast_and_leave_the_run_alone(tmp_path):
    """The command line without a token, and without a connection: exit 2, one line, seconds."""
    run = make_run(tmp_path)
    before = snapshot(run)
    no_login = {"HF_HOME": str(tmp_path / "hf-home"), "HUGGING_FACE_HUB_TOKEN": ""}
    cases = {"no Hugging Face token to publish with: run `hf auth login`": {"HF_TOKEN": ""},
             "cannot reach http://127.0.0.1": {"HF_TOKEN": "hf_test", "HF_HUB_OFFLINE": "0",
                                               "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}}
    for message, env in cases.items():
        start = time.monotonic()
        proc = run_cli("training_pipeline.py", *cli_args(tmp_path, "--push-only"), env={**no_login, **env}, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and time.monotonic() - start < 60
    assert snapshot(run) == before


def test_offline_refused_and_missing_runs_are_said_plainly(tmp_path, refusing_endpoint, monkeypatch):
    from huggingface_hub import constants

    import training_pipeline

    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE is set"):  # the tests run with HF_HUB_OFFLINE=1
        hub.check_access("hf_test", REPO)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", refusing_endpoint)
    with pytest.raises(hub.HubError, match=r"the Hub does not accept the token \(401\): run `hf auth login`"):
        hub.check_access("hf_revoked", REPO)
    monkeypatch.setenv("HF_TOKEN", "")  # a missing run is said before the token is looked for
    with pytest.raises(hub.HubError, match="is not a finished run"):
        training_pipeline.main(cli_args(tmp_path / "elsewhere", "--push-only"))


def test_local_model_is_a_folder_or_a_cached_download(tmp_path):
    assert hub.local_model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(hub.HubError, match="neither a local folder nor in the Hugging Face cache.*HF_HUB_OFFLINE"):
        hub.local_model("me/not-downloaded-anywhere")
    for missing in (str(tmp_path / "gone" / "best"), "checkpoints/x/best"):  # a folder that is not there
        with pytest.raises(hub.HubError, match="neither a local folder nor a Hugging Face Hub id"):
            hub.local_model(missing)


def test_a_missing_or_private_model_is_no_refused_token_and_a_download_asks_for_read_access(monkeypatch):
    """Without a token the Hub answers 401 for a model that is missing or private: the error says
    so, and nothing about a download asks for write access."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    from huggingface_hub.utils import httpx

    def answer(error, status, **headers):
        def download(*args, **kwargs):
            request = httpx.Request("GET", f"https://huggingface.co/api/models/{REPO}")
            raise error(f"{status} Client Error", response=httpx.Response(status, request=request, headers=headers))
        return download

    cases = {answer(RepositoryNotFoundError, 401, **{"X-Error-Code": "RepoNotFound"}): "no such repository, or a",
             answer(GatedRepoError, 401, **{"X-Error-Code": "GatedRepo"}): "gated: accept its conditions",
             answer(HfHubHTTPError, 401): r"does not accept the token \(401\).*a token that may read the model",
             answer(HfHubHTTPError, 403): r"may not read there \(403\)"}
    for download, message in cases.items():
        monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
        with pytest.raises(hub.HubError, match=f"cannot download {REPO}: .*{message}") as caught:
            hub.local_model(REPO)
        assert "write" not in str(caught.value)


def test_card_says_the_average_was_shipped_only_when_it_was():
    """The card must not claim the averaged weights are best/ when the best single check was
    shipped instead (or the reverse): users compare the card with best.json."""
    avg = {"mode": "last", "n": 2, "metric": "wer", "steps": [2, 4], "score": 0.5, "single_score": 0.4,
           "single_step": 4, "wer": 0.5, "single_wer": 0.4}
    single = report.averaging_section({**avg, "chosen": False}, "validation")
    assert "the best single check (step 4) was shipped" in single and "average was shipped" not in single
    averaged = report.averaging_section({**avg, "chosen": True, "score": 0.3, "wer": 0.3}, "validation")
    assert "**the average was shipped** as best/" in averaged and "single check (step 4) was shipped" not in averaged


def test_validation_wer_row_carries_the_wer_when_checks_were_selected_by_cer(tmp_path):
    """With training.select_metric: cer the summary's best_score is a CER; the metadata row named
    "Validation WER" must still carry best/'s validation WER, not that CER."""
    summary = {**SUMMARY, "select_metric": "cer", "best_score": 0.0712}
    [row] = [r for r in results(card_data(summary, run_config(tmp_path))) if r[0] == "validation"]
    assert row == ("validation", "Validation WER (checkpoint selection)", round(100 * summary["best_wer"], 2))
