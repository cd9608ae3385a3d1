"""Uploading a finished run to the Hugging Face Hub: token lookup, the model card, the upload.

Everything that talks to the Hub goes through huggingface_hub (`HfApi.create_repo`, then one
`create_commit` with the LoRA file(s), README.md and the samples), so HF_ENDPOINT, proxies, LFS /
Xet uploads and retries of the upload-mode query are the library's. What is ours:

- the token: HF_TOKEN in the environment, else HF_TOKEN in a `.env` file (next to the job file,
  then in the working directory), else the token `hf auth login` stored;
- the model card (README.md): YAML front matter the Hub reads (base_model, license, tags,
  instance_prompt, widget with the sample images) and a readable body;
- errors: `HubUploadError` with a one-line reason a user can act on (no traceback).

`aitk push <output folder>` (aitk/cli.py) uploads a finished run again (the retry command printed
when an upload at the end of training fails); see aitk/trainer/publish.py.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aitk.models.base import ModelAdapter

__all__ = [
    "HubUploadError",
    "CardInfo",
    "read_dotenv",
    "resolve_token",
    "hub_endpoint",
    "model_card",
    "upload_files",
    "is_hub_model_id",
]

_DOTENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")
#: a Hub repo id: namespace/name, letters, digits, "-", "_", "."
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class HubUploadError(Exception):
    """An upload that did not happen; str() is the reason in one line."""


# ----------------------------------------------------------------------------------------- token
def read_dotenv(path: str | Path) -> dict[str, str]:
    """KEY=value pairs of a .env file: `export` prefixes, quotes and # comments allowed.

    A missing or unreadable file is an empty dict (a .env file is optional).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _DOTENV_LINE.match(line)
        if m is None:
            continue
        key, value = m.group(1), m.group(2)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            # an unquoted value ends at " #" (a trailing comment), as dotenv tools read it
            value = re.split(r"\s+#", value, maxsplit=1)[0].strip()
        out[key] = value
    return out


def dotenv_candidates(job_path: str | Path | None) -> list[Path]:
    """The .env files looked at, most specific first: next to the job file, then the working dir."""
    found: list[Path] = []
    if job_path is not None:
        found.append(Path(job_path).expanduser().resolve().parent / ".env")
    cwd = Path.cwd() / ".env"
    if cwd.resolve() not in [p.resolve() for p in found]:
        found.append(cwd)
    return found


def resolve_token(
    job_path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> tuple[str | None, str]:
    """(token, where it came from). The environment wins over .env files, which win over a stored login."""
    env = os.environ if environ is None else environ
    if env.get("HF_TOKEN"):
        return env["HF_TOKEN"], "the HF_TOKEN environment variable"
    for path in dotenv_candidates(job_path):
        value = read_dotenv(path).get("HF_TOKEN")
        if value:
            return value, str(path)
    stored = None
    if environ is None:  # with an explicit environment (tests), the process's login is not looked at
        try:
            from huggingface_hub import get_token

            stored = get_token()
        except Exception:  # noqa: BLE001 - a broken token cache is the same as none
            stored = None
    if stored:
        return stored, "the stored Hugging Face login"
    return None, ""


def hub_endpoint(environ: Mapping[str, str] | None = None) -> str | None:
    """HF_ENDPOINT read now (huggingface_hub reads it once at import; tests and users may set it later)."""
    env = os.environ if environ is None else environ
    value = (env.get("HF_ENDPOINT") or "").strip().rstrip("/")
    return value or None


def is_hub_model_id(name: str) -> bool:
    """True for "org/name" that is not a path on this machine (the Hub rejects a path as base_model)."""
    return bool(_REPO_ID.match(name)) and not Path(name).expanduser().exists()


# ------------------------------------------------------------------------------------ model card
@dataclass
class CardInfo:
    """What the model card says; plain data so the card is testable without a job."""

    title: str
    base_model: str
    architecture: str  # the job's model.arch (sd1, sdxl, flux, wan22_14b, ...)
    trigger_word: str | None = None
    lora_files: list[str] = field(default_factory=list)  # names in the repo
    samples: list[tuple[str, str]] = field(default_factory=list)  # (path in repo, prompt)
    settings: list[tuple[str, str]] = field(default_factory=list)  # (label, value) for the table
    description: str | None = None
    license: str | None = None  # a Hub license id or a free-form name; None: from the base model
    extra_tags: list[str] = field(default_factory=list)
    repo_id: str | None = None  # for the usage snippet


_HUB_LICENSES = frozenset(
    {
        "apache-2.0", "mit", "openrail", "openrail++", "creativeml-openrail-m", "bigscience-openrail-m",
        "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0", "cc-by-nc-nd-4.0", "cc0-1.0",
        "gpl-3.0", "lgpl-3.0", "bsd-3-clause", "unlicense", "llama2", "llama3", "other",
    }
)
def _card_facts(arch: str) -> type[ModelAdapter]:
    """The adapter class of `arch`, whose card_* attributes say the card's tags and licence; the
    interface's defaults (text-to-image, no family tags or licence) for an arch this version lacks."""
    from aitk.models.base import ModelAdapter
    from aitk.models.registry import UnknownArchitectureError, adapter_class

    try:
        return adapter_class(arch.lower())
    except UnknownArchitectureError:
        return ModelAdapter


def _license_fields(info: CardInfo) -> dict[str, str]:
    """license / license_name / license_link for the front matter.

    The base model's licence unless the job's meta block names one; a name the Hub does not know is
    written as license: other + license_name (the Hub rejects a card with an unknown license id).
    """
    if info.license:
        lic = info.license.strip()
        if lic.lower() in _HUB_LICENSES:
            return {"license": lic.lower()}
        slug = re.sub(r"[^a-z0-9]+", "-", lic.lower()).strip("-") or "custom"
        return {"license": "other", "license_name": slug}
    return _card_facts(info.architecture).card_license_fields(info.base_model)


def _is_video(path: str) -> bool:
    return path.lower().endswith((".mp4", ".webm", ".mov"))


def model_card(info: CardInfo) -> str:
    """README.md text: YAML front matter for the Hub, then title, trigger word, samples, settings, use."""
    import yaml

    front: dict[str, object] = {}
    if is_hub_model_id(info.base_model):
        front["base_model"] = info.base_model
    front.update(_license_fields(info))
    front["library_name"] = "diffusers"
    facts = _card_facts(info.architecture)
    front["pipeline_tag"] = facts.card_pipeline_tag
    # template:sd-lora is the tag the Hub's LoRA gallery uses to show the widget images
    tags = ["lora", "diffusers", "template:sd-lora", "aitk", *facts.card_tags, *info.extra_tags]
    front["tags"] = list(dict.fromkeys(t for t in tags if t))
    if info.trigger_word:
        front["instance_prompt"] = info.trigger_word
    if info.samples:
        front["widget"] = [{"text": prompt, "output": {"url": path}} for path, prompt in info.samples]
    body = yaml.safe_dump(front, sort_keys=False, allow_unicode=True, width=1000)

    lines = ["---", body.rstrip("\n"), "---", "", f"# {info.title}", ""]
    base_link = (
        f"[{info.base_model}](https://huggingface.co/{info.base_model})"
        if is_hub_model_id(info.base_model) else f"`{info.base_model}`"
    )
    lines.append(f"A LoRA for {base_link} ({info.architecture}), trained with aitk.")
    lines.append("")
    if info.description:
        lines += [info.description.strip(), ""]
    if info.trigger_word:
        lines += ["## Trigger word", "", f"Use `{info.trigger_word}` in the prompt.", ""]
    if info.lora_files:
        lines += ["## Files", ""]
        lines += [f"- [`{name}`]({name})" for name in info.lora_files]
        lines.append("")
    if info.samples:
        lines += ["## Samples", ""]
        for path, prompt in info.samples:
            shown = prompt.replace("\n", " ").replace("]", "\\]").replace("[", "\\[")
            if _is_video(path):
                lines += [f"**{shown}**", "", f'<video src="{path}" controls loop muted></video>', ""]
            else:
                lines += [f"![{shown}]({path})", "", f"*{shown}*", ""]
    if info.settings:
        lines += ["## Training settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in info.settings]
        lines.append("")
    if len(info.lora_files) == 1 and is_hub_model_id(info.base_model):  # experts load per transformer
        lines += ["## Use with diffusers", "", "```python", "from diffusers import DiffusionPipeline", "",
                  f'pipe = DiffusionPipeline.from_pretrained("{info.base_model}")',
                  f'pipe.load_lora_weights("{info.repo_id or "<this repo>"}", weight_name="{info.lora_files[0]}")',
                  "```", ""]
    lines += ["The files also load in ComfyUI (LoRA loader).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- upload
def _reason(exc: BaseException, endpoint: str) -> str:
    """One line a user can act on, from whatever huggingface_hub / the HTTP client raised."""
    from huggingface_hub import errors as hf_errors

    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so huggingface_hub makes no requests; unset it to upload"
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if status == 401:
        return f"the Hub refused the token (401 Unauthorized): check that it is valid ({first})"
    if status == 403:
        return f"the token may not write there (403 Forbidden): use a token with write access ({first})"
    if status is not None:
        return f"the Hub answered {status}: {first}"
    name = type(exc).__name__
    if "Connect" in name or "Timeout" in name or isinstance(exc, OSError):
        return f"could not reach {endpoint} ({name}: {first})"
    return f"{name}: {first}"


def upload_files(
    repo_id: str,
    files: Sequence[tuple[Path, str]],
    *,
    readme: str | None,
    private: bool,
    token: str | None,
    endpoint: str | None = None,
    commit_message: str = "Upload LoRA",
) -> str:
    """Create (or reuse) the model repo and add `files` [(local path, path in repo)] and README.md in
    one commit. Returns the repo URL. Raises HubUploadError with the reason.

    `private` applies when the repo is created; the Hub keeps an existing repo's visibility.
    """
    try:
        from huggingface_hub import CommitOperationAdd, HfApi
    except ImportError as exc:  # listed in requirements.txt; kept readable if someone removed it
        raise HubUploadError(f"huggingface_hub is not installed ({exc}); pip install huggingface_hub") from None

    if not _REPO_ID.match(repo_id or ""):
        raise HubUploadError(f"hf_repo_id {repo_id!r} is not a Hub repo id (user-or-org/name)")
    missing = [str(p) for p, _ in files if not Path(p).is_file()]
    if missing:
        raise HubUploadError(f"file(s) to upload are missing: {', '.join(missing)}")
    api = HfApi(endpoint=endpoint, token=token, library_name="aitk")
    shown_endpoint = api.endpoint
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(local)) for local, name in files]
        if readme is not None:
            operations.insert(0, CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme.encode("utf-8")))
        api.create_commit(repo_id, operations, commit_message=commit_message, repo_type="model")
    except Exception as exc:  # noqa: BLE001 - every failure becomes a reason, never a traceback
        raise HubUploadError(_reason(exc, shown_endpoint)) from exc
    return str(url)

