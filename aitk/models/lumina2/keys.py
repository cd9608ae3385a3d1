"""Lumina-Image 2.0 LoRA names: default targets, and diffusers module paths <-> the original
(Alpha-VLLM NextDiT) names ComfyUI loads.

diffusers' Lumina2Transformer2DModel splits each attention's projection into `attn.to_q / to_k /
to_v`; the original checkpoint, and ComfyUI's model, hold one fused `attention.qkv` whose rows are
q, then k, then v (24 query heads, 8 key / value heads: 2304 + 768 + 768 rows). ComfyUI maps a
LoRA key only onto a weight of its own model (`diffusion_model.<original path>`); its one mapping
onto slices of `attention.qkv` (comfy.utils.z_image_to_diffusers, made for Z-Image) gives k and v
the query's size, which does not fit Lumina 2's grouped-query attention. So:

- every layer is named `diffusion_model.<original path>`, one to one (`lora_key_stem`); q / k / v
  by their part of the fused weight: `diffusion_model.<block>.attention.qkv.q` / `.k` / `.v`;
- in the comfyui layout (`FUSED_QKV`, aitk.networks.fused_files) the three are written as one
  `attention.qkv` LoRA of rank 3r: down = the three downs stacked, up = block-diagonal of the
  three ups, alpha 3a (the same alpha / rank), so the product is exactly the three updates and
  ComfyUI loads the whole file; aitk's loader and tools split it back by the header's record;
- `fused_qkv_file` gives the same form with each part's scale folded into its up (alpha = rank,
  scale 1): diffusers' own reader of original-layout files
  (_convert_non_diffusers_lumina2_lora_to_diffusers) takes no alpha and splits exactly that form
  back, at the real model's sizes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from aitk.models.original_names import PREFIX, BlockList, OriginalNames, lora_down_up_pairs
from aitk.networks.fused_files import FusedWeights, fuse_lora_tensors

#: the transformer's repeated block lists, in the order a forward pass runs them
BLOCK_LISTS = ("context_refiner", "noise_refiner", "layers")
#: q / k / v: their part of the fused original `attention.qkv`
QKV = {"attn.to_q": "q", "attn.to_k": "k", "attn.to_v": "v"}
# Inside a block: diffusers path -> original path (context_refiner blocks have no norm1.linear).
_BLOCK_NAMES = {
    **{path: f"attention.qkv.{part}" for path, part in QKV.items()},
    "attn.to_out.0": "attention.out",
    "feed_forward.linear_1": "feed_forward.w1",
    "feed_forward.linear_2": "feed_forward.w2",
    "feed_forward.linear_3": "feed_forward.w3",
    "norm1.linear": "adaLN_modulation.1",
}
# Outside the blocks (never default targets; reachable with custom filters).
_OTHER_NAMES = {
    "x_embedder": "x_embedder",
    "time_caption_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_caption_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_caption_embed.caption_embedder.1": "cap_embedder.1",
    "norm_out.linear_1": "final_layer.adaLN_modulation.1",
    "norm_out.linear_2": "final_layer.linear",
}
NAMES = OriginalNames(
    blocks=[BlockList(name, name, _BLOCK_NAMES) for name in BLOCK_LISTS],
    other=_OTHER_NAMES,
    unnamed_error=(
        "module {module!r} has no name in Lumina 2's original checkpoint layout, so ComfyUI "
        "could not load its LoRA weights; wrap only Linear layers of the transformer "
        "(network.network_kwargs.only_if_contains / ignore_if_contains)"
    ),
)


def _real_qkv_rows(total: int) -> tuple[int, ...] | None:
    """q / k / v rows of a fused `attention.qkv` in files without aitk's record: the real model's
    24 query and 8 key / value heads (2304 + 768 + 768 rows)."""
    return (3 * total // 5, total // 5, total // 5) if total % 5 == 0 else None


#: the fused weights of the original layout: one `attention.qkv` per block
FUSED_QKV = FusedWeights(
    pattern=r"diffusion_model\.(?:context_refiner|noise_refiner|layers)\.\d+\.attention\.qkv",
    part_rows=_real_qkv_rows,
)

#: the original path of a Lumina2Transformer2DModel Linear layer (q / k / v: their part of
#: `attention.qkv`), None if the original checkpoint has no such layer
original_name = NAMES.original_name
#: `diffusion_model.<original path>` of one wrapped module; ValueError for a layer without one
lora_key_stem = NAMES.lora_key_stem
#: inverse of `lora_key_stem`
module_for_stem = NAMES.module_for_stem
#: an attention, feed-forward or modulation Linear of a block: ai-toolkit's Lumina 2 LoRA targets
is_block_target = NAMES.is_block_target
#: default LoRA targets of a Lumina2Transformer2DModel, in model order
lumina2_lora_candidates = NAMES.lora_candidates


def is_lumina2_lora(tensors: Mapping[str, torch.Tensor]) -> bool:
    """A network file of this model by its key names: refiner blocks (Lumina 2's own) with q / k /
    v under our split stems, diffusers' module paths under `transformer.`, or a fused
    `attention.qkv` of grouped-query attention (fewer rows than three times its input: Z-Image's
    ComfyUI files share the names, but its key / value heads are as many as its query heads)."""
    stems = [k.split(".lora")[0].split(".alpha")[0] for k in tensors]
    refiner = any(("noise_refiner." in s or "context_refiner." in s) for s in stems)
    ours = any(s.startswith(PREFIX) and s.rsplit(".", 1)[-1] in QKV.values() and ".attention.qkv." in s for s in stems)
    theirs = any(s.startswith("transformer.") and is_block_target(s[len("transformer."):]) for s in stems)
    return refiner and (ours or theirs or _grouped_query_qkv(tensors))


def _grouped_query_qkv(tensors: Mapping[str, torch.Tensor]) -> bool:
    pairs = lora_down_up_pairs(tensors, FUSED_QKV.part_stems)
    return any(up.shape[0] < 3 * down.shape[1] for _, down, up in pairs)


def fused_qkv_file(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fused form of a file's q / k / v LoRAs for readers that take no alpha (diffusers'
    original-layout reader): each part's alpha / rank folded into its block of the up, alpha =
    rank (scale 1). DoRA's per-row magnitudes stack. Other keys are kept as they are."""
    return fuse_lora_tensors(tensors, FUSED_QKV, fold_scales=True)[0]
