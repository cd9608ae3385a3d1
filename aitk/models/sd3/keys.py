"""SD 3 / 3.5 LoRA targets and key names.

A network wraps, in each JointTransformerBlock, the attention projections of both streams and
both feed-forward networks; SD 3.5 medium's blocks with a second image self-attention
(`dual_attention_layers`, diffusers' `attn2`) add its four projections. The AdaLN modulation
linears (`norm1.linear`, `norm1_context.linear`) stay frozen, as for FLUX. The last block is
"context pre-only": it has no `attn.to_add_out` and no `ff_context`, so only what exists is listed.

Saved files (save_format comfyui / kohya) name each module `transformer.<diffusers module path>`
with `.lora_A.weight`, `.lora_B.weight` and `.alpha`. ComfyUI's SD3 key map (comfy/lora.py
model_lora_keys_unet for model_base.SD3, through comfy/utils.py mmdit_to_diffusers) maps exactly
these `transformer.<path>` names onto its MMDiT weights (q / k / v as slices of the fused `qkv`,
`attn2` of the 3.5 medium blocks included) and reads `.alpha`. The original MMDiT names
(`diffusion_model.joint_blocks.N.x_block.attn.qkv`) cannot carry a LoRA of q, k and v separately.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

#: Linear layers a LoRA wraps by default, relative to each JointTransformerBlock
BLOCK_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)


#: key starts of SD 3 network files: ours / ComfyUI's / diffusers' (PEFT), and OneTrainer's
SD3_KEY_STARTS = ("transformer.transformer_blocks.", "lora_transformer_transformer_blocks_")
#: parts only an MMDiT joint block has among the transformer_blocks families
SD3_BLOCK_PARTS = (".ff_context.net.", "_ff_context_net_", ".attn2.", "_attn2_", ".attn.add_q_proj", "_attn_add_q_proj")
#: parts of other families' files that also name transformer_blocks (FLUX's single blocks, Qwen-Image)
OTHER_FAMILY_PARTS = ("single_transformer_blocks", ".img_mlp.", ".txt_mlp.", ".img_mod.", ".txt_mod.")


def is_sd3_lora(keys: Iterable[str]) -> bool:
    """Whether a network file's keys name SD 3 / 3.5 joint blocks (and no other family's)."""
    keys = list(keys)
    return (
        any(k.startswith(SD3_KEY_STARTS) for k in keys)
        and any(part in k for k in keys for part in SD3_BLOCK_PARTS)
        and not any(part in k for k in keys for part in OTHER_FAMILY_PARTS)
    )


def sd3_lora_candidates(transformer: torch.nn.Module) -> list[str]:
    """Default LoRA targets of an SD3Transformer2DModel that exist in it, in model order."""
    from aitk.networks.lora import eligible_modules

    wanted = {
        f"transformer_blocks.{i}.{target}"
        for i in range(len(transformer.transformer_blocks))
        for target in BLOCK_TARGETS
    }
    return [name for name in eligible_modules(transformer) if name in wanted]
