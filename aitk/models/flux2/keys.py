"""FLUX.2 LoRA names: default targets, and diffusers module paths <-> the original (Black Forest
Labs) names that ai-toolkit's and ComfyUI's FLUX.2 models use.

diffusers' Flux2Transformer2DModel splits each double block's attention projections into
`attn.to_q / to_k / to_v` (image) and `attn.add_q_proj / add_k_proj / add_v_proj` (text); the
original checkpoint holds one fused `img_attn.qkv` / `txt_attn.qkv` each. Every other Linear maps
one to one (single blocks are fused in both: `attn.to_qkv_mlp_proj` = `linear1`, `attn.to_out` =
`linear2`). So, as for Lumina 2 (aitk.models.lumina2.keys):

- files name layers `diffusion_model.<original path>` (ai-toolkit's FLUX.2 names), one to one;
- q / k / v are trained as one LoRA each (`diffusion_model.double_blocks.N.img_attn.qkv.q` / `.k` /
  `.v`, and `txt_attn.qkv.*`); the comfyui layout writes the three as one LoRA on the fused
  `img_attn.qkv` / `txt_attn.qkv` (`FUSED_QKV`, aitk.networks.fused_files: down stacked, up
  block-diagonal, rank 3r, alpha 3a), which ComfyUI loads with every other layer; aitk's tools and
  loader split it back, and `save_format: diffusers` (or `aitk convert --to diffusers`) gives a
  file diffusers loads exactly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from aitk.models.original_names import DOUBLE_BLOCK_ATTENTION, PREFIX, BlockList, OriginalNames, lora_down_up_pairs
from aitk.networks.fused_files import FusedWeights

# inside a double block: diffusers path -> original path
_DOUBLE = {
    **DOUBLE_BLOCK_ATTENTION,
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
# outside the blocks (never default targets; reachable with custom filters)
_OTHER = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "proj_out": "final_layer.linear",
}
NAMES = OriginalNames(
    blocks=[
        BlockList("transformer_blocks", "double_blocks", _DOUBLE),
        BlockList("single_transformer_blocks", "single_blocks", _SINGLE),
    ],
    other=_OTHER,
    unnamed_error=(
        "module {module!r} has no name in FLUX.2's original checkpoint layout, so ComfyUI could not "
        "load its LoRA weights; wrap only Linear layers of the transformer "
        "(network.network_kwargs.only_if_contains / ignore_if_contains)"
    ),
)
_MLP_OUT = re.compile(r"^diffusion_model\.double_blocks\.\d+\.(?:img|txt)_mlp\.2$")
#: the fused weights of the original layout: a double block's image and text qkv (q, k and v have
#: the same heads, so each is a third of the rows)
FUSED_QKV = FusedWeights(pattern=r"diffusion_model\.double_blocks\.\d+\.(?:img|txt)_attn\.qkv")


#: the original path of a Flux2Transformer2DModel Linear layer (q / k / v: their part of the fused
#: qkv), None if the original checkpoint has no such layer
original_name = NAMES.original_name
#: `diffusion_model.<original path>` of one wrapped module; ValueError for a layer without one
lora_key_stem = NAMES.lora_key_stem
#: inverse of `lora_key_stem`
module_for_stem = NAMES.module_for_stem
#: default LoRA targets: every Linear inside the double- and single-stream blocks (attention and
#: feed-forward; FLUX.2's modulation is shared, outside the blocks), in model order
flux2_lora_candidates = NAMES.lora_candidates


def is_flux2_lora(tensors: Mapping[str, torch.Tensor]) -> bool:
    """A FLUX.2 network file by its key names: our split qkv stems, diffusers' FLUX.2-only module
    names (`to_qkv_mlp_proj`, `ff.linear_in`), or original names (shared with FLUX.1) whose
    `img_mlp.2` / `txt_mlp.2` reads three times its output width (FLUX.2's MLP ratio; FLUX.1's is 4)."""
    return any(
        ".img_attn.qkv.q." in k or ".txt_attn.qkv.q." in k or ".attn.to_qkv_mlp_proj." in k or ".ff.linear_in." in k
        for k in tensors
    ) or _flux2_mlp(tensors)


def _flux2_mlp(tensors: Mapping[str, torch.Tensor]) -> bool:
    pairs = lora_down_up_pairs(tensors, _MLP_OUT.search)
    return any(down.shape[1] == 3 * up.shape[0] for _, down, up in pairs)
