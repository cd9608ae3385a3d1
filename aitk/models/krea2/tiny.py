"""Tiny random-init Krea 2 pipelines of the real classes, saved as diffusers folders.

Krea2Transformer2DModel (single-stream MMDiT with its text-fusion stage over a stack of tapped
text-encoder layers), AutoencoderKLQwenImage (Qwen-Image's causal 3-D VAE, 8x downscale, its
latent mean / std), Qwen3VLModel (a 4-layer text model and a one-block vision tower) with
Qwen-Image's offline byte-level tokenizer (the same prompt template: its merges spell the
template's prefix in 34 tokens and the suffix in 5, as the real tokenizer does), and the
FlowMatchEulerDiscreteScheduler with Krea 2's resolution-dependent exponential shift.
Krea2Pipeline loads the folder as it loads the real model; nothing is downloaded.

Variants: "raw" (the base model, resolution-dependent preview shift) and "turbo" (the few-step
distilled one: the pipeline's `is_distilled`, a fixed preview shift).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aitk.models import tiny_common

TINY_KREA2_VERSION = "1"  # bump when the shapes below change, so cached folders are rebuilt
VARIANTS = ("raw", "turbo")
TEXT_WIDTH = 32  # the text model's hidden size = the transformer's text_hidden_dim (2560 real)
#: hidden states the pipeline taps (0 is the embedding output), as (2, 5, ..., 35) of the real 36 layers
SELECT_LAYERS = (2, 3, 4)
#: Krea 2's scheduler: mu from 0.5 at 256 image tokens to 1.15 at 6400, exponential shift
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
    "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 6400, "time_shift_type": "exponential",
}


def build_tiny_krea2(folder: str | Path, variant: str = "raw", seed: int = 0) -> Path:
    """Write a tiny Krea 2 pipeline to `folder` (rebuilt only when its marker names another
    version or variant)."""
    tiny_common.check_variant(variant, VARIANTS)
    marker = {"version": TINY_KREA2_VERSION, "variant": variant, "arch": "krea2"}
    return tiny_common.build_once(folder, seed, marker, lambda: _pipeline(variant == "turbo"),
                                  match=("version", "variant"))


def tiny_transformer() -> Any:
    """The tiny Krea2Transformer2DModel (random init from torch's current generator state)."""
    from diffusers import Krea2Transformer2DModel

    return Krea2Transformer2DModel(
        in_channels=64,  # 16 latent channels x a 2x2 patch
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        num_key_value_heads=1,  # grouped-query attention, as 48 / 12 heads
        intermediate_size=64,
        timestep_embed_dim=32,
        text_hidden_dim=TEXT_WIDTH,
        num_text_layers=len(SELECT_LAYERS),
        text_num_attention_heads=2,
        text_num_key_value_heads=2,
        text_intermediate_size=64,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, as (32, 48, 48) sums to 128
    )


def _text_encoder(tokenizer: Any) -> Any:
    """Qwen3-VL with a 4-layer text model as wide as the transformer's text input."""
    from transformers import Qwen3VLConfig, Qwen3VLModel

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>",
                                                           "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": 2 * TEXT_WIDTH,
            "num_hidden_layers": max(SELECT_LAYERS),
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "max_position_embeddings": 2048,
            # multimodal RoPE: the sections add up to half a head (16 / 2), as 24 + 20 + 20 = 128 / 2
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True,
                                "rope_theta": 5000000.0},
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": TEXT_WIDTH,
            "num_position_embeddings": 16, "deepstack_visual_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen3VLModel(config).eval()


def _pipeline(distilled: bool) -> Any:
    """The Krea2Pipeline `build_tiny_krea2` saves (torch's generator already seeded)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, Krea2Pipeline

    from aitk.models.qwen_image.tiny import qwen_tokenizer

    tokenizer = qwen_tokenizer()
    # the real VAE's layout (3 downsamples: 8x; latents_mean / latents_std default to Qwen-Image's)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])
    pipe = Krea2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae, text_encoder=_text_encoder(tokenizer),
        tokenizer=tokenizer, transformer=tiny_transformer(), text_encoder_select_layers=SELECT_LAYERS,
        is_distilled=distilled,
    )
    prefix = len(tokenizer(pipe.prompt_template_encode_prefix).input_ids)
    suffix = len(tokenizer(pipe.prompt_template_encode_suffix).input_ids)
    if (prefix, suffix) != (pipe.prompt_template_encode_start_idx, pipe.prompt_template_encode_num_suffix_tokens):
        raise RuntimeError(  # diffusers changed its template
            f"the tiny tokenizer spells Krea2Pipeline's template prefix / suffix in {prefix} / {suffix} tokens, the "
            f"pipeline expects {pipe.prompt_template_encode_start_idx} / {pipe.prompt_template_encode_num_suffix_tokens}"
        )
    return pipe
