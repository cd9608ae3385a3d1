"""Writing merged weights back into an SD 1.x / 2.x / SDXL single-file checkpoint (`aitk merge -o X.safetensors`).

The checkpoint is copied with each merged weight replaced in place, under its original key, shape
and dtype:

- UNet: the LDM key names, found by running diffusers' own single-file key conversion over the key
  names (so the inverse always agrees with how diffusers read the file);
- text encoders: the CLIP-L of SD 1.x and SDXL is stored under transformers' names
  (`cond_stage_model.transformer.text_model...`, `conditioner.embedders.0.transformer...`); the
  OpenCLIP encoders of SD 2.x and SDXL (`cond_stage_model.model.`, `conditioner.embedders.1.model.`)
  keep open_clip's names, q / k / v stacked in one `attn.in_proj_weight` (rows q, k, v, the split
  diffusers' convert_open_clip_checkpoint makes), `mlp.c_fc` / `mlp.c_proj` for fc1 / fc2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from aitk.networks.text_encoders import CLIP_ROOT
from aitk.tools.layout import ToolError

__all__ = ["LDM_UNET_PREFIX", "save_single_file"]

LDM_UNET_PREFIX = "model.diffusion_model."
#: where single-file checkpoints keep each text encoder: (key root, naming), first match wins
TEXT_ENCODER_ROOTS: dict[str, tuple[tuple[str, str], ...]] = {
    "text_encoder": (
        ("cond_stage_model.transformer.", "transformers"),  # SD 1.x
        ("cond_stage_model.model.", "open_clip"),  # SD 2.x
        ("conditioner.embedders.0.transformer.", "transformers"),  # SDXL CLIP-L
    ),
    "text_encoder_2": (("conditioner.embedders.1.model.", "open_clip"),),  # SDXL OpenCLIP-G
}
#: CLIP layer module -> open_clip's (weight name, row block of in_proj_weight or None)
_OPEN_CLIP_LAYER = {
    "self_attn.q_proj": ("attn.in_proj_weight", 0),
    "self_attn.k_proj": ("attn.in_proj_weight", 1),
    "self_attn.v_proj": ("attn.in_proj_weight", 2),
    "self_attn.out_proj": ("attn.out_proj.weight", None),
    "mlp.fc1": ("mlp.c_fc.weight", None),
    "mlp.fc2": ("mlp.c_proj.weight", None),
}
_LAYERS = CLIP_ROOT + "encoder.layers."


def _ldm_unet_keys(unet: torch.nn.Module, keys: list[str]) -> dict[str, str]:
    """diffusers UNet parameter name -> the checkpoint's key, by diffusers' own conversion run on
    the key names (it only renames keys, so it maps each name onto the diffusers one)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return dict(convert_ldm_unet_checkpoint({k: k for k in keys}, dict(unet.config)))


def _text_encoder_slot(encoder: str, module: str, keys: set[str]) -> tuple[str, int | None]:
    """(checkpoint key, row block of a stacked q/k/v weight or None) of a CLIP module's weight."""
    path = module if module.startswith(CLIP_ROOT) else CLIP_ROOT + module
    for root, naming in TEXT_ENCODER_ROOTS.get(encoder, ()):
        if naming == "transformers":
            for key in (f"{root}{path}.weight", f"{root}{path.removeprefix(CLIP_ROOT)}.weight"):
                if key in keys:
                    return key, None
            continue
        layer, _, inner = path.removeprefix(_LAYERS).partition(".")
        if path.startswith(_LAYERS) and layer.isdigit() and inner in _OPEN_CLIP_LAYER:
            name, block = _OPEN_CLIP_LAYER[inner]
            key = f"{root}transformer.resblocks.{layer}.{name}"
            if key in keys:
                return key, block
    raise ToolError(f"the checkpoint has no key for the {encoder} weight {path}.weight; cannot write a single file")


def _put(tensors: dict[str, torch.Tensor], key: str, block: int | None, weight: torch.Tensor, base: Path) -> None:
    """Replace `key` (or its q / k / v row block) with `weight`, in the checkpoint's dtype."""
    original = tensors[key]
    weight = weight.detach().to("cpu")
    if block is None:
        if weight.numel() != original.numel():
            raise ToolError(f"{base}: {key} has shape {tuple(original.shape)}, the merged weight {tuple(weight.shape)}")
        tensors[key] = weight.reshape(original.shape).to(original.dtype).contiguous()
        return
    rows = weight.shape[0]
    if original.shape[0] != 3 * rows or tuple(original.shape[1:]) != tuple(weight.shape[1:]):
        raise ToolError(f"{base}: {key} of shape {tuple(original.shape)} does not stack three {tuple(weight.shape)} "
                        "q / k / v weights")
    stacked = original.clone()
    stacked[block * rows:(block + 1) * rows] = weight.to(original.dtype)
    tensors[key] = stacked.contiguous()


def _replace(tmp: Path, output: Path) -> None:
    if output.exists():
        output.unlink()
    os.replace(tmp, output)


def save_single_file(
    adapter: Any, base: Path, unet_names: list[str], text_encoder_names: dict[str, list[str]],
    output: Path, record_key: str, record: dict,
) -> None:
    """The base checkpoint with each merged UNet / text-encoder weight replaced (same key, shape, dtype)."""
    import safetensors.torch
    from safetensors import safe_open

    with safe_open(str(base), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    mapping = _ldm_unet_keys(adapter.unet, list(tensors))
    params = dict(adapter.unet.named_parameters())
    for name in unet_names:
        key = mapping.get(f"{name}.weight")
        if key is None or key not in tensors:
            raise ToolError(
                f"{base}: no checkpoint key holds the UNet weight {name}.weight; cannot write a single file"
            )
        _put(tensors, key, None, params[f"{name}.weight"], base)
    keys = set(tensors)
    encoders = adapter.text_encoders()
    for encoder, names in text_encoder_names.items():
        weights = dict(encoders[encoder].named_parameters())
        for name in names:
            key, block = _text_encoder_slot(encoder, name, keys)
            _put(tensors, key, block, weights[f"{name}.weight"], base)
    metadata[record_key] = json.dumps(record)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        _replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
