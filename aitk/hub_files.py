"""Downloading what a job names on the Hugging Face Hub: reference forms, the token, one-line errors.

The references a job can hold (docs/hub.md):
- `model.name_or_path`: a local folder or file, or a hub id `owner/name` that the model adapters
  load with diffusers' / transformers' `from_pretrained` (which download through huggingface_hub);
  `check_model_access` asks the Hub for it first, so a gated or missing model is one clear message;
- a LoRA file (`model.assistant_lora_path`, `network.pretrained_lora_path`, the accuracy-recovery
  adapter after "|" in `model.qtype`): a local .safetensors file, `owner/name/path/in/repo.safetensors`
  (that file of a repo) or `owner/name` (a repo holding one LoRA .safetensors file).
  `resolve_lora_file` turns any of them into a local path.

The token is `aitk.hub.resolve_token`'s (HF_TOKEN, a .env next to the job file or in the working
directory, the stored `hf auth login`); the web UI passes the token of its settings to the runs it
starts as HF_TOKEN. `use_job_token` puts a .env token into this process's HF_TOKEN, which
huggingface_hub reads at every request: the adapters' `from_pretrained` calls use it with no
change to them.

Everything goes through huggingface_hub (`hf_hub_download`, `snapshot_download`, `HfApi`), so
HF_ENDPOINT, HF_HUB_OFFLINE, the cache and proxies behave as users know them. Errors are
`HubFileError` with one line naming the setting, the reference and what to do.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "HubFileError",
    "HubFile",
    "HubRepo",
    "parse_file_reference",
    "use_job_token",
    "resolve_lora_file",
    "check_model_access",
    "access_message",
    "is_offline",
    "pick_lora_file",
    "prepare_job_downloads",
]

#: one path component of a repo id: letters, digits, "-", "_", "." (not starting with "." or "-")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
LORA_SUFFIX = ".safetensors"
#: the name diffusers' `load_lora_weights(repo)` picks first when a repo holds several files
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"
TOKEN_HELP = (
    "set HF_TOKEN in the environment, or HF_TOKEN=hf_... in a .env file next to the job file or in the "
    "working directory, or the Hugging Face token in the web UI's settings"
)


class HubFileError(RuntimeError):
    """A reference that cannot be turned into local files; str() is the reason in one line."""


@dataclass(frozen=True)
class HubFile:
    """One file of a Hub repo: `owner/name/path/in/repo.safetensors`."""

    repo_id: str
    filename: str

    def __str__(self) -> str:
        return f"{self.repo_id}/{self.filename}"


@dataclass(frozen=True)
class HubRepo:
    """A whole Hub repo: `owner/name`."""

    repo_id: str

    def __str__(self) -> str:
        return self.repo_id


def parse_file_reference(text: str) -> Path | HubFile | HubRepo:
    """What a LoRA reference names: an existing (or path-looking) local path, a file of a Hub repo,
    or a Hub repo. A missing relative path of the form `a/b/c.safetensors` reads as a Hub file."""
    text = text.strip()
    path = Path(text).expanduser()
    if path.exists() or text.startswith((".", "/", "~", "\\")) or "\\" in text or re.match(r"^[A-Za-z]:", text):
        return path
    parts = text.split("/")
    if len(parts) < 2 or not all(_NAME.match(p) for p in parts):
        return path
    repo_id = "/".join(parts[:2])
    if len(parts) == 2:
        return HubRepo(repo_id)
    return HubFile(repo_id, "/".join(parts[2:]))


# ------------------------------------------------------------------------------------ token
def use_job_token(
    job_path: str | Path | None, environ: MutableMapping[str, str] | None = None
) -> str:
    """Make the job's token the one every Hub request of this process sends; returns where it
    came from ("" when there is none).

    HF_TOKEN already in the environment (set by the user, or by the web UI from its settings)
    stays. A token in a .env file (next to the job file, then in the working directory) is put
    into HF_TOKEN, which huggingface_hub reads at each request. A stored `hf auth login` is used
    by huggingface_hub itself.
    """
    from aitk.hub import resolve_token

    env = os.environ if environ is None else environ
    token, source = resolve_token(job_path, env)
    if token and not env.get("HF_TOKEN") and source.endswith(".env"):
        env["HF_TOKEN"] = token
    return source


def _token_state() -> str:
    """How the request was authenticated, for messages: which token, or none."""
    from aitk.hub import resolve_token

    token, source = resolve_token(None)
    if not token:
        return "no Hugging Face token was found"
    return f"the token from {source} was refused"


# ----------------------------------------------------------------------------------- errors
def is_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub sees it now (read at its import; tests change it later)."""
    from huggingface_hub import constants

    return bool(getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)())


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what it was raised from (huggingface_hub wraps a refused HEAD request in a
    LocalEntryNotFoundError when the file is not cached)."""
    found: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in found and len(found) < 8:
        found.append(current)
        current = current.__cause__ or current.__context__
    return found


def _status(exc: BaseException) -> int | None:
    for error in _chain(exc):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status is not None:
            return status
    return None


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:240] if text else type(exc).__name__


def access_message(exc: BaseException, *, key: str, reference: str, repo_id: str) -> str:
    """One line for a failed Hub request about `reference` (set in job setting `key`)."""
    from huggingface_hub import errors as hf_errors

    endpoint = _endpoint()
    status = _status(exc)
    if isinstance(exc, (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled)) and is_offline():
        return (
            f"{key}: {reference!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so it "
            "cannot be downloaded; unset HF_HUB_OFFLINE for one run to download it, or give a local path"
        )
    gated = any(isinstance(e, hf_errors.GatedRepoError) for e in _chain(exc))
    if gated or status in (401, 403):
        # the Hub answers 401 for a missing repo too when no token is sent: say both
        what = "gated or private" if gated or status == 403 else (
            "gated or private (or does not exist)")
        return (
            f"{key}: {repo_id} is {what} on the Hub ({status or 'refused'}) and {_token_state()}. "
            f"To get access: open {endpoint}/{repo_id} while logged in and accept its licence / request access, "
            f"then give a token with read access: {TOKEN_HELP}"
        )
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return (
            f"{key}: {reference!r}: no repo {repo_id} on {endpoint} (and no local path of that name); "
            "check the spelling, or give a local path"
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return f"{key}: {reference!r}: repo {repo_id} has no such revision"
    if isinstance(exc, hf_errors.RemoteEntryNotFoundError):
        return (
            f"{key}: {reference!r}: repo {repo_id} has no such file (no local file of that name exists "
            "either); check the path inside the repo"
        )
    if status is not None:
        return f"{key}: {reference!r}: the Hub answered {status} ({_first_line(exc)})"
    if isinstance(exc, hf_errors.LocalEntryNotFoundError):
        return (
            f"{key}: {reference!r}: could not reach {endpoint} and it is not in the local cache "
            f"({_first_line(exc)}); check the connection or give a local path"
        )
    return f"{key}: {reference!r}: {type(exc).__name__}: {_first_line(exc)}"


def _endpoint() -> str:
    from huggingface_hub import constants

    from aitk.hub import hub_endpoint

    return hub_endpoint() or constants.ENDPOINT


# -------------------------------------------------------------------------------- downloads
def _download(repo_id: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, endpoint=_endpoint()))


def _repo_files(repo_id: str) -> list[str]:
    """Files of a repo: listed by the Hub, or offline from the cached snapshot."""
    if is_offline():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=[f"*{LORA_SUFFIX}"]))
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob(f"*{LORA_SUFFIX}"))
    from huggingface_hub import HfApi

    return sorted(HfApi(endpoint=_endpoint()).list_repo_files(repo_id))


def pick_lora_file(repo_id: str, files: list[str], *, key: str) -> str:
    """The one LoRA file of a repo: its only .safetensors file, or diffusers' default name among
    several; otherwise HubFileError listing them (the fix is naming one)."""
    found = [f for f in files if f.endswith(LORA_SUFFIX)]
    if DIFFUSERS_LORA_NAME in found:
        return DIFFUSERS_LORA_NAME
    if len(found) == 1:
        return found[0]
    if not found:
        raise HubFileError(f"{key}: repo {repo_id} holds no {LORA_SUFFIX} file; give the LoRA file's path")
    shown = ", ".join(found[:12]) + (" ..." if len(found) > 12 else "")
    raise HubFileError(
        f"{key}: repo {repo_id} holds {len(found)} {LORA_SUFFIX} files ({shown}); name one as "
        f"{repo_id}/<file>, e.g. {repo_id}/{found[0]}"
    )


def resolve_lora_file(
    reference: str, *, key: str, log: Callable[[str], None] | None = None
) -> Path:
    """A local path of the LoRA file `reference` names, downloading it when it is on the Hub.

    Raises HubFileError (one line naming `key`, the reference and the fix) for a missing local
    file, a folder, a Hub repo or file that does not exist or is gated, or nothing cached offline.
    """
    target = parse_file_reference(reference)
    if isinstance(target, Path):
        if target.is_file():
            return target
        if target.is_dir():
            raise HubFileError(f"{key}: {reference!r} is a folder; give the {LORA_SUFFIX} file inside it")
        raise HubFileError(
            f"{key}: {reference!r} does not exist; give a local {LORA_SUFFIX} file, owner/repo/file{LORA_SUFFIX} "
            "(a file of a Hub repo) or owner/repo (a Hub repo holding one LoRA file)"
        )
    try:
        filename = target.filename if isinstance(target, HubFile) else None
        if filename is None:
            filename = pick_lora_file(target.repo_id, _repo_files(target.repo_id), key=key)
        path = _download(target.repo_id, filename)
    except HubFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line a user can act on
        raise HubFileError(access_message(exc, key=key, reference=reference, repo_id=target.repo_id)) from exc
    if log is not None:
        log(f"{key}: {target.repo_id}/{filename} -> {path}")
    return path


def check_model_access(name_or_path: str, *, key: str = "model.name_or_path") -> str | None:
    """For a hub id that is no local path: ask the Hub (or the cache, offline) for the model's
    model_index.json, so a gated, private, missing or uncached model stops the run with one line
    before the adapter starts loading. Returns the cached model_index.json's folder (None for a
    local path). The adapters' own `from_pretrained` calls then download the parts."""
    target = parse_file_reference(name_or_path)
    if not isinstance(target, HubRepo):
        return None
    try:
        return str(_download(target.repo_id, "model_index.json").parent)
    except Exception as exc:  # noqa: BLE001
        from huggingface_hub import errors as hf_errors

        if isinstance(exc, hf_errors.RemoteEntryNotFoundError):
            return None  # a repo without model_index.json (a single-part repo): the adapter decides
        if isinstance(exc, hf_errors.LocalEntryNotFoundError) and is_offline() and _cached_anything(target.repo_id):
            return None  # parts cached without model_index.json (loaded part by part): the adapter decides
        raise HubFileError(access_message(exc, key=key, reference=name_or_path, repo_id=target.repo_id)) from exc


def prepare_job_downloads(job_path: str | Path | None, name_or_path: str) -> str:
    """Before a model loads: the job's token for every Hub request of this process, and the
    model (when it is a hub id) checked for access. Returns where the token came from ("" when
    none). Raises HubFileError with the one-line reason (gated, missing, offline and not cached)."""
    source = use_job_token(job_path)
    check_model_access(name_or_path)
    return source


def _cached_anything(repo_id: str) -> bool:
    """Whether the cache holds any snapshot of the model repo."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    snapshots = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())
