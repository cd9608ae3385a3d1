"""Tiny random-init SD 1.5 and SD 2.x of the real diffusers/transformers classes, saved as diffusers folders.

Used by the tests and the demo: the real loading code runs on them, nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aitk.models import tiny_common
# the real DDPM schedule, so the tiny models train and preview as SD does
from aitk.models.sd.adapter import DEFAULT_NOISE_SCHEDULE

TINY_SD15_VERSION = "2"  # bump when the shapes below change, so cached folders are rebuilt


def build_tiny_sd15(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny SD 1.5-shaped pipeline (UNet, VAE with 8x downscale, CLIP) to `folder`."""
    marker = {"version": TINY_SD15_VERSION, "arch": "sd1"}
    return tiny_common.build_once(folder, seed, marker, _sd15_pipeline)


def _sd_pipeline(unet: Any, vae: Any, text_encoder: Any, tokenizer: Any, scheduler: Any) -> Any:
    """An SD 1.x / 2.x pipeline of these parts, without the safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _sd15_pipeline() -> Any:
    """The StableDiffusionPipeline `build_tiny_sd15` saves (torch's generator already seeded)."""
    from diffusers import PNDMScheduler
    from transformers import CLIPTextModel

    unet = tiny_common.tiny_unet(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = tiny_common.tiny_autoencoder_kl(latent_channels=4)
    text_encoder = CLIPTextModel(tiny_common.clip_text_config())
    tokenizer = tiny_common.clip_tokenizer()
    scheduler = PNDMScheduler(**DEFAULT_NOISE_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False)
    # SD 1.5's own scheduler config carries these; previews derive DDIM/Euler from it.
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False)
    return _sd_pipeline(unet, vae, text_encoder, tokenizer, scheduler)


TINY_SD2_VERSION = "1"  # bump when the SD 2 shapes below change
#: "768-v": SD 2.x 768 (v-prediction, DDIM), "512": SD 2.x base (epsilon, PNDM), as Stability ships them
SD2_VARIANTS = ("768-v", "512")
SD2_TE_WIDTH = 48  # OpenCLIP-H is wider than CLIP-L (1024 vs 768); 48 vs SD 1.5's 32 here


def build_tiny_sd2(folder: str | Path, variant: str = "768-v", seed: int = 0) -> Path:
    """Write a tiny SD 2.x-shaped pipeline (the `variant` of SD2_VARIANTS) to `folder`."""
    tiny_common.check_variant(variant, SD2_VARIANTS)
    marker = {"version": TINY_SD2_VERSION, "arch": "sd2", "variant": variant}
    return tiny_common.build_once(folder, seed, marker, lambda: _sd2_pipeline(variant), ("version", "variant"))


def _sd2_pipeline(variant: str) -> Any:
    """The StableDiffusionPipeline `build_tiny_sd2` saves, laid out as stabilityai's SD 2 folders."""
    from diffusers import DDIMScheduler, PNDMScheduler
    from transformers import CLIPTextModel

    v_model = variant == "768-v"
    unet = tiny_common.tiny_unet(
        # 768 px / 8 = 96 latents at full size: 1.5x SD 1.5's, so 12 here against its 8
        sample_size=12 if v_model else 8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        # SD 2's traits: linear proj_in / proj_out and a head count per block (its config's
        # attention_head_dim [5, 10, 20, 20] counts heads), cross-attention as wide as OpenCLIP
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=SD2_TE_WIDTH,
    )
    vae = tiny_common.tiny_autoencoder_kl(latent_channels=4)  # SD 2 kept SD 1's VAE
    # OpenCLIP-H as SD 2's text_encoder/ holds it: a CLIPTextModel with gelu, cut after its
    # penultimate layer (23 of 24), so the last hidden state the pipeline takes is the penultimate
    text_encoder = CLIPTextModel(tiny_common.clip_text_config(SD2_TE_WIDTH, 2, "gelu"))
    tokenizer = tiny_common.clip_tokenizer(pad_token="!")  # OpenCLIP pads with "!"
    if v_model:
        scheduler = DDIMScheduler(
            **DEFAULT_NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False,
            prediction_type="v_prediction",
        )
    else:
        scheduler = PNDMScheduler(
            **DEFAULT_NOISE_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False,
            prediction_type="epsilon",
        )
        scheduler.register_to_config(clip_sample=False)
    return _sd_pipeline(unet, vae, text_encoder, tokenizer, scheduler)
