"""A tiny random-init AuraFlow pipeline of the real classes, saved as a diffusers folder.

AuraFlowTransformer2DModel (MMDiT joint blocks, then single blocks, register tokens, a learned
position table cropped per image), UMT5EncoderModel (AuraFlow's Pile-T5 is a UMT5 encoder) with an
offline T5-family tokenizer, SDXL's 4-channel AutoencoderKL settings with the 8x downscale, and
FlowMatchEulerDiscreteScheduler with AuraFlow's fixed shift 1.73. AuraFlowPipeline loads the folder
as it loads fal/AuraFlow-v0.3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aitk.models import tiny_common
from aitk.models.pixart.tiny import t5_vocab, tiny_t5

TINY_AURAFLOW_VERSION = "1"  # bump when the shapes below change, so cached folders are rebuilt
#: UMT5 tokens per prompt the tiny tokenizer allows (the pipeline's default: 256)
TINY_T5_MAX_LENGTH = 32
T5_WIDTH = 32  # the transformer's joint_attention_dim
SHIFT = 1.73  # fal/AuraFlow-v0.3's scheduler


def build_tiny_auraflow(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny AuraFlow pipeline to `folder` (rebuilt only when its marker names another version)."""
    marker = {"version": TINY_AURAFLOW_VERSION, "arch": "auraflow"}
    return tiny_common.build_once(folder, seed, marker, _auraflow_pipeline)


def tiny_transformer() -> Any:
    """The tiny AuraFlowTransformer2DModel (torch's generator already seeded)."""
    from diffusers import AuraFlowTransformer2DModel

    return AuraFlowTransformer2DModel(
        sample_size=8,  # 64 px through the 8x VAE
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=16,  # the inner width (heads x head dim), as on the real model
        out_channels=4,
        pos_embed_max_size=256,  # 16 x 16 patches: images up to 256 px
    )


def _auraflow_pipeline() -> Any:
    from diffusers import AuraFlowPipeline, FlowMatchEulerDiscreteScheduler

    vocab = t5_vocab()
    return AuraFlowPipeline(
        tokenizer=tiny_common.t5_tokenizer(vocab, TINY_T5_MAX_LENGTH),
        text_encoder=tiny_t5(len(vocab), T5_WIDTH, umt5=True),
        vae=tiny_common.tiny_autoencoder_kl(latent_channels=4, scaling_factor=0.13025),  # SDXL's VAE
        transformer=tiny_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT),
    )
