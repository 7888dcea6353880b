"""Publishing a finished run on the Hugging Face Hub, and fetching a published model back.

    python training_pipeline.py --push-to-hub USER/NAME               # train, then publish best/
    python training_pipeline.py --push-to-hub USER/NAME --push-only   # publish the finished run as it is

`push` uploads `best/` (weights, processor, generation config, the CTranslate2 export, the
curves) and the run's event log `metrics.jsonl`, with the model card as the repository README,
its Hub metadata rebuilt for the repository from the run's metrics.json and config.yaml
(`readme`). One commit adds every file and deletes what the repository holds beyond them, so a
re-push updates it in place.
`push_files` and `readme` build what is sent without the network; every call to the Hub goes
through `huggingface_hub`, and its failures become one-line `HubError`s. The exported Space
(`whisper_ft.space`) serves a hub id through `local_model`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from whisper_ft import report
from whisper_ft.checkpoints import BEST_DIR, BEST_INFO
from whisper_ft.errors import UserError, first_line

log = logging.getLogger(__name__)

NEEDED = ("config.json", "generation_config.json", "README.md")  # in best/, besides the weights
KEPT_REMOTE = ("README.md", ".gitattributes")  # never deleted as stale: rewritten, or the Hub's own
MODEL_FILES = ("*.json", "*.txt", "*.safetensors")  # what the app loads of a hub model (no .bin, TF or Flax copies)
CT2_FILES = "ct2/*"  # whisper_ft.ct2's export folder
# Run-folder files published beside best/, as the card names them. predictions.jsonl stays
# home: it holds the test sentences and the speakers' metadata of data that may not be public.
RUN_FILES = ("metrics.jsonl",)
TOKEN_HELP = "run `hf auth login` or set HF_TOKEN to a token with write access (https://huggingface.co/settings/tokens)"
READ_TOKEN_HELP = ("run `hf auth login` or set HF_TOKEN (on a Space: its HF_TOKEN secret) to a token that may read "
                   "the model (https://huggingface.co/settings/tokens)")
TOKEN_HELPS = {"write": TOKEN_HELP, "read": READ_TOKEN_HELP}  # what to do about a refused token, by what it is for


class HubError(UserError):
    """A push or download that the Hub did not take (no token, offline, refused); local files are unchanged."""


@dataclass(frozen=True)
class FinishedRun:
    """What a push reads from a run folder."""

    best: Path  # the best/ folder
    summary: dict  # metrics.json
    config: dict  # config.yaml
    card: str  # best/README.md


def finished_run(run_dir: str | Path) -> FinishedRun:
    """The run's best/ with its reports, or HubError saying what is missing."""
    run_dir = Path(run_dir)
    best = run_dir / BEST_DIR
    wanted = [f"{BEST_DIR}/{name}" for name in NEEDED] + ["metrics.json", "config.yaml"]
    missing = [name for name in wanted if not (run_dir / name).is_file()]
    if not list(best.glob("*.safetensors")):
        missing.append(f"{BEST_DIR}/*.safetensors")
    if missing:
        raise HubError(f"{run_dir} is not a finished run (no {', '.join(missing)}): train it first with "
                       "python training_pipeline.py, or name another run with --set training.run_name=NAME")
    return FinishedRun(best, json.loads((run_dir / "metrics.json").read_text(encoding="utf-8")),
                       yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")),
                       (best / "README.md").read_text(encoding="utf-8"))


def push_files(best: str | Path) -> dict[str, Path]:
    """Repository path -> local file for everything in `best/`, except its README (the card is
    uploaded with rebuilt metadata) and leftovers of interrupted writes (hidden names, `*.tmp`),
    and the RUN_FILES of the run folder around it."""
    best = Path(best)
    files = {name: best.parent / name for name in RUN_FILES if (best.parent / name).is_file()}
    for path in sorted(best.rglob("*")):
        parts = path.relative_to(best).parts
        leftover = any(p.startswith(".") or p.endswith(".tmp") for p in parts)
        if path.is_file() and not leftover and parts != ("README.md",):
            files["/".join(parts)] = path
    return files


def public_best_info(path: Path) -> bytes:
    """best.json as published: the base model by its Hub id, or null for a local folder, whose
    path would publish the machine's user and folders."""
    info = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(info, dict) and "base_model" in info:
        info["base_model"] = report._hub_id(str(info["base_model"]))
    return json.dumps(info, indent=1).encode("utf-8")


def readme(run: FinishedRun, repo_id: str) -> str:
    """The run's model card, its model-index named `repo_id`; the rest of its metadata
    (`report.card_data`) is as training wrote it from the feature store's manifest."""
    from huggingface_hub import ModelCard

    card = ModelCard(run.card)
    card.data.model_name = repo_id
    return str(card)


def commit_message(run: FinishedRun) -> str:
    """One line naming the run, the step of best/ and its test WER."""
    s = run.summary
    wer = "n/a" if s.get("wer") is None else f"{100 * s['wer']:.2f}%"
    return (f"{run.config['training']['run_name']}: best/ from step {s.get('best_step')}, test WER {wer}"
            f"{report.score_caveat(s)}")


def token() -> str:
    """The token huggingface_hub finds (HF_TOKEN, then `hf auth login`), or HubError at once."""
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise HubError(f"no Hugging Face token to publish with: {TOKEN_HELP}")
    return found


def check_access(hub_token: str, repo_id: str) -> None:
    """Ask the Hub whose token this is and whether it may write to `repo_id`: a read-only token,
    a namespace its owner is no member of, a fine-grained token without write access there, no
    network or HF_HUB_OFFLINE fail here, in seconds, before anything else runs."""
    from huggingface_hub import HfApi

    with hub_errors("cannot publish on the Hugging Face Hub"):
        who = HfApi(token=hub_token).whoami()
    why = write_refusal(who, repo_id)
    if why:
        raise HubError(f"the Hugging Face token of {who.get('name')} cannot publish {repo_id}: {why}")
    log.info("the Hugging Face Hub accepts the token of %s for %s", who.get("name"), repo_id)


def write_refusal(who: dict, repo_id: str) -> str | None:
    """Why the token that `who` (HfApi.whoami's answer) describes cannot write to `repo_id`, with
    what to do; None when it can, or when the answer leaves it open (a shape without these
    fields is taken as before, and the push itself says what the Hub refuses)."""
    name, namespace = who.get("name"), repo_id.split("/")[0]
    access = (who.get("auth") or {}).get("accessToken") or {}
    if access.get("role") == "read":
        return f"it is read-only; {TOKEN_HELP}"
    orgs = who.get("orgs")
    if isinstance(name, str) and isinstance(orgs, list):
        members_of = {name.lower(), *(str(o.get("name", "")).lower() for o in orgs if isinstance(o, dict))}
        if namespace.lower() not in members_of:
            return (f"{name} is not a member of {namespace}; push to {name}/NAME, or use a token of a member "
                    "(https://huggingface.co/settings/tokens)")
    grants = access.get("fineGrained")
    if access.get("role") == "fineGrained" and isinstance(grants, dict) and not _grants_write(grants, repo_id):
        return (f"the fine-grained token has no write access (repo.write) to the repositories of {namespace}; "
                "give it that permission or use another token (https://huggingface.co/settings/tokens)")
    return None


def _grants_write(grants: dict, repo_id: str) -> bool:
    """Whether fine-grained `grants` hold repo.write everywhere, on `repo_id`'s user or organisation,
    or on `repo_id` itself."""
    if "repo.write" in (grants.get("global") or []):
        return True
    namespace = repo_id.split("/")[0].lower()
    for scope in grants.get("scoped") or []:
        entity = scope.get("entity") or {}
        kind, entity_name = entity.get("type"), str(entity.get("name", "")).lower()
        covers = ((kind in ("user", "org") and entity_name == namespace)
                  or (kind == "model" and entity_name == repo_id.lower()))
        if covers and "repo.write" in (scope.get("permissions") or []):
            return True
    return False


def push(run_dir: str | Path, repo_id: str, private: bool = False, hub_token: str | None = None) -> str:
    """Publish the run's best/ as model repository `repo_id` (created if needed, private on
    request, also when it exists); returns the repository URL. Without `private` a new repository
    gets its owner's default visibility: an organisation that makes new repositories private
    keeps this one private too."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    run = finished_run(run_dir)
    files = push_files(run.best)
    card = readme(run, repo_id)
    api = HfApi(token=hub_token)
    with hub_errors(f"pushing {run.best} to {repo_id} failed"):
        # private=False would ask for a public repository; None leaves it to the owner's default
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if private:
            api.update_repo_settings(repo_id, private=True)
        stale = set(api.list_repo_files(repo_id)) - set(files) - set(KEPT_REMOTE)
        operations = [CommitOperationAdd("README.md", card.encode("utf-8")),
                      *(CommitOperationAdd(name, public_best_info(path) if name == BEST_INFO else str(path))
                        for name, path in files.items()),
                      *(CommitOperationDelete(name) for name in sorted(stale))]
        api.create_commit(repo_id, operations, commit_message=commit_message(run))
    return str(url)


def local_model(name_or_path: str) -> str:
    """A local folder as it is; a hub id downloaded into the Hugging Face cache, with its
    CTranslate2 export (after the weights, so that an export made before `ct2/source.json`
    existed is taken as up to date too)."""
    if Path(name_or_path).expanduser().is_dir():
        return name_or_path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    with hub_errors(f"cannot download {name_or_path}", access="read"):
        try:
            snapshot_download(name_or_path, allow_patterns=list(MODEL_FILES), ignore_patterns=[CT2_FILES])
            return snapshot_download(name_or_path, allow_patterns=[CT2_FILES])
        except LocalEntryNotFoundError as e:
            why = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else f"no connection to {constants.ENDPOINT}"
            raise HubError(f"{name_or_path} is neither a local folder nor in the Hugging Face cache, and the Hub "
                           f"cannot be asked ({why})") from e
        except HFValidationError as e:  # a path that is not there reads as a malformed Hub id
            raise HubError(f"{name_or_path} is neither a local folder nor a Hugging Face Hub id "
                           "(owner/name)") from e


@contextmanager
def hub_errors(action: str, access: str = "write") -> Iterator[None]:
    """Turn the Hub's failures (offline mode, HTTP errors, no connection) into one-line HubErrors;
    a refused token is told what `access` the action needs (a push: write, a download: read)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.utils import httpx

    try:
        yield
    except OfflineModeIsEnabled as e:
        raise HubError(f"{action}: HF_HUB_OFFLINE is set; unset it on a machine with network access") from e
    except HfHubHTTPError as e:
        raise HubError(f"{action}: {_refusal(e, access)}") from e
    except httpx.TransportError as e:
        raise HubError(f"{action}: cannot reach {constants.ENDPOINT} ({type(e).__name__}: {first_line(e)})") from e


def _refusal(e, access: str) -> str:
    """Why the Hub answered with an error, with what to do. A missing or private repository
    comes back as 401 without a token too: that is no refused token."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(e, GatedRepoError):
        return ("the repository is gated: accept its conditions on its Hub page, then use a token of that account "
                "(HF_TOKEN; on a Space its HF_TOKEN secret)")
    if isinstance(e, RepositoryNotFoundError):
        return ("no such repository, or a private one: check the id; a private model needs a token that may read "
                "it (HF_TOKEN; on a Space its HF_TOKEN secret)")
    status = getattr(e.response, "status_code", None)
    if status == 401:
        return f"the Hub does not accept the token (401): {TOKEN_HELPS[access]}"
    if status == 403:
        return f"the token may not {access} there (403): {TOKEN_HELPS[access]}"
    return first_line(e)
