"""Where a model's part configs come from: a local diffusers folder (model_index.json and each
part's config.json; no weights needed), or for a hub id the public configs shipped in configs/.

Nothing is downloaded: the plan of a hub model needs no network and no cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aitk.plan.errors import PlanInputError

if TYPE_CHECKING:
    from aitk.models.base import PartConfigs

CONFIG_DIR = Path(__file__).parent / "configs"
#: parts of a pipeline folder the plan builds (denoisers, text encoders, VAE, image encoder)
PLANNED_PARTS = (
    "unet", "transformer", "transformer_2", "text_encoder", "text_encoder_2", "text_encoder_3", "vae", "image_encoder",
)
DENOISER_PARTS = ("unet", "transformer", "transformer_2")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".sft", ".pt", ".gguf")


@dataclass(frozen=True)
class PartSpec:
    name: str
    library: str  # "diffusers" | "transformers"
    class_name: str
    config: dict[str, Any] = field(hash=False, compare=False)


@dataclass(frozen=True)
class ModelSpec:
    """The parts of one model with their configs, and where they were read."""

    label: str
    origin: str
    parts: dict[str, PartSpec] = field(hash=False, compare=False)
    boundary_ratio: float | None = None

    @property
    def denoisers(self) -> list[str]:
        return [name for name in DENOISER_PARTS if name in self.parts]

    def configs(self, tokenizer_lengths: dict[str, int]) -> PartConfigs:
        """What an adapter's `bind` derives its facts from (no scheduler config: the plan reads
        none, so the adapter's default schedule applies)."""
        from aitk.models.base import PartConfigs

        return PartConfigs(
            {name: part.config for name, part in self.parts.items()},
            None,
            self.boundary_ratio,
            dict(tokenizer_lengths),
        )


@lru_cache(maxsize=1)
def shipped_models() -> dict[str, dict[str, Any]]:
    """hub id (lower case) -> the shipped config file's content."""
    known: dict[str, dict[str, Any]] = {}
    for path in sorted(CONFIG_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        data["file"] = path.name
        for hub_id in data["hub_ids"]:
            known[hub_id.lower()] = data
    return known


def _from_shipped(hub_id: str, arch: str) -> ModelSpec:
    data = shipped_models().get(hub_id.lower())
    if data is None:
        names = sorted({d["hub_ids"][0] for d in shipped_models().values()})
        raise PlanInputError(
            f"model.name_or_path: {hub_id!r} is a hub id whose configs aitk plan does not ship, and no local "
            f"folder of that name exists. Fix: give a local diffusers folder of the model (its model_index.json "
            f"and <part>/config.json files are enough, no weights), or one of: {', '.join(names)}"
        )
    if arch not in data["archs"]:
        raise PlanInputError(
            f"model.arch: {arch!r} does not match {hub_id!r} ({data['name']}, model.arch "
            f"{' or '.join(repr(a) for a in data['archs'])}); set model.arch to match the model"
        )
    parts = {
        name: PartSpec(name, part["library"], part["class"], dict(part["config"]))
        for name, part in data["parts"].items()
    }
    origin = f"public configs of {data['hub_ids'][0]} shipped in aitk/plan/configs/{data['file']}"
    return ModelSpec(data["name"], origin, parts, data.get("boundary_ratio"))


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanInputError(f"{path}: missing; {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanInputError(f"{path}: cannot be read as JSON ({exc}); {what}") from None
    if not isinstance(data, dict):
        raise PlanInputError(f"{path}: holds {type(data).__name__}, not a JSON object; {what}")
    return data


def _from_folder(folder: Path, label: str) -> ModelSpec:
    fix = "give a diffusers folder (model_index.json and <part>/config.json for each part)"
    index = _read_json(folder / "model_index.json", fix)
    parts: dict[str, PartSpec] = {}
    for name in PLANNED_PARTS:
        entry = index.get(name)
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]):
            continue
        config = _read_json(folder / name / "config.json", f"{name}/ of {folder} needs its config.json; {fix}")
        parts[name] = PartSpec(name, str(entry[0]), str(entry[1]), config)
    if not any(name in parts for name in DENOISER_PARTS):
        raise PlanInputError(
            f"{folder / 'model_index.json'}: names no unet or transformer part; {fix}"
        )
    ratio = index.get("boundary_ratio")
    return ModelSpec(label, f"the configs in {folder}", parts, float(ratio) if ratio else None)


def _default_config_repo(arch: str) -> str | None:
    """Where `arch`'s adapter takes a single file's part configs from (None: it loads folders only)."""
    from aitk.models.registry import UnknownArchitectureError, adapter_class

    try:
        return adapter_class(arch).default_config_repo
    except UnknownArchitectureError:
        return None


def model_spec(name_or_path: str, arch: str, model_kwargs: dict[str, Any] | None = None) -> ModelSpec:
    """The part configs of `name_or_path` (a folder, a hub id, or an SD-family single file)."""
    from aitk.models.common import could_be_hub_id

    path = Path(name_or_path).expanduser()
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise PlanInputError(
                f"model.name_or_path: file {name_or_path!r} does not exist; give an existing file, a "
                "diffusers folder or a hub id"
            )
        # a single file's part configs come from the repo its adapter names (as loading does)
        config = str((model_kwargs or {}).get("config") or _default_config_repo(arch) or "")
        if not config:
            raise PlanInputError(
                f"model.name_or_path: {name_or_path!r} is a single file; for model.arch {arch!r} aitk plans "
                "from a diffusers folder or hub id; give one of those"
            )
        return model_spec(config, arch)
    if path.is_dir():
        return _from_folder(path, path.name)
    if path.exists():
        raise PlanInputError(
            f"model.name_or_path: {name_or_path!r} is a file, not a diffusers folder; give a folder with "
            "model_index.json, a .safetensors checkpoint (SD 1.5 / SDXL) or a hub id"
        )
    if not could_be_hub_id(name_or_path):
        raise PlanInputError(
            f"model.name_or_path: folder {name_or_path!r} does not exist; give an existing diffusers folder "
            "or a hub id (owner/name)"
        )
    return _from_shipped(name_or_path, arch)
