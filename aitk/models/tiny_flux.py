"""Tiny random-init FLUX.1 pipelines (dev, schnell, Kontext) saved as diffusers folders.

The real classes with toy sizes: FluxTransformer2DModel, a 16-channel AutoencoderKL with FLUX's
scaling and shift factors and the same 8x downscale, CLIP (pooled) + T5 (hidden states) with
offline tokenizers, FlowMatchEulerDiscreteScheduler with dynamic shifting. FluxPipeline /
FluxKontextPipeline load the folder as they load the real model; nothing is downloaded.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

TINY_FLUX_VERSION = "1"  # bump when the shapes below change, so cached folders are rebuilt
VARIANTS = ("dev", "schnell", "kontext")
#: T5 tokens per prompt the tiny tokenizer allows (the real one: 512); keeps the joint attention small
TINY_T5_MAX_LENGTH = 32


def _t5_vocab() -> list[tuple[str, float]]:
    """A character-level Unigram vocabulary in T5's layout (<pad>=0, </s>=1, <unk>=2).

    Each printable character alone and with the word-start marker "▁", so any ASCII prompt
    tokenizes without <unk>; scores prefer the word-start pieces, as a trained model would.
    """
    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -2.5) for c in chars]
    vocab += [(c, -3.0) for c in chars]
    return vocab


def build_tiny_flux(folder: str | Path, variant: str = "dev", seed: int = 0) -> Path:
    """Write a tiny FLUX.1 pipeline of `variant` (dev | schnell | kontext) to `folder`.

    dev and kontext have the guidance embedding (guidance-distilled), schnell has none. Rebuilt
    only when the folder's marker names another version or variant.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    from aitk.models.tiny import _byte_level_vocab

    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")
    folder = Path(folder)
    marker = folder / "aitk_tiny.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("version") == TINY_FLUX_VERSION and info.get("variant") == variant:
            return folder

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x a 2x2 patch, as in FLUX.1
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 d_model
        pooled_projection_dim=32,  # CLIP hidden size (its pooled output)
        guidance_embeds=variant != "schnell",
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 16, 16),  # 4 blocks: 8x downscale like FLUX's VAE
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
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
    t5_vocab = _t5_vocab()
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_vocab),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's T5-XXL
            is_encoder_decoder=False,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    tokenizer_2 = T5Tokenizer(vocab=t5_vocab, extra_ids=0, model_max_length=TINY_T5_MAX_LENGTH)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0 if variant == "schnell" else 3.0,
        use_dynamic_shifting=variant != "schnell",
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipeline_cls = FluxKontextPipeline if variant == "kontext" else FluxPipeline
    pipe = pipeline_cls(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    arch = "flux_kontext" if variant == "kontext" else "flux"
    marker.write_text(json.dumps({"version": TINY_FLUX_VERSION, "variant": variant, "arch": arch}))
    return folder
