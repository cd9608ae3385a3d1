"""WAN LoRA key names: diffusers module paths <-> the original WAN names ComfyUI loads.

ComfyUI loads WAN LoRAs only under the original checkpoint names
(`diffusion_model.blocks.N.self_attn.q.lora_down.weight` ...), never under diffusers' names
(`blocks.N.attn1.to_q`); diffusers converts the original names itself on load
(`_convert_non_diffusers_wan_lora_to_diffusers`). So files are written in the original naming.
"""

from __future__ import annotations

from collections.abc import Iterable

from aitk.models.original_names import PREFIX, BlockList, OriginalNames

#: key fragments of WAN's transformer blocks in network files: original, kohya and diffusers names
BLOCK_KEY_FRAGMENTS = ("diffusion_model.blocks.", "lora_unet_blocks_", "transformer.blocks.")
#: key fragments of 2.1 I2V's image attention (original and diffusers names)
IMAGE_ATTENTION_FRAGMENTS = ("k_img", "add_k_proj")

# Inside a transformer block: diffusers path -> original path.
_BLOCK_NAMES = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",  # 2.1 I2V: keys / values of the CLIP image tokens
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}

# Outside the blocks (never default targets; reachable with custom filters). ComfyUI knows these
# names; diffusers 0.42's converter takes their weights but not an `.alpha` for them.
_OTHER_NAMES = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "proj_out": "head.head",
}

NAMES = OriginalNames(
    blocks=[BlockList("blocks", "blocks", _BLOCK_NAMES)],
    other=_OTHER_NAMES,
    unnamed_error=(
        "module {module!r} has no name in WAN's original checkpoint layout, so ComfyUI "
        "could not load its LoRA weights; wrap only attention / FFN layers of the transformer "
        "blocks (network.network_kwargs.only_if_contains / ignore_if_contains)"
    ),
)
#: the original WAN path of a diffusers WanTransformer3DModel module, None if it has none
original_name = NAMES.original_name
#: `diffusion_model.<original path>` for one wrapped module; ValueError when WAN's original
#: checkpoint has no such layer (ComfyUI could not apply it)
lora_key_stem = NAMES.lora_key_stem
#: an attention or FFN linear layer of a transformer block (the default LoRA targets)
is_block_target = NAMES.is_block_target


def lora_file_kind(keys: Iterable[str]) -> str | None:
    """For a network file's keys: "image_attention" when WAN blocks with 2.1 I2V's image attention
    are named, "blocks" for WAN blocks without it, None when no WAN block is named."""
    keys = list(keys)

    def has(fragments: tuple[str, ...]) -> bool:
        return any(f in k for k in keys for f in fragments)

    if not has(BLOCK_KEY_FRAGMENTS):
        return None
    return "image_attention" if has(IMAGE_ATTENTION_FRAGMENTS) else "blocks"
