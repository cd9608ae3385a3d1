"""A tiny random-init SDXL-shaped pipeline, saved as a diffusers folder (tests, demos).

Same layout as stabilityai/stable-diffusion-xl-base-1.0 (unet/ with text_time added conditioning,
vae/, text_encoder/ = CLIPTextModel, text_encoder_2/ = CLIPTextModelWithProjection, two
tokenizers, an Euler scheduler with SDXL's noise schedule), only small. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_SDXL_VERSION = "2"  # bump when the shapes below change, so cached folders are rebuilt

# The two text encoders have different widths on purpose: diffusers' single-file loader tells
# CLIP-L from OpenCLIP-bigG by the width of their position embeddings, as in the real model
# (768 vs 1280).
TE1_WIDTH = 32
TE2_WIDTH = 64
TIME_EMBED_DIM = 8  # addition_time_embed_dim: each of the 6 time ids gets this many features


def _clip_config(width: int, layers: int, act: str) -> "object":
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        vocab_size=514,
        max_position_embeddings=77,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        projection_dim=width,
        hidden_act=act,
    )


def build_tiny_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny SDXL-shaped pipeline to `folder` (kept when already built at this version)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from aitk.models.tiny import _byte_level_vocab

    folder = Path(folder)
    marker = folder / "aitk_tiny.json"
    if marker.exists() and json.loads(marker.read_text()).get("version") == TINY_SDXL_VERSION:
        return folder

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
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
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,  # SDXL's VAE scaling factor
        force_upcast=True,
    )
    text_encoder = CLIPTextModel(_clip_config(TE1_WIDTH, 2, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(TE2_WIDTH, 2, "gelu"))
    vocab, merges = _byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    # SDXL's second tokenizer pads with "!" (OpenCLIP's habit) instead of the end token
    tokenizer_2 = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="!")
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    # SDXL's own scheduler config carries these; previews derive DDIM/PNDM from it.
    scheduler.register_to_config(
        clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, sample_max_value=1.0
    )
    pipe = StableDiffusionXLPipeline(
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
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    marker.write_text(json.dumps({"version": TINY_SDXL_VERSION, "arch": "sdxl"}))
    return folder
