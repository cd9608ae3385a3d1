"""A tiny random-init SDXL-shaped pipeline, saved as a diffusers folder (tests, demos).

Same layout as stabilityai/stable-diffusion-xl-base-1.0 (unet/ with text_time added conditioning,
vae/, text_encoder/ = CLIPTextModel, text_encoder_2/ = CLIPTextModelWithProjection, two
tokenizers, an Euler scheduler with SDXL's noise schedule), only small. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aitk.models import tiny_common
# the real DDPM schedule, so the tiny models train and preview as SD does
from aitk.models.sd.adapter import DEFAULT_NOISE_SCHEDULE

TINY_SDXL_VERSION = "2"  # bump when the shapes below change, so cached folders are rebuilt

# The two text encoders have different widths on purpose: diffusers' single-file loader tells
# CLIP-L from OpenCLIP-bigG by the width of their position embeddings, as in the real model
# (768 vs 1280).
TE1_WIDTH = 32
TE2_WIDTH = 64
TIME_EMBED_DIM = 8  # addition_time_embed_dim: each of the 6 time ids gets this many features


def build_tiny_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny SDXL-shaped pipeline to `folder` (kept when already built at this version)."""
    marker = {"version": TINY_SDXL_VERSION, "arch": "sdxl"}
    return tiny_common.build_once(folder, seed, marker, _sdxl_pipeline)


def _sdxl_pipeline() -> Any:
    """The StableDiffusionXLPipeline `build_tiny_sdxl` saves (torch's generator already seeded)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = tiny_common.tiny_unet(
        # SDXL's traits: several transformer layers deeper down, linear proj_in / proj_out,
        # per-block head counts. Unlike SDXL the highest resolution has attention too: with
        # only two levels an attention-only LoRA barely moves the loss otherwise (measured:
        # 200 steps 1.05 -> 0.98 without, 120 steps 1.04 -> 0.58 with).
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=TE1_WIDTH + TE2_WIDTH,  # both encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        # 6 time ids (original size, crop top-left, target size) + text_encoder_2's pooled output
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TE2_WIDTH,
    )
    vae = tiny_common.tiny_autoencoder_kl(
        latent_channels=4,
        scaling_factor=0.13025,  # SDXL's VAE scaling factor
        force_upcast=True,
    )
    text_encoder = CLIPTextModel(tiny_common.clip_text_config(TE1_WIDTH, 2, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_common.clip_text_config(TE2_WIDTH, 2, "gelu"))
    tokenizer = tiny_common.clip_tokenizer()
    # SDXL's second tokenizer pads with "!" (OpenCLIP's habit) instead of the end token
    tokenizer_2 = tiny_common.clip_tokenizer(pad_token="!")
    scheduler = EulerDiscreteScheduler(
        **DEFAULT_NOISE_SCHEDULE, timestep_spacing="leading", prediction_type="epsilon"
    )
    # SDXL's own scheduler config carries these; previews derive DDIM/PNDM from it.
    scheduler.register_to_config(
        clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, sample_max_value=1.0
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
