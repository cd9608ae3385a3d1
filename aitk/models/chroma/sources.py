"""Where a Chroma model's parts come from.

- A diffusers folder or hub id with ChromaPipeline's layout (lodestones/Chroma1-HD, -Base,
  -Flash): every part from there.
- A single transformer checkpoint in the original (BFL-style) layout, as lodestones publishes
  each version (chroma-unlocked-v48.safetensors, Chroma1-HD.safetensors): a local file, or
  ai-toolkit's hub shortcuts "lodestones/Chroma" (the newest chroma-unlocked-vNN file of that repo)
  and "lodestones/Chroma/vNN" (that version). The transformer loads through diffusers'
  ChromaTransformer2DModel.from_single_file; the T5 encoder, tokenizer, VAE and scheduler come from
  a diffusers Chroma folder: model.model_kwargs.extras_name_or_path, default lodestones/Chroma1-HD
  (ai-toolkit takes them from ostris/Flex.1-alpha; both hold the same T5-XXL and FLUX VAE).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aitk.models import common
from aitk.models.base import ModelLoadError
from aitk.models.diffusers_parts import TRANSFORMER_FILE_SUFFIXES

UPSTREAM_REPO = "lodestones/Chroma"
DEFAULT_EXTRAS = "lodestones/Chroma1-HD"
SINGLE_FILE_SUFFIXES = TRANSFORMER_FILE_SUFFIXES
_VERSION_FILE = re.compile(r"^chroma-unlocked-v(\d+)\.safetensors$")
_VERSION_NAME = re.compile(r"^lodestones/chroma/v(\d+)$", re.IGNORECASE)
FOLDER_HINT = (
    "give a diffusers folder or hub id with ChromaPipeline's layout (model_index.json, transformer/, "
    "text_encoder/, tokenizer/, vae/, scheduler/; e.g. lodestones/Chroma1-HD), a Chroma transformer "
    ".safetensors file, lodestones/Chroma (its newest version) or lodestones/Chroma/vNN"
)


@dataclass(frozen=True)
class ChromaSource:
    """`folder`: the diffusers folder / hub id the parts load from; `transformer_file`: a
    single-file transformer checkpoint that replaces the folder's transformer/, or None."""

    folder: str
    transformer_file: str | None = None


def resolve(name_or_path: str, model_kwargs: dict[str, Any]) -> ChromaSource:
    """The source of model.name_or_path (hub shortcuts download their file); ModelLoadError
    naming the key when it is none of the forms in the module docstring."""
    extras = _extras(model_kwargs)
    if name_or_path.strip().lower() == UPSTREAM_REPO.lower():
        return ChromaSource(extras, _download(UPSTREAM_REPO, _newest_version_file()))
    version = _VERSION_NAME.match(name_or_path.strip())
    if version:
        return ChromaSource(extras, _download(UPSTREAM_REPO, f"chroma-unlocked-v{version.group(1)}.safetensors"))
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise ModelLoadError(f"model.name_or_path: file {name_or_path!r} does not exist; {FOLDER_HINT}")
        return ChromaSource(extras, str(path))
    if path.is_dir():
        return ChromaSource(str(path))
    if path.exists():
        raise ModelLoadError(f"model.name_or_path: {name_or_path!r} is a file of no known kind; {FOLDER_HINT}")
    if not common.could_be_hub_id(name_or_path):
        raise ModelLoadError(f"model.name_or_path: {name_or_path!r} is neither an existing folder nor a hub id; "
                             f"{FOLDER_HINT}")
    return ChromaSource(name_or_path)


def _extras(model_kwargs: dict[str, Any]) -> str:
    value = str(model_kwargs.get("extras_name_or_path") or DEFAULT_EXTRAS)
    path = Path(value).expanduser()
    return str(path) if path.is_dir() else value


def _newest_version_file() -> str:
    """The chroma-unlocked-vNN.safetensors of lodestones/Chroma with the highest NN."""
    import huggingface_hub

    try:
        files = huggingface_hub.list_repo_files(UPSTREAM_REPO)
    except Exception as exc:  # offline, rate limits, auth: many error types
        raise ModelLoadError(
            f"model.name_or_path: {UPSTREAM_REPO!r} means its newest version, which needs the hub to find "
            f"({exc}{common.offline_note()}); name a version (lodestones/Chroma/v48) or a local file"
        ) from exc
    versions = {int(m.group(1)): name for name in files if (m := _VERSION_FILE.match(name))}
    if not versions:
        raise ModelLoadError(f"model.name_or_path: {UPSTREAM_REPO} lists no chroma-unlocked-vNN.safetensors file")
    return versions[max(versions)]


def _download(repo: str, filename: str) -> str:
    import huggingface_hub

    try:
        return str(huggingface_hub.hf_hub_download(repo_id=repo, filename=filename))
    except Exception as exc:
        raise ModelLoadError(
            f"model.name_or_path: could not get {repo}/{filename} from the hub or its cache "
            f"({exc}{common.offline_note()}); give a local file or a diffusers folder"
        ) from exc
