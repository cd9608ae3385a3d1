"""Krea 2 LoRA names: diffusers module paths <-> the original (Krea reference) names that
ai-toolkit's and ComfyUI's Krea 2 models use.

ai-toolkit trains Krea 2 on the reference SingleStreamDiT and writes `diffusion_model.<original
path>`; ComfyUI's model has the same module paths and maps `diffusion_model.<path>` onto every one
of its weights. Every Linear of diffusers' Krea2Transformer2DModel has exactly one original
counterpart (no fused projections), so the names map one to one, in both directions. diffusers'
own reader of original-layout files (`_convert_non_diffusers_krea2_lora_to_diffusers`) maps the
same names back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from aitk.models.original_names import PREFIX, BlockList, OriginalNames

# Inside a transformer or text-fusion block: diffusers path -> original path.
_BLOCK_NAMES = {
    "attn.to_q": "attn.wq",
    "attn.to_k": "attn.wk",
    "attn.to_v": "attn.wv",
    "attn.to_out.0": "attn.wo",
    "attn.to_gate": "attn.gate",
    "ff.gate": "mlp.gate",
    "ff.up": "mlp.up",
    "ff.down": "mlp.down",
}
# Outside the blocks.
_OTHER_NAMES = {
    "img_in": "first",
    "time_embed.linear_1": "tmlp.0",
    "time_embed.linear_2": "tmlp.2",
    "time_mod_proj": "tproj.1",
    "txt_in.linear_1": "txtmlp.1",
    "txt_in.linear_2": "txtmlp.3",
    "text_fusion.projector": "txtfusion.projector",
    "final_layer.linear": "last.linear",
}
NAMES = OriginalNames(
    blocks=[
        BlockList("transformer_blocks", "blocks", _BLOCK_NAMES),
        BlockList("text_fusion.layerwise_blocks", "txtfusion.layerwise_blocks", _BLOCK_NAMES),
        BlockList("text_fusion.refiner_blocks", "txtfusion.refiner_blocks", _BLOCK_NAMES),
    ],
    other=_OTHER_NAMES,
    unnamed_error=(
        "module {module!r} has no name in Krea 2's original checkpoint layout, so ComfyUI could not "
        "load its LoRA weights; wrap only Linear layers of the transformer "
        "(network.network_kwargs.only_if_contains / ignore_if_contains)"
    ),
)
#: stems only Krea 2's files have: the gated attention of its main blocks (ours and ai-toolkit's
#: original name, diffusers' name)
_KREA2_STEMS = re.compile(
    r"^(?:diffusion_model\.blocks\.\d+\.attn\.gate|transformer\.transformer_blocks\.\d+\.attn\.to_gate)\."
)


#: the original path of a diffusers Krea2Transformer2DModel Linear layer, None if none
original_name = NAMES.original_name
#: `diffusion_model.<original path>` of one wrapped module; ValueError for a layer without one
lora_key_stem = NAMES.lora_key_stem
#: inverse of `lora_key_stem`
module_for_stem = NAMES.module_for_stem


def is_krea2_lora(tensors: Mapping[str, torch.Tensor]) -> bool:
    """A Krea 2 network file by its key names: the gated attention of its main blocks."""
    return any(_KREA2_STEMS.match(key) for key in tensors)
