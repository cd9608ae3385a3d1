"""Tiny random-init FLUX.1 pipelines (dev, schnell, Kontext) saved as diffusers folders.

The real classes with toy sizes: FluxTransformer2DModel, a 16-channel AutoencoderKL with FLUX's
scaling and shift factors and the same 8x downscale, CLIP (pooled) + T5 (hidden states) with
offline tokenizers, FlowMatchEulerDiscreteScheduler with dynamic shifting. FluxPipeline /
FluxKontextPipeline load the folder as they load the real model; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aitk.models import tiny_common

TINY_FLUX_VERSION = "1"  # bump when the shapes below change, so cached folders are rebuilt
VARIANTS = ("dev", "schnell", "kontext")
#: T5 tokens per prompt the tiny tokenizer allows (the real one: 512); keeps the joint attention small
TINY_T5_MAX_LENGTH = 32


def t5_vocab() -> list[tuple[str, float]]:
    """A character-level Unigram vocabulary in T5's layout (<pad>=0, </s>=1, <unk>=2).

    Each printable character alone and with the word-start marker "▁", so any ASCII prompt
    tokenizes without <unk>; scores prefer the word-start pieces, as a trained model would.
    """
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -2.5) for c in tiny_common.PRINTABLE]
    vocab += [(c, -3.0) for c in tiny_common.PRINTABLE]
    return vocab


def tiny_flux_vae(**kwargs: Any) -> Any:
    """FLUX.1's 16-channel AutoencoderKL (its scaling and shift factors, no quant convs) at toy
    size: 4 blocks, the real 8x downscale; `kwargs` override (SD 3: its own factors). Lumina 2,
    Z-Image and Chroma use this VAE too."""
    settings = {"scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
                "use_post_quant_conv": False, **kwargs}
    return tiny_common.tiny_autoencoder_kl(latent_channels=16, **settings)


def tiny_t5_encoder(vocab: list[tuple[str, float]], width: int = 32) -> Any:
    """A one-layer T5 v1.1 encoder (gated-gelu, as FLUX's, SD 3's and Chroma's T5-XXL) of `width`
    over `vocab` (random init from torch's current generator state)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(vocab),
            d_model=width,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def build_tiny_flux(folder: str | Path, variant: str = "dev", seed: int = 0) -> Path:
    """Write a tiny FLUX.1 pipeline of `variant` (dev | schnell | kontext) to `folder`.

    dev and kontext have the guidance embedding (guidance-distilled), schnell has none. Rebuilt
    only when the folder's marker names another version or variant.
    """
    tiny_common.check_variant(variant, VARIANTS)
    arch = "flux_kontext" if variant == "kontext" else "flux"
    marker = {"version": TINY_FLUX_VERSION, "variant": variant, "arch": arch}
    return tiny_common.build_once(
        folder, seed, marker, lambda: _flux_pipeline(variant), match=("version", "variant")
    )


def _flux_pipeline(variant: str) -> Any:
    """The FluxPipeline (FluxKontextPipeline for kontext) `build_tiny_flux` saves (torch's
    generator already seeded)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

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
    vae = tiny_flux_vae()
    text_encoder = CLIPTextModel(tiny_common.clip_text_config())
    tokenizer = tiny_common.clip_tokenizer()
    vocab = t5_vocab()
    text_encoder_2 = tiny_t5_encoder(vocab)
    tokenizer_2 = tiny_common.t5_tokenizer(vocab, TINY_T5_MAX_LENGTH)
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
    return pipeline_cls(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
