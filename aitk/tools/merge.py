"""`aitk merge --model BASE --lora FILE [--lora-2 FILE] --strength S --arch ARCH -o OUT`.

Bakes network files into a base model's denoiser weights (aitk.networks.merge: LoRA, LoCon,
DoRA, LoKr, LoHa, any layout aitk writes; a LoRA on a fused qkv goes onto its split layers), and a file's text-encoder LoRA (SD 1.x / 2.x `lora_te_`,
SDXL `lora_te1_` / `lora_te2_`, or diffusers' `text_encoder.` / `text_encoder_2.` keys) into the
text encoders, at the same strength, as kohya's merge scripts do. It saves the result:

- OUT a folder: a diffusers folder. Every file of the base folder is copied except the merged
  parts' subfolders (unet/, transformer/, transformer_2/, and text_encoder/, text_encoder_2/ when
  the file carries their LoRA), which are written from the merged modules; so the scheduler,
  tokenizers, VAE and untouched encoders stay byte-identical. Merged text encoders keep the
  precision the base stores them in (--dtype auto) or take --dtype.
  A hub id is resolved to its local (downloaded) snapshot first.
- OUT a .safetensors file (SD 1.x / 2.x / SDXL from a single-file checkpoint): a copy of the
  base checkpoint with the merged weights replaced in place under their original key names
  (aitk.tools.checkpoint_file).

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

from aitk.networks.export import KOHYA_WEIGHT_NAMES
from aitk.tools.checkpoint_file import LDM_UNET_PREFIX, save_single_file
from aitk.tools.layout import (
    NetworkFile,
    ToolError,
    is_peft_keyed,
    modules_to_kohya,
    parse_network_file,
    read_network_tensors,
    split_fused_tensors,
    split_text_encoder_tensors,
)

__all__ = ["MergeResult", "merge_model", "merge_command"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
#: adapter attributes that hold a denoiser, and the diffusers subfolder each is saved in
DENOISER_ATTRS = ("unet", "transformer", "transformer_2")
#: written into a merged folder (and a single file's header) to say what was merged
MERGE_RECORD = "aitk_merge.json"


@dataclass
class MergeResult:
    output: Path
    dtype: torch.dtype
    #: expert name -> merged module names
    merged: dict[str, list[str]] = field(default_factory=dict)
    #: text encoder attribute (= its subfolder) -> merged module names
    text_encoders: dict[str, list[str]] = field(default_factory=dict)


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


def _save_folder(
    adapter: Any, base: Path, merged: dict[str, torch.nn.Module], encoders: dict[str, torch.nn.Module],
    output: Path, record: dict, encoder_dtype: str,
) -> None:
    subfolders = {_denoiser_attr(adapter, m) for m in merged.values()} | set(encoders)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)

    def skip(folder: str, names: list[str]) -> set[str]:
        if Path(folder) != base:
            return set()
        # the merged parts are written below; hidden entries are caches of download tools
        return {n for n in names if n in subfolders or n.startswith(".")}

    try:
        shutil.copytree(base, tmp, ignore=skip)  # follows the hub cache's symlinks: real files
        for module in merged.values():
            module.save_pretrained(tmp / _denoiser_attr(adapter, module), safe_serialization=True)
        for name, module in encoders.items():
            if encoder_dtype == "auto":
                module.to(_first_float_dtype(sorted((base / name).glob("*.safetensors"))) or module.dtype)
            else:
                module.to(DTYPES[encoder_dtype])
            module.save_pretrained(tmp / name, safe_serialization=True)
        (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        _replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _merge_text_encoders(adapter: Any, nf: NetworkFile, strength: float, path: str) -> dict[str, list[str]]:
    """Merge the file's text-encoder LoRA into the adapter's encoders; {encoder: merged modules}.

    The parsed modules are written out under kohya's stems (whatever the file's layout) and
    matched against each encoder through `TextEncoderNaming.key_stem`, so the paths meet the
    encoder with or without transformers' `text_model` level."""
    from aitk.networks.merge import merge_network_file
    from aitk.networks.text_encoders import text_encoder_namings

    namings = text_encoder_namings(adapter)
    encoders = adapter.text_encoders()
    merged: dict[str, list[str]] = {}
    for name, modules in nf.text_encoders.items():
        encoder = encoders.get(name)
        if encoder is None:
            raise ToolError(f"{path}: carries LoRA for {name}, which the base model did not load")
        naming = namings[name]
        tensors = modules_to_kohya(modules, naming.key_stem, KOHYA_WEIGHT_NAMES)
        try:
            merged[name] = merge_network_file(
                encoder, (tensors, {}), strength=strength, key_for=naming.key_stem, strict=True
            )
        except (KeyError, TypeError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise ToolError(f"{path}: {name}: {message}") from None
        except RuntimeError as exc:  # matmul / reshape: tensors of another encoder size
            raise ToolError(f"{path}: its {name} tensors do not fit the base model's {name} (a file for "
                            f"another model?): {exc}") from None
    return merged


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
    from aitk.models.base import ModelLoadError
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
            "(its weights are replaced in place); give -o a folder to write a diffusers folder"
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
    parsed: list[NetworkFile] = []
    for path, (tensors, metadata) in zip(loras, files):
        try:
            parsed.append(parse_network_file(tensors, metadata, adapter, arch))
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
    for (expert, module), path, (tensors, metadata) in zip(experts, loras, files):
        denoiser, _ = split_text_encoder_tensors(tensors, adapter)
        if not is_peft_keyed(denoiser, metadata):  # one LoRA on a fused qkv: its parts, on the split layers
            denoiser, _, _ = split_fused_tensors(denoiser, metadata, adapter)
        try:
            names = merge_network_file(
                module, (denoiser, metadata), strength=strength, prefix=adapter.lora_prefix,
                key_for=adapter.lora_key_stem,
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
    for path, nf in zip(loras, parsed):
        for encoder in nf.text_encoders:
            adapter.text_encoders()[encoder].to(dev)
        for encoder, names in _merge_text_encoders(adapter, nf, strength, path).items():
            result.text_encoders.setdefault(encoder, []).extend(names)
    record = {
        "base": str(model),
        "arch": arch,
        "strength": float(strength),
        "dtype": str(load_dtype).removeprefix("torch."),
        "loras": [
            {"expert": e, "file": str(p), "modules": len(result.merged[e]),
             "text_encoder_modules": {name: len(m) for name, m in nf.text_encoders.items()},
             "sshs_model_hash": src[1].get("sshs_model_hash")}
            for (e, _), p, src, nf in zip(experts, loras, files, parsed)
        ],
    }
    if single:
        save_single_file(adapter, base, result.merged[experts[0][0]], result.text_encoders, out, MERGE_RECORD, record)
    else:
        encoders = {name: adapter.text_encoders()[name] for name in result.text_encoders}
        _save_folder(adapter, base, modules, encoders, out, record, dtype)
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
    for encoder, names in result.text_encoders.items():
        print(f"merged {len(names)} text-encoder modules into {encoder} at strength {strength:g}", file=out)
    if "high_noise" in result.merged and "low_noise" not in result.merged:
        print("note: only the high-noise expert was merged; give --lora-2 for the low-noise one", file=out)
    print(f"wrote {result.output} ({str(result.dtype).removeprefix('torch.')})", file=out)
    return 0
