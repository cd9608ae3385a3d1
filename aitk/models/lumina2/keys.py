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

import re
from collections.abc import Mapping

import torch

from aitk.networks.fused_files import FusedWeights, fuse_lora_tensors

PREFIX = "diffusion_model."
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
_BLOCK = re.compile(r"^(context_refiner|noise_refiner|layers)\.(\d+)\.(.+)$")
_ORIGINAL_BLOCK = {orig: diff for diff, orig in _BLOCK_NAMES.items()}
_ORIGINAL_OTHER = {orig: diff for diff, orig in _OTHER_NAMES.items()}


def _real_qkv_rows(total: int) -> tuple[int, ...] | None:
    """q / k / v rows of a fused `attention.qkv` in files without aitk's record: the real model's
    24 query and 8 key / value heads (2304 + 768 + 768 rows)."""
    return (3 * total // 5, total // 5, total // 5) if total % 5 == 0 else None


#: the fused weights of the original layout: one `attention.qkv` per block
FUSED_QKV = FusedWeights(
    pattern=r"diffusion_model\.(?:context_refiner|noise_refiner|layers)\.\d+\.attention\.qkv",
    part_rows=_real_qkv_rows,
)


def original_name(module_name: str) -> str | None:
    """The original path of a diffusers Lumina2Transformer2DModel Linear layer (q / k / v: their
    part of `attention.qkv`), None if the original checkpoint has no such layer."""
    m = _BLOCK.match(module_name)
    if m:
        inner = _BLOCK_NAMES.get(m.group(3))
        return f"{m.group(1)}.{m.group(2)}.{inner}" if inner else None
    return _OTHER_NAMES.get(module_name)


def lora_key_stem(module_name: str) -> str:
    """`diffusion_model.<original path>` of one wrapped module; ValueError for a layer the
    original checkpoint does not have."""
    name = original_name(module_name)
    if name is None:
        raise ValueError(
            f"module {module_name!r} has no name in Lumina 2's original checkpoint layout, so ComfyUI "
            "could not load its LoRA weights; wrap only Linear layers of the transformer "
            "(network.network_kwargs.only_if_contains / ignore_if_contains)"
        )
    return PREFIX + name


def module_for_stem(stem: str) -> str | None:
    """Inverse of `lora_key_stem`: the diffusers module path of a key stem, None if none."""
    if not stem.startswith(PREFIX):
        return None
    rest = stem[len(PREFIX):]
    m = _BLOCK.match(rest)
    if m:
        inner = _ORIGINAL_BLOCK.get(m.group(3))
        return f"{m.group(1)}.{m.group(2)}.{inner}" if inner else None
    return _ORIGINAL_OTHER.get(rest)


def is_block_target(module_name: str) -> bool:
    """An attention, feed-forward or modulation Linear of a transformer block: ai-toolkit's
    Lumina 2 LoRA targets (every Linear inside the blocks)."""
    m = _BLOCK.match(module_name)
    return bool(m) and m.group(3) in _BLOCK_NAMES


def lumina2_lora_candidates(transformer: torch.nn.Module) -> list[str]:
    """Default LoRA targets of a Lumina2Transformer2DModel, in model order."""
    from aitk.networks.lora import eligible_modules

    return [name for name in eligible_modules(transformer) if is_block_target(name)]


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
    for key, down in tensors.items():
        if FUSED_QKV.part_stems(stem := key.rsplit(".", 2)[0]) and key.endswith((".lora_A.weight", ".lora_down.weight")):
            up = tensors.get(f"{stem}.lora_B.weight", tensors.get(f"{stem}.lora_up.weight"))
            if up is not None and down.dim() == 2 and up.shape[0] < 3 * down.shape[1]:
                return True
    return False


def fused_qkv_file(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fused form of a file's q / k / v LoRAs for readers that take no alpha (diffusers'
    original-layout reader): each part's alpha / rank folded into its block of the up, alpha =
    rank (scale 1). DoRA's per-row magnitudes stack. Other keys are kept as they are."""
    return fuse_lora_tensors(tensors, FUSED_QKV, fold_scales=True)[0]
