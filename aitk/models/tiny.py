"""Tiny random-init models of the real diffusers/transformers classes, saved as a diffusers folder.

Used by the tests and the demo: the real loading code runs on them, nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_SD15_VERSION = "2"  # bump when the shapes below change, so cached folders are rebuilt


def _byte_level_vocab() -> tuple[dict[str, int], list[str]]:
    """A character-level CLIP vocabulary (each byte, alone and word-final) and no merges.

    Built offline in milliseconds; the tokenizer class, special tokens and max length are CLIP's.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, []


def build_tiny_sd15(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny SD 1.5-shaped pipeline (UNet, VAE with 8x downscale, CLIP) to `folder`."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    marker = folder / "aitk_tiny.json"
    if marker.exists() and json.loads(marker.read_text()).get("version") == TINY_SD15_VERSION:
        return folder

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
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
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=514,
            max_position_embeddings=77,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
            projection_dim=32,
        )
    )
    vocab, merges = _byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    # SD 1.5's own scheduler config carries these; previews derive DDIM/Euler from it.
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    marker.write_text(json.dumps({"version": TINY_SD15_VERSION, "arch": "sd1"}))
    return folder
