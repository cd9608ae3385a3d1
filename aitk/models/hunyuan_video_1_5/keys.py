"""HunyuanVideo 1.5 LoRA names: default targets, and diffusers module paths <-> the names ComfyUI's
HunyuanVideo 1.5 model has.

ComfyUI runs HunyuanVideo 1.5 on its HunyuanVideo model (comfy/ldm/hunyuan_video/model.py, FLUX-
style blocks): a double block's image and text attention each hold one fused `qkv` and a `proj`,
its MLPs are `img_mlp.0` / `img_mlp.2`, its modulations `img_mod.lin` / `txt_mod.lin`; the token
refiner's blocks hold `self_attn.qkv`. Its LoRA loader (comfy/lora.py, model_lora_keys_unet)
maps `diffusion_model.<its own weight path>` for every model, and for the HunyuanVideo family
also the original Tencent names of HunyuanVideo 1.0 (`img_attn_qkv`, `img_mlp.fc1`,
`img_mod.linear`, under `diffusion_model.` or `transformer.`). HunyuanVideo 1.5's original
checkpoint splits q / k / v (`img_attn_q`...), which neither mapping knows, so musubi-tuner's
files (kohya `lora_unet_double_blocks_0_img_attn_q`, one LoRA per split layer) do not load in
ComfyUI for q / k / v.

So aitk names every layer `diffusion_model.<ComfyUI path>`; q / k / v by their part of the fused
weight (`...img_attn.qkv.q` / `.k` / `.v`), and the comfyui layout writes the three as one LoRA on
the fused `qkv` (`FUSED_QKV`, aitk.networks.fused_files: down stacked, up block-diagonal), which
ComfyUI loads with every other layer. diffusers' HunyuanVideo 1.5 pipelines have no LoRA loader;
`save_format: diffusers` gives `transformer.<module path>` keys that the transformer's own
`load_lora_adapter` (PeftAdapterMixin) takes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from aitk.models.original_names import DOUBLE_BLOCK_ATTENTION, PREFIX, QKV_PARTS, BlockList, OriginalNames
from aitk.networks.fused_files import FusedWeights

# inside a double block (diffusers: transformer_blocks.N): diffusers path -> ComfyUI path
_DOUBLE = {
    **DOUBLE_BLOCK_ATTENTION,
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
}
# inside a token-refiner block (diffusers: context_embedder.token_refiner.refiner_blocks.N)
_REFINER = {
    **{f"attn.{name}": f"self_attn.qkv.{part}" for name, part in QKV_PARTS.items()},
    "attn.to_out.0": "self_attn.proj",
    "ff.net.0.proj": "mlp.0",
    "ff.net.2": "mlp.2",
    "norm_out.linear": "adaLN_modulation.1",
}
# outside the blocks (never default targets; reachable with custom filters). The image projection
# (I2V's SigLIP tokens) and the output norm are left out: their ComfyUI layout is not one to one.
_OTHER = {
    "context_embedder.proj_in": "txt_in.input_embedder",
    "context_embedder.time_text_embed.timestep_embedder.linear_1": "txt_in.t_embedder.in_layer",
    "context_embedder.time_text_embed.timestep_embedder.linear_2": "txt_in.t_embedder.out_layer",
    "context_embedder.time_text_embed.text_embedder.linear_1": "txt_in.c_embedder.in_layer",
    "context_embedder.time_text_embed.text_embedder.linear_2": "txt_in.c_embedder.out_layer",
    "context_embedder_2.linear_1": "byt5_in.fc1",
    "context_embedder_2.linear_2": "byt5_in.fc2",
    "context_embedder_2.linear_3": "byt5_in.fc3",
    "time_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "proj_out": "final_layer.linear",
}
NAMES = OriginalNames(
    blocks=[
        BlockList("transformer_blocks", "double_blocks", _DOUBLE),
        # the refiner is no default target (musubi-tuner trains the double blocks only)
        BlockList(
            "context_embedder.token_refiner.refiner_blocks", "txt_in.individual_token_refiner.blocks", _REFINER,
            default_target=False,
        ),
    ],
    other=_OTHER,
    unnamed_error=(
        "module {module!r} has no one-to-one weight in ComfyUI's HunyuanVideo 1.5 model, so ComfyUI "
        "could not load its LoRA weights; wrap the double blocks' and token refiner's Linear layers only "
        "(network.network_kwargs.only_if_contains / ignore_if_contains)"
    ),
)
#: the fused weights of ComfyUI's model: each double block's image and text qkv and each refiner
#: block's qkv (q, k and v have the same heads: a third of the rows each)
FUSED_QKV = FusedWeights(
    pattern=r"diffusion_model\.(?:double_blocks\.\d+\.(?:img|txt)_attn|txt_in\.individual_token_refiner\.blocks\.\d+\.self_attn)\.qkv"
)


#: ComfyUI's path of a HunyuanVideo15Transformer3DModel Linear layer (q / k / v: their part of the
#: fused qkv), None where ComfyUI's model has no one-to-one weight
comfy_name = NAMES.original_name
#: `diffusion_model.<ComfyUI path>` of one wrapped module; ValueError for a layer without one
lora_key_stem = NAMES.lora_key_stem
#: inverse of `lora_key_stem`
module_for_stem = NAMES.module_for_stem
#: a Linear of a double block (attention, MLPs and modulation): the default LoRA targets, as
#: musubi-tuner trains every Linear of HunyuanVideo 1.5's double blocks
is_block_target = NAMES.is_block_target
#: default LoRA targets of a HunyuanVideo15Transformer3DModel, in model order
lora_candidates = NAMES.lora_candidates


def is_hunyuan_video_15_lora(tensors: Mapping[str, torch.Tensor]) -> bool:
    """A HunyuanVideo 1.5 network file by its key names: ComfyUI names with per-block modulation
    (`double_blocks.N.img_mod.lin`) or the token refiner / glyph projection and no single blocks
    (FLUX.1 / FLUX.2 files have single blocks and FLUX.2 no per-block modulation), musubi-tuner's
    split names (`double_blocks_N_img_attn_q`)."""
    keys = list(tensors)
    if any("single_blocks" in k for k in keys):
        return False
    comfy = any(".double_blocks." in k and ("_mod.lin." in k or "_mod.linear." in k) for k in keys)
    extra = any("individual_token_refiner" in k or "byt5_in." in k for k in keys) and any("double_blocks" in k for k in keys)
    musubi = any(re.search(r"double_blocks_\d+_(?:img|txt)_attn_q\.", k) for k in keys)
    return comfy or extra or musubi
