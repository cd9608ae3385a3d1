"""Tiny random-init Z-Image pipelines of the real classes, saved as diffusers folders.

ZImageTransformer2DModel (single-stream DiT: noise / context refiners, then the main layers), a
16-channel AutoencoderKL with FLUX's scaling and shift (Z-Image uses FLUX.1's VAE) and its 8x
downscale, a Qwen3Model text encoder whose second-to-last hidden states condition the transformer,
a byte-level Qwen2Tokenizer with a chat template built offline, and FlowMatchEulerDiscreteScheduler
with Z-Image Turbo's fixed shift of 3. ZImagePipeline loads the folder as it loads the real model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aitk.models import tiny_common
from aitk.models.flux.tiny import tiny_flux_vae

TINY_ZIMAGE_VERSION = "1"  # bump when the shapes below change, so cached folders are rebuilt
VARIANTS = ("turbo",)
#: text-encoder tokens per prompt the tiny tokenizer allows (the real one: 512 by the pipeline)
TINY_TEXT_MAX_LENGTH = 64
TEXT_DIM = 32  # Qwen3 hidden size = the transformer's cap_feat_dim
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: Qwen3's chat template for one user turn and the generation prompt (what ZImagePipeline asks for);
#: thinking switched off adds the empty think block, as Qwen3's own template does
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def build_tokenizer() -> Any:
    """Qwen3's tokenizer class over a byte-level vocabulary (each byte one token, no merges) and
    its three special tokens: any prompt tokenizes, nothing is downloaded."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    tokens = sorted(ByteLevel.alphabet()) + list(SPECIAL_TOKENS)
    return Qwen2Tokenizer(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=[],
        model_max_length=TINY_TEXT_MAX_LENGTH,
        chat_template=CHAT_TEMPLATE,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )


def build_tiny_zimage(folder: str | Path, variant: str = "turbo", seed: int = 0) -> Path:
    """Write a tiny Z-Image pipeline to `folder` (rebuilt only when its marker names another
    version or variant)."""
    tiny_common.check_variant(variant, VARIANTS)
    marker = {"version": TINY_ZIMAGE_VERSION, "variant": variant, "arch": "zimage"}
    return tiny_common.build_once(folder, seed, marker, _zimage_pipeline, match=("version", "variant"))


def tiny_transformer() -> Any:
    """The tiny ZImageTransformer2DModel (random init from torch's current generator state)."""
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=TEXT_DIM,
        axes_dims=[4, 6, 6],  # sums to the head dim (32 / 2)
        axes_lens=[256, 64, 64],  # caption positions come first on axis 0, then the image rows / columns
    )


def _zimage_pipeline() -> Any:
    """The ZImagePipeline `build_tiny_zimage` saves (torch's generator already seeded)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(**tiny_common.small_decoder_config(
        len(tokenizer), TEXT_DIM, TINY_TEXT_MAX_LENGTH, tokenizer.pad_token_id, tie_word_embeddings=True
    )))
    vae = tiny_flux_vae()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=tiny_transformer()
    )
