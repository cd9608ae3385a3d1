"""Default LoRA targets per model family (what a model adapter passes as `candidates`).

Chosen like kohya's sd-scripts networks/lora.py, so files match what users and loaders expect:
- LoRA: every Linear and 1x1 Conv2d inside the UNet's transformer blocks (Transformer2DModel):
  proj_in, attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2, proj_out.
- LoCon (include_conv): additionally every Linear / Conv2d inside ResnetBlock2D, Downsample2D and
  Upsample2D: conv1, conv2, conv_shortcut (1x1: linear rank), time_emb_proj (Linear: linear
  rank), downsamplers.N.conv, upsamplers.N.conv.
Never targeted: conv_in, conv_out, time_embedding.linear_1/2, add_embedding (kohya leaves them
alone too). Every targeted name converts correctly in diffusers' kohya loader and in ComfyUI
(checked by tests/test_networks_export.py for the tiny SD 1.5 UNet).
- Text encoders (train.train_text_encoder): every Linear inside CLIP's attention and MLP blocks,
  q_proj / k_proj / v_proj / out_proj, fc1, fc2 (kohya's text-encoder targets); never the token /
  position embeddings or SDXL's text_projection.
"""

from __future__ import annotations

from torch import nn

from aitk.networks.lora import eligible_modules

#: block classes whose Linear / Conv2d children a plain LoRA wraps
UNET_ATTENTION_BLOCKS = ("Transformer2DModel",)
#: block classes added for LoCon (conv layers)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
#: block classes of a CLIP text encoder whose Linear children a text-encoder LoRA wraps
TEXT_ENCODER_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def _names_under(module: nn.Module, class_names: tuple[str, ...]) -> set[str]:
    prefixes = [name for name, sub in module.named_modules() if type(sub).__name__ in class_names]
    eligible = eligible_modules(module)
    out: set[str] = set()
    for prefix in prefixes:
        for name in eligible:
            if name.startswith(prefix + ".") or (prefix == "" and name):
                out.add(name)
    return out


def unet_lora_candidates(unet: nn.Module, include_conv: bool) -> list[str]:
    """Module names of a diffusers UNet2DConditionModel that a LoRA (or LoCon) wraps, model order."""
    wanted = _names_under(unet, UNET_ATTENTION_BLOCKS)
    if include_conv:
        wanted |= _names_under(unet, UNET_CONV_BLOCKS)
    return [n for n in eligible_modules(unet) if n in wanted]


def text_encoder_lora_candidates(text_encoder: nn.Module) -> list[str]:
    """Module names of a CLIP text encoder that a text-encoder LoRA wraps, model order."""
    wanted = _names_under(text_encoder, TEXT_ENCODER_BLOCKS)
    return [n for n in eligible_modules(text_encoder) if n in wanted]
