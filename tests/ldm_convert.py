"""Test helper: diffusers SD 1.x state dicts -> the original LDM ("CompVis") single-file layout.

This is the inverse of diffusers' own single-file conversion
(diffusers/loaders/single_file_utils.py: convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
convert_ldm_clip_checkpoint), so a diffusers folder can be written as the kind of
.safetensors file users download (model.diffusion_model.*, first_stage_model.*,
cond_stage_model.transformer.*) and the single-file loading path can be tested offline.

The mapping is derived from the block structure (layers_per_block, the number of down/up
blocks, which blocks carry attentions / resamplers), not from a fixed key list. Every key of
the input must be mapped; anything unexpected raises, so nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."

# --- UNet --------------------------------------------------------------------------------------

# diffusers top-level UNet layers -> LDM (inverse of DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]).
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

# diffusers ResnetBlock2D sub-module -> LDM ResBlock sub-module
# (inverse of update_unet_resnet_ldm_to_diffusers).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def _unet_resnet(rest: str) -> str:
    sub, _, param = rest.partition(".")
    if sub not in _UNET_RESNET:
        raise KeyError(f"unknown UNet resnet parameter {rest!r}")
    return f"{_UNET_RESNET[sub]}.{param}"


def _layers_per_block(config: Mapping[str, Any]) -> int:
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        # diffusers' LDM conversion also assumes one layers_per_block for every block
        raise ValueError(f"layers_per_block must be one int for the LDM layout, got {lpb!r}")
    return lpb


def convert_unet_to_ldm(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict -> LDM keys (without the model prefix).

    LDM numbering: input_blocks.0 is conv_in; each down block contributes layers_per_block
    entries (.0 resnet, .1 attention) and, when it downsamples, one more entry (.0.op).
    The middle block is [resnet, attention, resnet]. Each up block contributes
    layers_per_block + 1 entries (.0 resnet, .1 attention); its upsampler sits in the last
    entry after the resnet (and attention, if any) as .1.conv or .2.conv.
    """
    lpb = _layers_per_block(config)
    num_down = len(config["down_block_types"])
    num_up = len(config["up_block_types"])
    keys = set(state_dict)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    # diffusers module prefix -> (LDM module prefix, sub-key mapper or None for identical names)
    modules: dict[str, tuple[str, Any]] = {}
    for name, ldm in _UNET_TOP.items():
        modules[name] = (ldm, None)

    index = 1
    for b in range(num_down):
        for layer in range(lpb):
            modules[f"down_blocks.{b}.resnets.{layer}"] = (f"input_blocks.{index}.0", _unet_resnet)
            # SpatialTransformer and Transformer2DModel share parameter names (norm, proj_in,
            # transformer_blocks.N.{attn1,attn2,ff,norm1-3}, proj_out)
            modules[f"down_blocks.{b}.attentions.{layer}"] = (f"input_blocks.{index}.1", None)
            index += 1
        if has(f"down_blocks.{b}.downsamplers.0.conv."):
            modules[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", None)
            index += 1

    # middle block: resnets.i -> middle_block.{2i}, attentions.i -> middle_block.{2i+1}
    i = 0
    while has(f"mid_block.resnets.{i}."):
        modules[f"mid_block.resnets.{i}"] = (f"middle_block.{2 * i}", _unet_resnet)
        modules[f"mid_block.attentions.{i}"] = (f"middle_block.{2 * i + 1}", None)
        i += 1

    for b in range(num_up):
        for layer in range(lpb + 1):
            index = b * (lpb + 1) + layer
            modules[f"up_blocks.{b}.resnets.{layer}"] = (f"output_blocks.{index}.0", _unet_resnet)
            attention = f"up_blocks.{b}.attentions.{layer}"
            modules[attention] = (f"output_blocks.{index}.1", None)
            if layer == lpb:
                slot = 2 if has(attention + ".") else 1
                modules[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{index}.{slot}.conv", None)

    return _apply_module_map(state_dict, modules, "UNet")


def _apply_module_map(
    state_dict: Mapping[str, torch.Tensor], modules: Mapping[str, tuple[str, Any]], what: str
) -> dict[str, torch.Tensor]:
    # longest prefix first, so "down_blocks.1.resnets.1" never matches "down_blocks.1.resnets.10"
    ordered = sorted(modules.items(), key=lambda item: len(item[0]), reverse=True)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        for prefix, (ldm_prefix, mapper) in ordered:
            if key.startswith(prefix + "."):
                rest = key[len(prefix) + 1 :]
                new_key = f"{ldm_prefix}.{mapper(rest) if mapper else rest}"
                break
        else:
            raise KeyError(f"{what} key {key!r} has no LDM equivalent in this converter")
        if new_key in out:
            raise KeyError(f"{what} keys collide on LDM key {new_key!r}")
        out[new_key] = tensor
    return out


# --- VAE ---------------------------------------------------------------------------------------

# diffusers Attention (VAE mid block) -> LDM AttnBlock (inverse of update_vae_attentions_ldm_to_diffusers)
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _vae_resnet(rest: str) -> str:
    # the VAE ResnetBlock2D names match LDM's, except the 1x1 shortcut
    return rest.replace("conv_shortcut.", "nin_shortcut.", 1)


def _vae_attention(rest: str) -> str:
    for diffusers_name, ldm_name in sorted(_VAE_ATTENTION.items(), key=lambda kv: -len(kv[0])):
        if rest.startswith(diffusers_name + "."):
            return ldm_name + rest[len(diffusers_name) :]
    raise KeyError(f"unknown VAE attention parameter {rest!r}")


def convert_vae_to_ldm(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict -> LDM keys (without the first_stage_model prefix).

    Encoder down blocks keep their index (encoder.down.i.block.j, .downsample.conv); decoder up
    blocks are numbered in reverse (diffusers up_blocks.i is LDM decoder.up.{n-1-i}). The mid
    block's attention uses 1x1 convs in LDM: Linear weights (out, in) become (out, in, 1, 1).
    """
    num_down = len(config["down_block_types"])
    num_up = len(config["up_block_types"])
    keys = set(state_dict)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    modules: dict[str, tuple[str, Any]] = {}
    for part in ("encoder", "decoder"):
        modules[f"{part}.conv_in"] = (f"{part}.conv_in", None)
        modules[f"{part}.conv_out"] = (f"{part}.conv_out", None)
        modules[f"{part}.conv_norm_out"] = (f"{part}.norm_out", None)
        i = 0
        while has(f"{part}.mid_block.resnets.{i}."):
            modules[f"{part}.mid_block.resnets.{i}"] = (f"{part}.mid.block_{i + 1}", _vae_resnet)
            i += 1
        i = 0
        while has(f"{part}.mid_block.attentions.{i}."):
            modules[f"{part}.mid_block.attentions.{i}"] = (f"{part}.mid.attn_{i + 1}", _vae_attention)
            i += 1
    modules["quant_conv"] = ("quant_conv", None)
    modules["post_quant_conv"] = ("post_quant_conv", None)

    for i in range(num_down):
        j = 0
        while has(f"encoder.down_blocks.{i}.resnets.{j}."):
            modules[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _vae_resnet)
            j += 1
        modules[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", None)

    for i in range(num_up):
        ldm_index = num_up - 1 - i
        j = 0
        while has(f"decoder.up_blocks.{i}.resnets.{j}."):
            modules[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{ldm_index}.block.{j}", _vae_resnet)
            j += 1
        modules[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{ldm_index}.upsample.conv", None)

    out = _apply_module_map(state_dict, modules, "VAE")
    for key, tensor in out.items():
        # attention projections: Linear (out, in) -> 1x1 Conv2d (out, in, 1, 1)
        if ".mid.attn_" in key and key.endswith(".weight") and tensor.ndim == 2:
            out[key] = tensor[:, :, None, None]
    return out


# --- CLIP text encoder -------------------------------------------------------------------------


def convert_clip_to_ldm(
    state_dict: Mapping[str, torch.Tensor], with_position_ids: bool = True
) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict -> LDM keys (without cond_stage_model.transformer.).

    LDM stores the HF CLIPTextModel under cond_stage_model.transformer with its transformers-4
    names (text_model.embeddings..., text_model.encoder.layers...); transformers >= 5.6 dropped
    the text_model wrapper from CLIPTextModel, so it is put back here. Released SD 1.x files
    also carry the (non-persistent in transformers 5) position_ids buffer; `with_position_ids`
    adds it, so loaders are exercised with that extra key too.
    """
    out = {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state_dict.items()}
    position_key = "text_model.embeddings.position_ids"
    if with_position_ids and position_key not in out:
        positions = out["text_model.embeddings.position_embedding.weight"].shape[0]
        out[position_key] = torch.arange(positions, dtype=torch.int64).unsqueeze(0)
    return out


# --- whole checkpoint --------------------------------------------------------------------------


def pipeline_to_ldm(unet: Any, vae: Any, text_encoder: Any) -> dict[str, torch.Tensor]:
    """The three models (diffusers / transformers modules) as one LDM single-file state dict."""
    checkpoint: dict[str, torch.Tensor] = {}
    parts = (
        (LDM_UNET_PREFIX, convert_unet_to_ldm(unet.state_dict(), unet.config)),
        (LDM_VAE_PREFIX, convert_vae_to_ldm(vae.state_dict(), vae.config)),
        (LDM_CLIP_PREFIX, convert_clip_to_ldm(text_encoder.state_dict())),
    )
    for prefix, part in parts:
        for key, tensor in part.items():
            checkpoint[prefix + key] = tensor.detach().clone().contiguous()
    return checkpoint


def write_ldm_vae(diffusers_folder: str | Path, out_file: str | Path) -> Path:
    """Save the folder's VAE alone as an LDM-layout file (unprefixed keys, like released VAE files)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    vae = AutoencoderKL.from_pretrained(Path(diffusers_folder), subfolder="vae")
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    converted = convert_vae_to_ldm(vae.state_dict(), vae.config)
    save_file({k: v.detach().clone().contiguous() for k, v in converted.items()}, str(out_file))
    return out_file


def write_ldm_checkpoint(diffusers_folder: str | Path, out_file: str | Path) -> Path:
    """Load an SD 1.x diffusers folder and save it as an LDM-layout .safetensors file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    folder = Path(diffusers_folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(pipeline_to_ldm(unet, vae, text_encoder), str(out_file))
    return out_file

