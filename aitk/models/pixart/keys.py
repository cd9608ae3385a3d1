"""PixArt-alpha / Sigma LoRA targets and key names.

A network wraps every Linear of the transformer blocks, as ai-toolkit's LoRA on PixArt: self-attention
(`attn1` q / k / v / out), cross-attention to T5 (`attn2` q / k / v / out) and the feed-forward
(`ff.net.0.proj`, `ff.net.2`). The blocks have no modulation linears (AdaLN-single: one table per
block); the embedders, the AdaLN-single timestep MLP and the output projection stay frozen.

Saved files (save_format comfyui / kohya) name each module `transformer.<diffusers module path>` with
`.lora_A.weight`, `.lora_B.weight` and `.alpha`: ComfyUI's PixArt key map (comfy/lora.py
model_lora_keys_unet for model_base.PixArt, through comfy/utils.py pixart_to_diffusers) maps these
`transformer.<path>` names onto the original weights (q / k / v as slices of the fused `attn.qkv`,
cross-attention k / v of `cross_attn.kv_linear`) and reads `.alpha`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

#: key starts of PixArt network files: ours / ComfyUI's / diffusers' (PEFT), and kohya-style
PIXART_KEY_STARTS = ("transformer.transformer_blocks.", "lora_transformer_transformer_blocks_")
#: self-attention is `attn1` in PixArt's blocks only among the transformer families
PIXART_BLOCK_PARTS = (".attn1.", "_attn1_")


def is_pixart_lora(keys: Iterable[str]) -> bool:
    """Whether a network file's keys name PixArt transformer blocks."""
    keys = list(keys)
    return any(k.startswith(PIXART_KEY_STARTS) and any(p in k for p in PIXART_BLOCK_PARTS) for k in keys)


def pixart_lora_candidates(transformer: torch.nn.Module) -> list[str]:
    """Default LoRA targets of a PixArtTransformer2DModel: every Linear in its blocks, in model order."""
    from aitk.networks.lora import eligible_modules

    return [name for name in eligible_modules(transformer) if name.startswith("transformer_blocks.")]
