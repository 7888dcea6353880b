"""Export the inference page as a Hugging Face Space: a folder that runs as it is.

    python inference_app.py --export-space space/ --model USER/NAME
    python space/app.py                                # the same page, from any directory
    hf upload USER/SPACE space/ . --repo-type space    # publish it as a Gradio Space

The folder holds app.py (inference_app.py's `main` on the folder's config.yaml), inference_app.py
and the whisper_ft modules it imports, config.yaml (the model and the `app:` settings),
requirements.txt (the project's pins, torch from the CPU wheel index), packages.txt (ffmpeg)
and a README.md whose front matter configures the Space.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import shutil
from importlib.metadata import version
from pathlib import Path

import yaml

from whisper_ft.config import Config, check_repo_id, to_dict
from whisper_ft.errors import UserError
from whisper_ft.files import write_atomic
from whisper_ft.model import language_name, own_language

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
ENTRY = "inference_app.py"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# What the page imports, pinned as in the project's requirements.txt (huggingface_hub comes with transformers).
SPACE_PACKAGES = ("torch", "transformers", "soundfile", "soxr", "gradio", "deep-translator", "yt-dlp", "pyyaml",
                  "ctranslate2", "faster-whisper")
PYTHON_VERSION = "3.11"  # the project's minimum; Spaces default to an older one
WRITTEN = ("app.py", ENTRY, "whisper_ft", "config.yaml", "requirements.txt", "packages.txt", "README.md")
KEPT = (".git", ".gitattributes")  # a clone of the Space repository may be the export folder
GENERATED = ("__pycache__",)  # left by importing the code here (app.py itself writes none): removed
# The line of app.py that tells an earlier export from a folder of the user's own files.
MARKER = "Written by `python inference_app.py --export-space DIR` (whisper_ft/space.py)."

APP = '''"""Hugging Face Space: the speech-to-text page of whisper-ft's inference_app.py, serving
the model that app.model names in config.yaml beside this file.

    pip install -r requirements.txt && python app.py    # http://127.0.0.1:7860 (also --port P, --host H)

A hub id is downloaded first, with its CTranslate2 export (the fast CPU path). On a Space the
address and port come from GRADIO_SERVER_NAME and GRADIO_SERVER_PORT, which the Hub sets.
{marker}
"""

import os
import sys
from pathlib import Path

# No __pycache__ beside the code: `hf upload` would publish it, local paths included.
sys.dont_write_bytecode = True

import inference_app  # noqa: E402
from whisper_ft import cli, hub  # noqa: E402
from whisper_ft.config import load_config  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "config.yaml"


def main(argv: list[str] | None = None) -> int:
    model = hub.local_model(load_config(CONFIG).app.model)
    # A public page fetches public addresses only, whatever config.yaml says: the Space's own
    # network (and its cloud's metadata service) is no visitor's business.
    args = ["--config", str(CONFIG), "--model", model, "--set", "app.allow_private_urls=false"]
    for flag, variable in (("--host", "GRADIO_SERVER_NAME"), ("--port", "GRADIO_SERVER_PORT")):
        if os.environ.get(variable):
            args += [flag, os.environ[variable]]
    return inference_app.main([*args, *(argv or [])])


if __name__ == "__main__":
    sys.exit(cli.run(main, sys.argv[1:], interrupted="interrupted"))
'''.replace("{marker}", MARKER)

README_BODY = """
# {language} speech to text

Model: {model_ref}

Transcribe {language} speech with Whisper: a microphone recording, an uploaded audio or video
file, or a video URL, with timestamps, `.txt`/`.srt` downloads and a translation.

Exported from whisper-ft with `python inference_app.py --export-space DIR`. Run it anywhere:

```bash
pip install -r requirements.txt
python app.py                     # http://127.0.0.1:7860
```

Publish it: `hf upload USER/SPACE . --repo-type space` in this folder creates (or updates) a
Gradio Space. Settings: `config.yaml` (`app.model` is the model served).
"""


class SpaceError(UserError):
    """An export that cannot be written where asked."""


def export(out_dir: str | Path, cfg: Config) -> Path:
    """Write the Space for `space_model(cfg)` into `out_dir`: an empty or new folder, or an earlier
    export. Returns the folder as an absolute path, which says where it went wherever it was run."""
    model = space_model(cfg)
    out = Path(out_dir)
    check_target(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in GENERATED:
        shutil.rmtree(out / name, ignore_errors=True)
    write_atomic(out / "app.py", APP)  # first: an export killed after it is still taken for one
    copy_code(out, package_modules([APP, (REPO_DIR / ENTRY).read_text(encoding="utf-8")]))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, language=space_language(cfg, model)))
    write_atomic(out / "config.yaml", space_config(cfg, model))
    write_atomic(out / "requirements.txt", requirements((REPO_DIR / "requirements.txt").read_text(encoding="utf-8")))
    write_atomic(out / "packages.txt", "ffmpeg\n")
    write_atomic(out / "README.md", readme(model, version("gradio"), cfg.model.language))
    return out.absolute()


def space_model(cfg: Config) -> str:
    """`app.model` (--model), else `training.push_to_hub`, else the model the app would pick; a
    local folder becomes an absolute path (it runs here, but a Space on the Hub needs a hub id)."""
    model = cfg.app.model or cfg.training.push_to_hub
    if not model:
        from whisper_ft.app import find_model

        choice = find_model(cfg)
        if choice.notice:
            log.warning(choice.notice.replace("*", "").replace("`", ""))
        model = choice.path
    path = Path(model).expanduser()
    if path.is_dir():
        log.warning("%s is a local folder: the export serves it on this machine only; for a Space on the Hub publish "
                    "it (python training_pipeline.py --push-to-hub USER/NAME --push-only) and export --model "
                    "USER/NAME", model)
        return str(path.resolve())
    check_repo_id(model, "--model (neither a model folder nor a hub id)")
    return model


def check_target(out: Path) -> None:
    """Refuse a folder that holds anything but an earlier export (its app.py carries MARKER) or a
    new clone of the Space repository (its git files and template README.md). The temporary
    files of an export killed while writing are its own: removed."""
    if out.exists() and not out.is_dir():
        raise SpaceError(f"--export-space: {out} is a file; name a folder")
    if not out.is_dir():
        return
    leftovers = [p for p in out.glob(".*.tmp-*") if p.name[1:].split(".tmp-", 1)[0] in WRITTEN and p.is_file()]
    names = sorted(p.name for p in out.iterdir() if p.name not in KEPT + GENERATED and p not in leftovers)
    # a new Space's clone holds the Space's template card, which git keeps: it may be replaced
    ours = WRITTEN if is_export(out) else ("README.md",) if (out / ".git").exists() else ()
    foreign = [name for name in names if name not in ours]
    if foreign:
        raise SpaceError(f"--export-space: {out} holds other files ({', '.join(foreign[:3])}); name an empty folder "
                         "or an earlier export")
    for leftover in leftovers:
        leftover.unlink()


def is_export(folder: Path) -> bool:
    """True for a folder this module wrote: its app.py carries MARKER."""
    app = folder / "app.py"
    return app.is_file() and MARKER in app.read_text(encoding="utf-8", errors="replace")


def package_modules(sources: list[str]) -> list[str]:
    """The whisper_ft modules these Python sources import, directly or through each other, lazy
    imports included. Read from the code because modulefinder would walk all of torch as well."""
    found: set[str] = set()
    todo = list(sources)
    while todo:
        for name in _imported_modules(ast.parse(todo.pop())):
            if name not in found and (PACKAGE_DIR / f"{name}.py").is_file():
                found.add(name)
                todo.append((PACKAGE_DIR / f"{name}.py").read_text(encoding="utf-8"))
    return sorted(found)


def _imported_modules(tree: ast.AST):
    """Names `x` of every `import whisper_ft.x`, `from whisper_ft import x` and `from whisper_ft.x import ...`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[1] for a in node.names if a.name.startswith("whisper_ft."))
        elif isinstance(node, ast.ImportFrom) and node.module == "whisper_ft":
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("whisper_ft."):
            yield node.module.split(".")[1]


def copy_code(out: Path, modules: list[str]) -> None:
    """inference_app.py and the listed whisper_ft modules; the package folder is replaced whole."""
    shutil.copy2(REPO_DIR / ENTRY, out / ENTRY)
    package = out / "whisper_ft"
    shutil.rmtree(package, ignore_errors=True)
    package.mkdir()
    for name in modules:
        shutil.copy2(PACKAGE_DIR / f"{name}.py", package / f"{name}.py")


def space_config(cfg: Config, model: str) -> str:
    """config.yaml of the Space: the model and `app:` sections, serving `model`. No local files
    (cookies, logins): a Space takes its login from the secret $WHISPER_APP_AUTH. A public page
    never fetches private addresses, whatever `app.allow_private_urls` says here. It runs on the
    CPU (its requirements install torch's CPU build), whatever `app.device` says here."""
    if cfg.app.allow_private_urls:
        log.warning("app.allow_private_urls is for local use: the Space refuses private addresses")
    app = dataclasses.replace(cfg.app, model=model, cookies_file="", auth_file="", share=False,
                              allow_private_urls=False, device="cpu")
    sections = {"model": to_dict(dataclasses.replace(cfg.model, name_or_path=model)), "app": to_dict(app)}
    return ("# Settings of the page; every key is documented in whisper-ft's config.yaml.\n"
            + yaml.safe_dump(sections, sort_keys=False, allow_unicode=True))


def requirements(project_requirements: str) -> str:
    """requirements.txt of the Space: SPACE_PACKAGES as the project pins them, torch as a CPU build."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in project_requirements.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            pins[canonicalize_name(Requirement(line).name)] = line
    lines = [pins[canonicalize_name(name)] for name in SPACE_PACKAGES]
    return "\n".join(["# The CPU build of torch (a Space without a GPU); the rest pinned as in whisper-ft.",
                      f"--extra-index-url {TORCH_CPU_INDEX}", *lines]) + "\n"


def space_language(cfg: Config, model: str) -> str:
    """The language the Space transcribes: the one a local model was fine-tuned for, else
    model.language (the page itself takes a hub model's own when it has downloaded it)."""
    return (own_language(model) if Path(model).is_dir() else None) or cfg.model.language


def readme(model: str, sdk_version: str, language: str = "sv") -> str:
    """README.md with the Space's front matter: Gradio `sdk_version`, app.py, and `models` for a
    hub id; title and text name `language` (a Whisper code)."""
    from huggingface_hub import SpaceCard, SpaceCardData

    hub_id = not Path(model).is_dir()
    name = language_name(language)
    data = SpaceCardData(title=f"{name} speech to text", sdk="gradio", sdk_version=sdk_version,
                         python_version=PYTHON_VERSION, app_file="app.py", models=[model] if hub_id else None,
                         tags=["whisper", "speech-recognition", name.lower()], emoji="🎙️", colorFrom="blue",
                         colorTo="yellow", pinned=False)
    model_ref = f"[`{model}`](https://huggingface.co/{model})" if hub_id else f"`{model}` (a local folder)"
    return str(SpaceCard(f"---\n{data.to_yaml()}\n---\n{README_BODY.format(model_ref=model_ref, language=name)}"))
