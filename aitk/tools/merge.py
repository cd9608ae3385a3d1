"""`aitk merge --model BASE --lora FILE [--lora-2 FILE] --strength S --arch ARCH -o OUT`.

Bakes network files into a base model's denoiser weights (aitk.networks.merge: LoRA, LoCon,
DoRA, LoKr, LoHa, any layout aitk writes) and saves the result:

- OUT a folder: a diffusers folder. Every file of the base folder is copied except the merged
  denoiser's subfolder(s) (unet/, transformer/, transformer_2/), which are written from the
  merged modules; so the scheduler, tokenizers, text encoders and VAE stay byte-identical.
  A hub id is resolved to its local (downloaded) snapshot first.
- OUT a .safetensors file (SD 1.x / 2.x / SDXL from a single-file checkpoint): a copy of the
  base checkpoint with the merged UNet weights replaced in place, under the original LDM key
  names, which are found by running diffusers' own single-file key conversion over the key
  names (so the inverse always agrees with how diffusers read the file).

WAN 2.2 has two experts: --lora goes into the high-noise expert (transformer/), --lora-2 into
the low-noise one (transformer_2/), the way the trainer writes one file per expert.
The base loads through the model adapter (adapter.load()), like a training run would.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from aitk.tools.layout import ToolError, parse_network_file, read_network_tensors

__all__ = ["MergeResult", "merge_model", "merge_command"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
#: adapter attributes that hold a denoiser, and the diffusers subfolder each is saved in
DENOISER_ATTRS = ("unet", "transformer", "transformer_2")
LDM_UNET_PREFIX = "model.diffusion_model."
#: written into a merged folder (and a single file's header) to say what was merged
MERGE_RECORD = "aitk_merge.json"


@dataclass
class MergeResult:
    output: Path
    dtype: torch.dtype
    #: expert name -> merged module names
    merged: dict[str, list[str]] = field(default_factory=dict)


def _is_single_file(path: Path) -> bool:
    return path.suffix.lower() in (".safetensors", ".ckpt")


def _resolve_base(model: str) -> Path:
    """A local diffusers folder or checkpoint file for `model` (a hub id: its cached snapshot,
    downloaded when allowed), since the merged folder is built from the base's files."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    from aitk.models.common import could_be_hub_id

    if _is_single_file(path) or not could_be_hub_id(model):
        raise ToolError(
            f"--model {model}: no such file or folder (give a diffusers folder, a hub id or a checkpoint file)"
        )
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(model))
    except Exception as exc:  # hub look-ups fail with many error types (offline, 404, auth)
        raise ToolError(f"--model {model}: could not get the model from the hub or its cache ({exc})") from exc


def _first_float_dtype(files: list[Path], prefix: str = "") -> torch.dtype | None:
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(prefix):
                    found = _SAFETENSORS_DTYPES.get(handle.get_slice(key).get_dtype())
                    if found is not None:
                        return found
    return None


def stored_dtype(base: Path) -> torch.dtype:
    """The precision the base's denoiser is stored in (merging keeps it), float32 if unknown."""
    if base.is_file():
        found = _first_float_dtype([base], LDM_UNET_PREFIX) if base.suffix.lower() == ".safetensors" else None
    else:
        files = [f for attr in DENOISER_ATTRS for f in sorted((base / attr).glob("*.safetensors"))]
        found = _first_float_dtype(files)
    return found or torch.float32


def _denoiser_attr(adapter: Any, module: torch.nn.Module) -> str:
    for attr in DENOISER_ATTRS:
        if getattr(adapter, attr, None) is module:
            return attr
    raise ToolError(f"{type(adapter).__name__}: cannot tell which subfolder its denoiser is saved in")


def _prepare_target(output: Path, force: bool) -> None:
    if output.exists() and not force:
        raise ToolError(f"{output} exists; pass --force to replace it or give another -o")


def _replace(tmp: Path, output: Path) -> None:
    """Move the finished `tmp` onto `output`: readers never see a half-written model."""
    if output.is_dir():
        shutil.rmtree(output)
    elif output.exists():
        output.unlink()
    os.replace(tmp, output)


def _save_folder(adapter: Any, base: Path, merged: dict[str, torch.nn.Module], output: Path, record: dict) -> None:
    subfolders = {_denoiser_attr(adapter, m) for m in merged.values()}
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)

    def skip(folder: str, names: list[str]) -> set[str]:
        if Path(folder) != base:
            return set()
        # the merged denoisers are written below; hidden entries are caches of download tools
        return {n for n in names if n in subfolders or n.startswith(".")}

    try:
        shutil.copytree(base, tmp, ignore=skip)  # follows the hub cache's symlinks: real files
        for module in merged.values():
            module.save_pretrained(tmp / _denoiser_attr(adapter, module), safe_serialization=True)
        (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        _replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _ldm_unet_keys(unet: torch.nn.Module, keys: list[str]) -> dict[str, str]:
    """diffusers UNet parameter name -> the checkpoint's key, by diffusers' own conversion run on
    the key names (it only renames keys, so it maps each name onto the diffusers one)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return dict(convert_ldm_unet_checkpoint({k: k for k in keys}, dict(unet.config)))


def _save_single_file(adapter: Any, base: Path, names: list[str], output: Path, record: dict) -> None:
    """The base checkpoint with each merged module's weight replaced (same key, shape, dtype)."""
    import safetensors.torch
    from safetensors import safe_open

    unet = adapter.unet
    with safe_open(str(base), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    mapping = _ldm_unet_keys(unet, list(tensors))
    params = dict(unet.named_parameters())
    for name in names:
        key = mapping.get(f"{name}.weight")
        if key is None or key not in tensors:
            raise ToolError(
                f"{base}: no checkpoint key holds the UNet weight {name}.weight; cannot write a single file"
            )
        original = tensors[key]
        weight = params[f"{name}.weight"].detach().to("cpu")
        if weight.numel() != original.numel():
            raise ToolError(f"{base}: {key} has shape {tuple(original.shape)}, the merged weight {tuple(weight.shape)}")
        tensors[key] = weight.reshape(original.shape).to(original.dtype).contiguous()
    metadata[MERGE_RECORD] = json.dumps(record)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        _replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def merge_model(
    model: str,
    loras: list[str],
    *,
    arch: str,
    output: str | Path,
    strength: float = 1.0,
    dtype: str = "auto",
    config: str | None = None,
    device: str = "cpu",
    force: bool = False,
) -> MergeResult:
    """Merge `loras` (one per expert, in the model's expert order) into `model` and save to `output`."""
    from aitk.config.schema import ModelConfig
    from aitk.models.registry import UnknownArchitectureError, adapter_class
    from aitk.models.sd15 import ModelLoadError
    from aitk.networks.merge import merge_network_file

    out = Path(output).expanduser()
    single = out.suffix.lower() == ".safetensors"
    _prepare_target(out, force)
    try:
        cls = adapter_class(arch)
    except UnknownArchitectureError:
        from aitk.models.archs import supported_archs

        raise ToolError(f"--arch {arch!r} is not supported; use one of {', '.join(supported_archs())}") from None
    if dtype != "auto" and dtype not in DTYPES:
        raise ToolError(f"--dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    if len(loras) > 1 and not getattr(cls, "two_experts", False):
        raise ToolError(f"--lora-2 is for models with two experts (WAN 2.2); {arch} has one denoiser")
    # read and check the files before loading the model: a wrong file fails in a second, not
    # after a minutes-long load
    files = [read_network_tensors(p) for p in loras]
    base = _resolve_base(model)
    if out.resolve() == base.resolve():
        raise ToolError(f"-o {output}: that is the base model itself; write the merged model somewhere else")
    if base.is_file():
        if base.suffix.lower() != ".safetensors":
            raise ToolError(f"--model {model}: only .safetensors checkpoints are read here (a .ckpt is a pickle); "
                            "convert it to .safetensors or give a diffusers folder")
        if cls.diffusers_lora_prefix != "unet":
            raise ToolError(f"--model {model}: {arch} loads from a diffusers folder or hub id, not a single file")
        if not single:
            raise ToolError(
                f"--model {model} is a single file: write the merged model as one too (-o merged.safetensors)"
            )
    elif single:
        raise ToolError(
            f"-o {out}: a single-file output needs an SD / SDXL base that is itself a .safetensors checkpoint "
            "(its UNet weights are replaced in place); give -o a folder to write a diffusers folder"
        )
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ToolError(f"--device {device!r}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ToolError(f"--device {device}: no CUDA device is available here; use --device cpu")
    load_dtype = DTYPES[dtype] if dtype != "auto" else stored_dtype(base)
    kwargs = {"config": config} if config else {}
    try:
        adapter = cls(ModelConfig(name_or_path=str(base), arch=arch, model_kwargs=kwargs), dev, load_dtype)
    except ValueError as exc:
        raise ToolError(str(exc)) from None
    for path, (tensors, metadata) in zip(loras, files):
        try:
            parse_network_file(tensors, metadata, adapter, arch)
        except ToolError as exc:
            raise ToolError(f"{path}: {exc}") from None
    try:
        adapter.load()
    except (ModelLoadError, OSError) as exc:
        raise ToolError(str(exc)) from None
    experts = list(adapter.experts().items())
    for _, module in experts:
        module.to(dev)  # the adapter loads on the host; merging runs where --device says
    if len(loras) > len(experts):
        raise ToolError(f"--lora-2 given, but {model} has one denoiser")
    result = MergeResult(out, load_dtype)
    modules: dict[str, torch.nn.Module] = {}
    for (expert, module), path, source in zip(experts, loras, files):
        try:
            names = merge_network_file(
                module, source, strength=strength, prefix=adapter.lora_prefix, key_for=adapter.lora_key_stem,
                diffusers_prefix=adapter.diffusers_lora_prefix, strict=True,
            )
        except (KeyError, TypeError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise ToolError(f"{path}: {message}") from None
        except RuntimeError as exc:  # matmul / reshape: tensors of another model size
            raise ToolError(f"{path}: its tensors do not fit the {expert} denoiser of {model} (a file for "
                            f"another model or size?): {exc}") from None
        result.merged[expert] = names
        modules[expert] = module
    record = {
        "base": str(model),
        "arch": arch,
        "strength": float(strength),
        "dtype": str(load_dtype).removeprefix("torch."),
        "loras": [
            {"expert": e, "file": str(p), "modules": len(result.merged[e]),
             "sshs_model_hash": src[1].get("sshs_model_hash")}
            for (e, _), p, src in zip(experts, loras, files)
        ],
    }
    if single:
        _save_single_file(adapter, base, result.merged[experts[0][0]], out, record)
    else:
        _save_folder(adapter, base, modules, out, record)
    return result


def merge_command(
    model: str, lora: str, lora_2: str | None, strength: float, arch: str, output: str,
    dtype: str = "auto", config: str | None = None, device: str = "cpu", force: bool = False,
    out: TextIO | None = None, err: TextIO | None = None,
) -> int:
    """The CLI entry: 0 on success, 1 with a message (no traceback) on bad input."""
    out, err = out or sys.stdout, err or sys.stderr
    loras = [lora] + ([lora_2] if lora_2 else [])
    try:
        result = merge_model(model, loras, arch=arch, output=output, strength=strength, dtype=dtype,
                             config=config, device=device, force=force)
    except ToolError as exc:
        print(f"error: {exc}", file=err)
        return 1
    for expert, names in result.merged.items():
        where = "" if len(result.merged) == 1 and expert == "main" else f" ({expert} expert)"
        print(f"merged {len(names)} modules{where} at strength {strength:g}", file=out)
    if "high_noise" in result.merged and "low_noise" not in result.merged:
        print("note: only the high-noise expert was merged; give --lora-2 for the low-noise one", file=out)
    print(f"wrote {result.output} ({str(result.dtype).removeprefix('torch.')})", file=out)
    return 0
