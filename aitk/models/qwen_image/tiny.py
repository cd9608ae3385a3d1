"""Tiny random-init Qwen-Image pipelines saved as diffusers folders (tests and the demo).

The real classes with toy sizes: QwenImageTransformer2DModel (2x2 patches of 16 latent channels),
AutoencoderKLQwenImage (the causal 3-D VAE, 8x downscale, the real latent mean / std),
Qwen2_5_VLForConditionalGeneration (text model and a one-block vision tower) with an offline
byte-level BPE Qwen2Tokenizer, and the FlowMatchEulerDiscreteScheduler config Qwen-Image ships.
QwenImagePipeline loads the folder as it loads the real model; nothing is downloaded.

The tokenizer's merges spell each word of the pipeline's prompt template as one token, so the
template's prefix is 34 tokens as with the real tokenizer and the pipeline's
`prompt_template_encode_start_idx` (34) drops exactly the template, as it does for the real model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aitk.models import tiny_common

TINY_QWEN_IMAGE_VERSION = "1"  # bump when the shapes below change, so cached folders are rebuilt
VARIANTS = ("t2i",)
#: special tokens of Qwen2.5-VL's tokenizer the pipelines use (chat turns, padding, image slots)
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)
#: the template's words with their byte-level spelling ("Ġ" = a leading space, "Ċ" = newline)
TEMPLATE_WORDS = (
    "system", "user", "assistant", "Describe", "Ġthe", "Ġimage", "Ġby", "Ġdetailing", "Ġcolor", "Ġshape",
    "Ġsize", "Ġtexture", "Ġquantity", "Ġtext", "Ġspatial", "Ġrelationships", "Ġof", "Ġobjects", "Ġand",
    "Ġbackground",
)
#: the text model's width: the transformer's joint_attention_dim (3584 in Qwen-Image)
TEXT_WIDTH = 32


def build_tiny_qwen_image(folder: str | Path, variant: str = "t2i", seed: int = 0) -> Path:
    """Write a tiny Qwen-Image pipeline to `folder` (variant "t2i": Qwen-Image / Qwen-Image-2512,
    which share the architecture). Rebuilt only when the folder's marker names another version."""
    tiny_common.check_variant(variant, VARIANTS)
    marker = {"version": TINY_QWEN_IMAGE_VERSION, "variant": variant, "arch": "qwen_image"}
    return tiny_common.build_once(folder, seed, marker, _pipeline, match=("version", "variant"))


def qwen_tokenizer() -> Any:
    """A Qwen2Tokenizer over every byte plus merges for the template's words, and the specials."""
    return byte_tokenizer(TEMPLATE_WORDS)


def byte_tokenizer(words: Sequence[str]) -> Any:
    """A Qwen2Tokenizer over every byte, merges that spell each of `words` left to right, and the
    special tokens."""
    from tokenizers import AddedToken
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []
    for word in words:  # left to right: each prefix of the word is a token
        for end in range(2, len(word) + 1):
            if word[:end] not in vocab:
                vocab[word[:end]] = len(vocab)
                merges.append((word[: end - 1], word[end - 1]))
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def text_encoder(tokenizer: Any, max_positions: int = 2048) -> Any:
    """Qwen2.5-VL with a 2-layer text model as wide as the transformer's text input, a 1-block
    vision tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": 2 * TEXT_WIDTH,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": max_positions,
            # multimodal RoPE: the sections add up to half a head (16 / 2), as 16 + 24 + 24 = 128 / 2
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": TEXT_WIDTH,
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def denoising_parts() -> dict[str, Any]:
    """The tiny transformer, VAE and scheduler of Qwen-Image's pipelines (in this order: torch's
    generator already seeded)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels x a 2x2 patch, as in Qwen-Image
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, as (16, 56, 56) sums to 128
    )
    # the real VAE's layout (3 downsamples: 8x; latents_mean / latents_std default to Qwen-Image's)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])
    # Qwen-Image's scheduler_config.json
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )
    return {"transformer": transformer, "vae": vae, "scheduler": scheduler}


def _pipeline() -> Any:
    """The QwenImagePipeline `build_tiny_qwen_image` saves (torch's generator already seeded)."""
    from diffusers import QwenImagePipeline

    tokenizer = qwen_tokenizer()
    pipe = QwenImagePipeline(**denoising_parts(), text_encoder=text_encoder(tokenizer), tokenizer=tokenizer)
    prefix = pipe.prompt_template_encode.split("{}")[0]
    if len(tokenizer(prefix).input_ids) != pipe.prompt_template_encode_start_idx:  # diffusers changed it
        raise RuntimeError(
            f"the tiny tokenizer spells QwenImagePipeline's template prefix in {len(tokenizer(prefix).input_ids)} "
            f"tokens, the pipeline drops {pipe.prompt_template_encode_start_idx}: update TEMPLATE_WORDS"
        )
    return pipe
