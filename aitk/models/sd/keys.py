"""Which Stable Diffusion model a network file without header metadata was trained on.

kohya / ComfyUI files name UNet modules `lora_unet_<path with _>` (diffusers' down_blocks / up_blocks
/ mid_block or the original input_blocks / output_blocks / middle_block), diffusers files
`unet.<path>`, and text encoders `lora_te*_` / `text_encoder*.`. The cross-attention key width
tells the models apart: CLIP-L 768 (SD 1.x), OpenCLIP-H 1024 (SD 2.x), CLIP-L + OpenCLIP-bigG 2048
(SDXL); a text-encoder-only file says it by its query width.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

#: key fragments of an SD-family UNet module
UNET_KEYS = (
    "lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_",
    "lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_", "unet.",
)
#: key prefixes of CLIP text encoders (SDXL's second one: TE2_KEYS)
TE_KEYS = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.")
TE2_KEYS = ("lora_te2_", "text_encoder_2.")
#: cross-attention (context) width -> model; SDXL's two encoders give 768 + 1280
CONTEXT_WIDTHS = ((2048, "sdxl"), (1024, "sd2"), (768, "sd1"))
#: blocks only SDXL's UNet has (its third transformer block per attention, the time-id embedding)
SDXL_ONLY_KEYS = ("transformer_blocks_1_", "transformer_blocks.1.", "add_embedding")


def _down_widths(tensors: Mapping[str, torch.Tensor], fragments: tuple[str, ...]) -> set[int]:
    """Input widths of the down (A) matrices of the modules whose keys contain a fragment."""
    return {
        int(t.shape[1]) for k, t in tensors.items()
        if any(f in k for f in fragments) and ("lora_down" in k or "lora_A" in k) and t.dim() == 2
    }


def sd_lora_variant(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """"sd1", "sd2" or "sdxl" for a Stable Diffusion network file, None for any other model's."""
    keys = list(tensors)

    def has(*fragments: str) -> bool:
        return any(f in k for k in keys for f in fragments)

    if has(*UNET_KEYS):
        widths = _down_widths(tensors, ("attn2_to_k", "attn2.to_k"))
        for width, variant in CONTEXT_WIDTHS:
            if width in widths:
                return variant
        return "sdxl" if has(*TE2_KEYS, *SDXL_ONLY_KEYS) else "sd1"
    if keys and all(k.startswith(TE_KEYS) for k in keys):  # a text-encoder-only file
        if has(*TE2_KEYS):
            return "sdxl"
        return "sd2" if 1024 in _down_widths(tensors, ("q_proj",)) else "sd1"
    return None
