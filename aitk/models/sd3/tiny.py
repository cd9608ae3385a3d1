"""Tiny random-init Stable Diffusion 3.5 pipelines (large-like, medium-like) saved as diffusers folders.

The real classes with toy sizes, laid out as stabilityai's SD 3.5 folders: SD3Transformer2DModel
(2x2 patches, RMS q/k norm), a 16-channel AutoencoderKL with SD3's scaling and shift factors and
the 8x downscale, CLIP-L and CLIP-G (CLIPTextModelWithProjection, their pooled projections joined)
and T5 with offline tokenizers, FlowMatchEulerDiscreteScheduler with SD3's fixed shift 3.0.
StableDiffusion3Pipeline loads the folder as it loads the real model; nothing is downloaded.

Variants: "large" (SD 3.5 large's layout: every block one joint attention) and "medium" (SD 3.5
medium's MMDiT-X: the first block also has the second image self-attention `attn2`, what the
real model's `dual_attention_layers` 0-12 give its first 13 blocks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aitk.models import tiny_common
from aitk.models.flux.tiny import t5_vocab, tiny_flux_vae, tiny_t5_encoder

TINY_SD3_VERSION = "1"  # bump when the shapes below change, so cached folders are rebuilt
VARIANTS = ("large", "medium")
#: T5 tokens per prompt the tiny tokenizer allows (the pipeline's default: 256); keeps attention small
TINY_T5_MAX_LENGTH = 32
# CLIP-L and CLIP-G of different widths, as the real ones (768, 1280): a mix-up shows as a shape error
CLIP_L_WIDTH = 32
CLIP_G_WIDTH = 48
#: T5's width is the joint attention width; both CLIP hidden states, joined, are zero-padded to it
T5_WIDTH = 96
HEADS, HEAD_DIM = 4, 8  # inner width 32 = caption projection width, as in SD3 (38 x 64 = 2432 large)
SHIFT = 3.0  # SD 3 / 3.5's scheduler shift


def build_tiny_sd3(folder: str | Path, variant: str = "large", seed: int = 0) -> Path:
    """Write a tiny SD 3.5 pipeline of `variant` (large | medium) to `folder`.

    Rebuilt only when the folder's marker names another version or variant.
    """
    tiny_common.check_variant(variant, VARIANTS)
    marker = {"version": TINY_SD3_VERSION, "variant": variant, "arch": "sd3"}
    return tiny_common.build_once(folder, seed, marker, lambda: _sd3_pipeline(variant), match=("version", "variant"))


def tiny_transformer(variant: str) -> Any:
    """The SD3Transformer2DModel of `variant` (torch's generator already seeded)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,  # 64 px through the 8x VAE: the pipeline's default size
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,  # the last block is "context pre-only" (no to_add_out, no ff_context)
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=HEADS * HEAD_DIM,
        pooled_projection_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,  # both pooled projections, joined
        pos_embed_max_size=64,  # images up to 1024 px (the real ones: 192 large, 384 medium)
        qk_norm="rms_norm",  # SD 3.5 (SD 3 medium had none)
        dual_attention_layers=(0,) if variant == "medium" else (),
    )


def _sd3_pipeline(variant: str) -> Any:
    """The StableDiffusion3Pipeline `build_tiny_sd3` saves (torch's generator already seeded)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    transformer = tiny_transformer(variant)
    vae = tiny_flux_vae(scaling_factor=1.5305, shift_factor=0.0609)  # SD 3's factors
    text_encoder = CLIPTextModelWithProjection(tiny_common.clip_text_config(CLIP_L_WIDTH, 2, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_common.clip_text_config(CLIP_G_WIDTH, 2, "gelu"))
    vocab = t5_vocab()
    text_encoder_3 = tiny_t5_encoder(vocab, T5_WIDTH)  # T5 v1.1, as SD 3's T5-XXL
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_common.clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_common.clip_tokenizer(pad_token="!"),  # OpenCLIP's padding, as SD 3's tokenizer_2
        text_encoder_3=text_encoder_3,
        tokenizer_3=tiny_common.t5_tokenizer(vocab, TINY_T5_MAX_LENGTH),
    )
