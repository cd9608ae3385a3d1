"""Tiny random-init models of the real diffusers/transformers classes, saved as a diffusers folder.

Used by the tests and the demo: the real loading code runs on them, nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aitk.models import tiny_common

TINY_SD15_VERSION = "2"  # bump when the shapes below change, so cached folders are rebuilt


def build_tiny_sd15(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny SD 1.5-shaped pipeline (UNet, VAE with 8x downscale, CLIP) to `folder`."""
    marker = {"version": TINY_SD15_VERSION, "arch": "sd1"}
    return tiny_common.build_once(folder, seed, marker, _sd15_pipeline)


def _sd15_pipeline() -> Any:
    """The StableDiffusionPipeline `build_tiny_sd15` saves (torch's generator already seeded)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
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
    scheduler = PNDMScheduler(**tiny_common.SD_NOISE_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False)
    # SD 1.5's own scheduler config carries these; previews derive DDIM/Euler from it.
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False)
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
