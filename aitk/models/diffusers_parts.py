"""Loading a model's parts from diffusers folders, hub ids and single files, with the errors the
job file's keys get; the VAE's shift-and-scale latents; freezing what was loaded.

The flow-matching families (aitk.models.flow_adapter) load through these, so a source is checked,
and a failure worded, the same way for each of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aitk.models import common
from aitk.models.base import ModelLoadError

#: files a folder-only family refuses as model.name_or_path (they would be single checkpoints)
CHECKPOINT_SUFFIXES = (".safetensors", ".sft", ".ckpt")
#: single transformer files a transformer-only source may name (diffusers' from_single_file)
TRANSFORMER_FILE_SUFFIXES = (".safetensors", ".sft")


def folder_hint(parts: Sequence[str], example: str = "") -> str:
    """What model.name_or_path should name: a diffusers folder with `parts` or a hub id."""
    listed = ", ".join(f"{p}/" for p in parts)
    return f"give a diffusers folder (model_index.json with {listed}) or a hub id (owner/name)" + (
        f", e.g. {example}" if example else ""
    )


def transformer_hint(parts: Sequence[str]) -> str:
    """What model.name_or_path should name where a transformer alone (with extras) is allowed."""
    listed = ", ".join(f"{p}/" for p in parts)
    return (
        f"give a diffusers folder or hub id (model_index.json, {listed}), or a transformer folder or "
        ".safetensors file with model.extras_name_or_path for the other parts"
    )


def folder_location(source: str, label: str, hint: str, required: Sequence[str] = (),
                    checkpoint_suffixes: Sequence[str] = CHECKPOINT_SUFFIXES) -> str:
    """Where a folder-only family loads from: the local folder `source` names, or `source` as a
    hub id. ModelLoadError naming model.name_or_path for a single file (`checkpoint_suffixes`), a
    path that is neither, a file, or a local folder without the `required` subfolders."""
    path = Path(source).expanduser()
    if path.suffix.lower() in checkpoint_suffixes:
        raise ModelLoadError(
            f"model.name_or_path: {source!r} is a single file; {label} loads from a diffusers folder or hub "
            f"id only in this version; {hint}"
        )
    if not common.could_be_hub_id(source) and not path.exists():
        raise ModelLoadError(f"model.name_or_path: {source!r} is neither an existing folder nor a hub id; {hint}")
    if path.exists() and not path.is_dir():
        raise ModelLoadError(f"model.name_or_path: {source!r} is a file, not a folder; {hint}")
    missing = [part + "/" for part in required if path.is_dir() and not (path / part).is_dir()]
    if missing:
        raise ModelLoadError(f"model.name_or_path: folder {source!r} has no {', '.join(missing)}; {hint}")
    return str(path) if path.exists() else source


def load_from_folder(source: str, what: str, label: str, hint: str, load: Callable[[str], Any], *,
                     required: Sequence[str] = (), checkpoint_suffixes: Sequence[str] = CHECKPOINT_SUFFIXES) -> Any:
    """`load(location)` of a folder-only family's model.name_or_path (`folder_location`), any
    failure worded by `load_errors` (`what` could not be loaded, `hint`)."""
    location = folder_location(source, label, hint, required, checkpoint_suffixes)
    with load_errors(what, source, hint, local=Path(location).exists()):
        return load(location)


@dataclass(frozen=True)
class TransformerSource:
    """A model given as a transformer alone or as a whole pipeline: `source` is model.name_or_path
    as written, `path` it expanded, `single_file` whether it is one transformer file, `extras` where
    the VAE, text encoders, tokenizers and scheduler come from."""

    source: str
    path: Path
    single_file: bool
    extras: str


def transformer_source(model_cfg: Any, hint: str, single_file_extras: str, *, single_files: bool = True,
                       folder_extras: str | None = None) -> TransformerSource:
    """ai-toolkit's rule for transformer-only models: the other parts come from a full local
    pipeline folder itself, else model.extras_name_or_path, else the model (a single file:
    `single_file_extras`; a folder only when it is a pipeline's, with model_index.json, or
    `folder_extras` when given). `single_files` False: a file is refused (folders and hub ids
    only). ModelLoadError naming the key when the source cannot be one."""
    source = model_cfg.name_or_path
    path = Path(source).expanduser()
    single = single_files and path.suffix.lower() in TRANSFORMER_FILE_SUFFIXES
    if path.exists() and not (path.is_dir() or single):
        what = "but no .safetensors" if single_files else "and this model loads folders only"
        raise ModelLoadError(f"model.name_or_path: {source!r} is a file {what}; {hint}")
    if not path.exists() and (single or not common.could_be_hub_id(source)):
        raise ModelLoadError(f"model.name_or_path: {source!r} is neither an existing path nor a hub id; {hint}")
    extras = getattr(model_cfg, "extras_name_or_path", None)
    if path.is_dir() and (path / "text_encoder").is_dir():
        where = str(path)
    elif extras:
        extras_path = Path(extras).expanduser()
        where = str(extras_path) if extras_path.exists() else extras
    elif single:
        where = single_file_extras
    elif folder_extras and path.is_dir() and not (path / "model_index.json").is_file():
        where = folder_extras
    elif path.is_dir() and not (path / "model_index.json").is_file():
        raise ModelLoadError(
            f"model.name_or_path: {source!r} has no text_encoder/; set model.extras_name_or_path to the model "
            f"its VAE, text encoder and tokenizer come from (e.g. {single_file_extras})"
        )
    else:
        where = str(path) if path.is_dir() else source
    return TransformerSource(source, path, single, where)


def load_transformer(transformer_cls: type, where: TransformerSource, dtype: torch.dtype) -> Any:
    """The transformer of `where`: a single file (its config from the extras' transformer/), a
    transformer folder, or the transformer/ of a pipeline folder or hub id. torch_dtype at load:
    the host never holds it in a wider dtype than it trains in."""
    path = where.path
    if where.single_file:
        return transformer_cls.from_single_file(str(path), config=where.extras, subfolder="transformer",
                                                torch_dtype=dtype)
    if path.is_dir() and not (path / "transformer").is_dir() and (path / "config.json").is_file():
        return transformer_cls.from_pretrained(str(path), torch_dtype=dtype)
    location = str(path) if path.is_dir() else where.source
    return transformer_cls.from_pretrained(location, subfolder="transformer", torch_dtype=dtype)


@contextmanager
def load_errors(what: str, source: str, hint: str, *, local: bool, extras: str | None = None) -> Iterator[None]:
    """Any failure inside (missing parts, hub look-ups, bad files) becomes one ModelLoadError
    naming model.name_or_path, `what` could not be loaded ("a FLUX.1 model") and `hint`; our own
    ModelLoadErrors pass unchanged."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as exc:  # OSError for missing parts / hub look-ups, others for bad files
        where = hint if local else f"looked up as a hub id{common.offline_note()}; {hint}"
        others = f" (other parts from {extras!r})" if extras and extras != source else ""
        raise ModelLoadError(
            f"model.name_or_path: could not load {what} from {source!r}{others}: {exc} ({where})"
        ) from exc


def load_vae(vae_cls: type, location: str, vae_path: str | None) -> Any:
    """The model's vae/ at `location`, or model.vae_path: a VAE folder, a pipeline folder with
    vae/, or a hub id (ModelLoadError naming model.vae_path when it cannot be loaded)."""
    if not vae_path:
        return vae_cls.from_pretrained(location, subfolder="vae")
    path = Path(vae_path).expanduser()
    try:
        if path.is_dir() and not (path / "config.json").is_file():
            return vae_cls.from_pretrained(str(path), subfolder="vae")
        return vae_cls.from_pretrained(str(path) if path.exists() else vae_path)
    except Exception as exc:
        raise ModelLoadError(
            f"model.vae_path: could not load a VAE from {vae_path!r}: {exc} (give a VAE folder with "
            f"config.json, a pipeline folder with vae/ or a hub id{common.offline_note()})"
        ) from exc


def scheduler_config(location: str, default: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The scheduler/ config of a pipeline folder or hub id; `default` when it has none (None:
    a missing one is an error)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    try:
        return dict(FlowMatchEulerDiscreteScheduler.load_config(location, subfolder="scheduler"))
    except OSError:
        if default is None:
            raise
        return dict(default)


def freeze_loaded(parts: Mapping[str, Any], dtype: torch.dtype, fp32_names: Sequence[str]) -> None:
    """Freeze every loaded module of `parts` (input processors pass); cast those in `fp32_names`
    (the VAE: it encodes and decodes in fp32 whatever trains) to float32, the rest to `dtype`."""
    modules = {name: part for name, part in parts.items() if isinstance(part, torch.nn.Module)}
    common.freeze(modules.values())
    for name, module in modules.items():
        common.cast(module, torch.float32 if name in fp32_names else dtype)


def encode_scaled_latents(vae: Any, pixels: torch.Tensor, device: torch.device, shifted: bool = True) -> torch.Tensor:
    """Pixels in [-1, 1] -> the denoiser's latents (latent - shift_factor) * scaling_factor of an
    AutoencoderKL, encoded in fp32 (the latent distribution's mode). `shifted` False: scaled only,
    as the pipelines of SD's 4-channel VAEs (PixArt, AuraFlow) and CogView4 do."""
    latents = common.encode_mode(vae, pixels, device)
    if shifted:
        latents = latents - vae.config.shift_factor
    return latents * vae.config.scaling_factor


def decode_scaled_latents(vae: Any, latents: torch.Tensor, shifted: bool = True) -> torch.Tensor:
    """Inverse of `encode_scaled_latents` through the decoder: pixels in about [-1, 1]."""
    latents = latents / vae.config.scaling_factor
    if shifted:
        latents = latents + vae.config.shift_factor
    return vae.decode(latents).sample


def vae_space_id(name: str, vae: Any, source: str, shifted: bool = True) -> str:
    """The latent-space part of the latent caches' keys: `name`, the VAE's channels, scale (and
    shift when the latents are shifted) and where it came from."""
    cfg = vae.config
    shift = f":{cfg.shift_factor}" if shifted else ""
    return f"{name}:{cfg.latent_channels}:{cfg.scaling_factor}{shift}:{source}"
