"""The Hugging Face Space export: the folder's files and front matter, and the folder alone,
copied away from the checkout, serving the page (gradio_client transcribes a Swedish clip)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from app_helpers import fast_model, free_port, speech_wav
from conftest import ROOT, run_cli
from whisper_ft import space
from whisper_ft.config import ConfigError, load_config


def front_matter(readme: Path) -> dict:
    from huggingface_hub import SpaceCard

    return SpaceCard.load(readme).data.to_dict()


def test_export_for_a_hub_id(tmp_path):
    import gradio

    cfg = load_config(None, ["app.model=me/whisper-sv", "app.cookies_file=/home/x/cookies.txt",
                             "app.auth_file=/home/x/logins", "app.allow_private_urls=true", "app.device=cuda"])
    out = space.export(tmp_path / "space", cfg)
    meta = front_matter(out / "README.md")
    assert (meta["sdk"], meta["sdk_version"], meta["app_file"]) == ("gradio", gradio.__version__, "app.py")
    assert meta["models"] == ["me/whisper-sv"] and meta["python_version"] == "3.11" and meta["title"]
    reqs = (out / "requirements.txt").read_text().splitlines()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in reqs
    project = (ROOT / "requirements.txt").read_text().splitlines()
    for name in ("torch", "transformers", "gradio", "ctranslate2", "faster-whisper"):
        pinned = [line for line in reqs if line.startswith(name)]
        assert pinned and pinned[0] in project, name  # same pin as the project
    assert (out / "packages.txt").read_text().split() == ["ffmpeg"]
    cfg = load_config(out / "config.yaml")
    assert cfg.app.model == "me/whisper-sv" and cfg.model.language == "sv"
    assert cfg.app.cookies_file == cfg.app.auth_file == ""  # local secrets stay here
    assert cfg.app.allow_private_urls is False  # a public page never fetches this machine's network
    assert cfg.app.device == "cpu"  # it installs torch's CPU build
    modules = {p.stem for p in (out / "whisper_ft").glob("*.py")}
    assert {"app", "transcribe", "audio", "ct2", "hub", "cli", "config"} <= modules
    assert not modules & {"train", "features", "sweep", "decoding", "collator"}  # training code stays home
    assert (out / "inference_app.py").read_text() == (ROOT / "inference_app.py").read_text()
    # an earlier export is replaced in place; a folder with anything else is refused
    (out / "whisper_ft" / "stale.py").write_text("")
    (out / "__pycache__").mkdir()  # from running the export locally
    (out / ".README.md.tmp-4242").write_text("half a card")  # an export killed while writing
    assert space.export(out, load_config(None, ["app.model=me/other"])) == out
    assert not (out / "__pycache__").exists() and not (out / ".README.md.tmp-4242").exists()
    assert not (out / "whisper_ft" / "stale.py").exists() and front_matter(out / "README.md")["models"] == ["me/other"]
    with pytest.raises(space.SpaceError, match="holds other files"):
        space.export(ROOT, load_config(None, ["app.model=me/whisper-sv"]))



def test_export_refuses_a_folder_of_the_users_own_files_with_an_exports_names(tmp_path):
    cfg = load_config(None, ["app.model=me/whisper-sv"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("# my notes\n")
    (mine / "config.yaml").write_text("my: settings\n")
    with pytest.raises(space.SpaceError, match=r"holds other files \(README.md, config.yaml\); name an empty folder"):
        space.export(mine, cfg)
    assert (mine / "README.md").read_text() == "# my notes\n" and (mine / "config.yaml").read_text() == "my: settings\n"
    (mine / "app.py").write_text("print('my own app')\n")  # an app.py of its own is no export either
    with pytest.raises(space.SpaceError, match="holds other files"):
        space.export(mine, cfg)
    assert sorted(p.name for p in mine.iterdir()) == ["README.md", "app.py", "config.yaml"]
    killed = tmp_path / "killed"  # an export killed after its first file is its own, and finished by the next
    killed.mkdir()
    (killed / "app.py").write_text(space.APP)
    (killed / ".config.yaml.tmp-4242").write_text("half a config")
    assert space.export(killed, cfg) == killed and space.MARKER in (killed / "app.py").read_text()
    assert load_config(killed / "config.yaml").app.model == "me/whisper-sv"
    clone = tmp_path / "clone"  # a new Space, cloned: its template card (kept by git) is replaced
    (clone / ".git").mkdir(parents=True)
    (clone / ".gitattributes").write_text("*.bin filter=lfs\n")
    (clone / "README.md").write_text("---\ntitle: Whisper Sv\nsdk: gradio\n---\n")
    assert space.export(clone, cfg) == clone and space.MARKER in (clone / "app.py").read_text()
    (clone / "notes.txt").write_text("mine")
    with pytest.raises(space.SpaceError, match=r"holds other files \(notes.txt\)"):
        space.export(clone, cfg)


def test_the_space_transcribes_and_names_the_language_its_model_was_fine_tuned_for(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps({"language": "no", "task": "transcribe"}))
    out = space.export(tmp_path / "space", load_config(None, [f"app.model={tmp_path / 'model'}"]))
    meta = front_matter(out / "README.md")
    assert meta["title"] == "Norwegian speech to text" and "norwegian" in meta["tags"]
    assert "Transcribe Norwegian speech" in (out / "README.md").read_text()
    assert load_config(out / "config.yaml").model.language == "no"
    hub = front_matter(space.export(tmp_path / "hub", load_config(None, ["app.model=me/x", "model.language=da"]))
                       / "README.md")
    assert hub["title"] == "Danish speech to text"  # a hub model: model.language (the page reads its own later)


def test_running_the_export_leaves_no_bytecode_to_upload(tmp_path):
    """`python space/app.py` then `hf upload ... space/`: a __pycache__ written beside the code
    (with this machine's paths) would be published with it."""
    (tmp_path / "model").mkdir()
    out = space.export(tmp_path / "space", load_config(None, [f"app.model={tmp_path / 'model'}"]))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    proc = subprocess.run([sys.executable, str(out / "app.py"), "--help"], cwd=tmp_path,
                          env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--model" in proc.stdout, proc.stderr[-2000:]
    # a download or a translation runs in a child process (whisper_ft.child), started as app.py runs
    script = ("import sys; sys.dont_write_bytecode = True; sys.path.insert(0, sys.argv[1])\n"
              "from whisper_ft import child\n"
              "try:\n    child.run('whisper_ft.translate', {}, timeout=120)\nexcept child.ChildFailed:\n    pass\n")
    proc = subprocess.run([sys.executable, "-c", script, str(out)], cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(out.rglob("__pycache__")) and not list(out.rglob("*.pyc"))


def test_export_space_expands_a_tilde_the_shell_left_and_says_where_it_wrote(tmp_path, monkeypatch, capsys):
    import inference_app

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    config = tmp_path / "home" / "c.yaml"
    config.parent.mkdir()
    config.write_text("app:\n  model: me/whisper-sv\n")
    assert inference_app.main(["--export-space=~/sp", "--config=~/c.yaml"]) == 0  # bash keeps ~ after =
    assert capsys.readouterr().out == f"wrote the Space to {tmp_path / 'home' / 'sp'}\n"
    assert space.is_export(tmp_path / "home" / "sp") and list((tmp_path / "cwd").iterdir()) == []
    monkeypatch.chdir(tmp_path)
    assert inference_app.main(["--export-space", "home/sp", "--config", str(config)]) == 0
    assert capsys.readouterr().out == f"wrote the Space to {tmp_path / 'home' / 'sp'}\n"  # absolute, from anywhere


def test_export_model_defaults_to_the_push_target_and_rejects_nonsense(tmp_path):
    cfg = load_config(None, ["training.push_to_hub=me/pushed", f"training.output_dir={tmp_path}"])
    assert space.space_model(cfg) == "me/pushed"
    with pytest.raises(ConfigError, match="--model"):
        space.space_model(load_config(None, ["app.model=/no/such/folder"]))


def test_a_relative_model_folder_is_written_as_an_absolute_path(tmp_path, monkeypatch):
    """--model runs/x/best, given from the checkout: the Space's app.py runs from its own folder,
    where the relative path names nothing, so the exported config.yaml holds the folder's absolute path."""
    (tmp_path / "runs" / "x" / "best").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    out = space.export(tmp_path / "space", load_config(None, ["app.model=runs/x/best"]))
    model = yaml.safe_load((out / "config.yaml").read_text())["app"]["model"]
    assert model == str((tmp_path / "runs" / "x" / "best").resolve()) and Path(model).is_absolute()


@pytest.fixture
def exported_elsewhere(tiny_model_dir, tmp_path) -> tuple[Path, Path]:
    """The Space of a local tiny model, exported by the command line and moved out of the export folder."""
    model = fast_model(tiny_model_dir, tmp_path / "model")
    proc = run_cli("inference_app.py", "--export-space", str(tmp_path / "export"), "--model", str(model), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    space_dir = shutil.copytree(tmp_path / "export", tmp_path / "elsewhere" / "space")
    shutil.rmtree(tmp_path / "export")
    return space_dir, model


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is needed for synthetic speech")
def test_exported_space_serves_the_page_on_its_own(exported_elsewhere, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    space_dir, model = exported_elsewhere
    assert front_matter(space_dir / "README.md").get("models") is None  # a local folder is no hub model
    assert yaml.safe_load((space_dir / "config.yaml").read_text())["app"]["model"] == str(model)
    for path in space_dir.rglob("*.py"):  # nothing points back into the checkout
        assert str(ROOT) not in path.read_text(), path
    settings = yaml.safe_load((space_dir / "config.yaml").read_text())
    settings["app"]["allow_private_urls"] = True  # edited after the export: the Space still refuses them
    (space_dir / "config.yaml").write_text(yaml.safe_dump(settings))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", GRADIO_SERVER_PORT=str(port))
    proc = subprocess.Popen([sys.executable, str(space_dir / "app.py")], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = wait_for(proc, f"http://127.0.0.1:{port}")
        client = Client(url, verbose=False)
        assert {"/transcribe_file", "/transcribe_microphone", "/transcribe_url"} <= set(
            client.view_api(print_info=False, return_format="dict")["named_endpoints"])
        clip = speech_wav("Hej, jag heter Anna och jag bor i Stockholm.", tmp_path / "speech.wav")
        text, translation, status, files, chat = client.predict(handle_file(str(clip)), "No translation", "en", False,
                                                               api_name="/transcribe_file")
        assert text and translation == "" and "real-time factor" in status
        page = urllib.request.urlopen(f"{url}/config", timeout=10).read().decode()
        assert str(model) in page  # the page names the model it serves
        with pytest.raises(AppError, match="not on the public internet"):
            client.predict(f"{url}/config", "No translation", "en", False, api_name="/transcribe_url")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def wait_for(proc: subprocess.Popen, url: str, seconds: float = 120) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the exported app.py exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return url
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the exported app.py did not serve {url} within {seconds:.0f} s")
