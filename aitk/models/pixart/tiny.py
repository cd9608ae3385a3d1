"""Tiny random-init PixArt-alpha / PixArt-Sigma pipelines of the real classes, saved as diffusers folders.

PixArtTransformer2DModel (2x2 patches, AdaLN-single, learned sigma: 8 output channels for 4 latent
ones), T5 v1.1 (T5EncoderModel) with an offline tokenizer, a 4-channel AutoencoderKL with the 8x
downscale, and the models' DPM-Solver scheduler over DDPM's linear betas. Both use the real
models' `sample_size` 128 (the 1024 px models): for "alpha" that switches on the resolution and
aspect-ratio conditioning as on PixArt-XL-2-1024-MS, "sigma" turns it off as its config does.
The VAE is SD's for alpha and SDXL's (scaling factor) for sigma, as the released folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aitk.models import tiny_common

TINY_PIXART_VERSION = "1"  # bump when the shapes below change, so cached folders are rebuilt
VARIANTS = ("alpha", "sigma")
#: T5 tokens per prompt the tiny tokenizer allows (the pipelines: 120 alpha, 300 sigma)
TINY_T5_MAX_LENGTH = 32
T5_WIDTH = 32  # the transformer's caption_channels
#: the released models' scheduler: DPM-Solver++ over DDPM's linear betas, epsilon prediction
SCHEDULER = dict(
    beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000, prediction_type="epsilon"
)
VAE_SCALING = {"alpha": 0.18215, "sigma": 0.13025}  # SD's VAE / SDXL's VAE


def build_tiny_pixart(folder: str | Path, variant: str = "sigma", seed: int = 0) -> Path:
    """Write a tiny PixArt pipeline of `variant` (alpha | sigma) to `folder` (rebuilt only when
    its marker names another version or variant)."""
    tiny_common.check_variant(variant, VARIANTS)
    marker = {"version": TINY_PIXART_VERSION, "variant": variant, "arch": "pixart"}
    return tiny_common.build_once(folder, seed, marker, lambda: _pixart_pipeline(variant), match=("version", "variant"))


def t5_vocab() -> list[tuple[str, float]]:
    """A character-level Unigram vocabulary in T5's layout (<pad>=0, </s>=1, <unk>=2)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -2.5) for c in tiny_common.PRINTABLE]
    vocab += [(c, -3.0) for c in tiny_common.PRINTABLE]
    return vocab


def tiny_t5(vocab_size: int, width: int = T5_WIDTH, umt5: bool = False) -> Any:
    """A one-layer T5 v1.1 encoder (gated GELU, as T5-XXL); `umt5`: UMT5EncoderModel (AuraFlow's)."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kwargs = dict(
        vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, pad_token_id=0, eos_token_id=1,
    )
    return UMT5EncoderModel(UMT5Config(**kwargs)) if umt5 else T5EncoderModel(T5Config(**kwargs))


def tiny_transformer(variant: str) -> Any:
    """The tiny PixArtTransformer2DModel of `variant` (torch's generator already seeded)."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=12,  # inner width 24: the size conditioning splits it in three
        in_channels=4,
        out_channels=8,  # learned sigma: the variance channels follow the noise prediction
        num_layers=2,
        cross_attention_dim=24,
        caption_channels=T5_WIDTH,
        sample_size=128,
        patch_size=2,
        norm_type="ada_norm_single",
        use_additional_conditions=variant == "alpha",
    )


def _pixart_pipeline(variant: str) -> Any:
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline

    vocab = t5_vocab()
    pipeline_class = PixArtAlphaPipeline if variant == "alpha" else PixArtSigmaPipeline
    return pipeline_class(
        transformer=tiny_transformer(variant),
        vae=tiny_common.tiny_autoencoder_kl(latent_channels=4, scaling_factor=VAE_SCALING[variant]),
        text_encoder=tiny_t5(len(vocab)),
        tokenizer=tiny_common.t5_tokenizer(vocab, TINY_T5_MAX_LENGTH),
        scheduler=DPMSolverMultistepScheduler(**SCHEDULER),
    )
