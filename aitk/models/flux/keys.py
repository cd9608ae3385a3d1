"""FLUX.1 LoRA keys: the transformer's Linear layers a network wraps by default, and telling a
FLUX file from its key names.

Saved files name them `transformer.<module path>` (see aitk.models.flux.adapter's docstring).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

#: Linear layers a LoRA wraps by default, relative to each double / single transformer block:
#: attention projections and feed-forward layers; the AdaLN modulation linears stay frozen.
DOUBLE_BLOCK_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)
SINGLE_BLOCK_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
#: key fragments only FLUX-shaped files have: diffusers' single-stream blocks, or the original
#: double / single blocks as kohya names them
FLUX_KEY_FRAGMENTS = ("single_transformer_blocks", "lora_unet_double_blocks", "lora_unet_single_blocks")


def is_flux_lora(keys: Iterable[str]) -> bool:
    """Whether a network file's keys name FLUX transformer blocks."""
    return any(fragment in key for key in keys for fragment in FLUX_KEY_FRAGMENTS)


def flux_lora_candidates(transformer: torch.nn.Module) -> list[str]:
    """Default LoRA targets of a FluxTransformer2DModel, in model order."""
    from aitk.networks.lora import eligible_modules

    wanted: set[str] = set()
    for i in range(len(transformer.transformer_blocks)):
        wanted.update(f"transformer_blocks.{i}.{t}" for t in DOUBLE_BLOCK_TARGETS)
    for i in range(len(transformer.single_transformer_blocks)):
        wanted.update(f"single_transformer_blocks.{i}.{t}" for t in SINGLE_BLOCK_TARGETS)
    return [name for name in eligible_modules(transformer) if name in wanted]
