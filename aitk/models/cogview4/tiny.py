"""Tiny random-init CogView4 pipelines of the real classes, saved as diffusers folders.

CogView4Transformer2DModel (joint text / image attention blocks, 2x2 patches, size conditioning),
a 16-channel AutoencoderKL with the 8x downscale, a GlmModel text encoder whose second-to-last
hidden states condition the transformer, a byte-level fast tokenizer that starts every prompt
with GLM-4's `[gMASK]<sop>` (built offline), and FlowMatchEulerDiscreteScheduler with CogView4's
resolution-dependent linear time shift. CogView4Pipeline loads the folder as it loads the real one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aitk.models import tiny_common

TINY_COGVIEW4_VERSION = "1"  # bump when the shapes below change, so cached folders are rebuilt
VARIANTS = ("6b",)
#: GLM tokens per prompt the tiny tokenizer allows (the pipeline's default: 1024)
TINY_TEXT_MAX_LENGTH = 64
TEXT_DIM = 32  # GLM hidden size = the transformer's text_embed_dim
PAD, GMASK, SOP = "<|endoftext|>", "[gMASK]", "<sop>"
#: CogView4's scheduler: a linear time shift mu = sqrt(tokens / 256) * 0.75 + 0.25 (CogView4Pipeline)
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "base_image_seq_len": 256,
    "base_shift": 0.25,
    "max_shift": 0.75,
    "shift": 1.0,
    "time_shift_type": "linear",
    "use_dynamic_shifting": True,
}


def build_tokenizer() -> Any:
    """A byte-level fast tokenizer (each byte one token, no merges) with GLM-4's pad token and
    its `[gMASK]<sop>` prefix: any prompt tokenizes, nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*chars, PAD, GMASK, SOP])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{GMASK} {SOP} $A", special_tokens=[(GMASK, vocab[GMASK]), (SOP, vocab[SOP])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, additional_special_tokens=[GMASK, SOP],
        model_max_length=TINY_TEXT_MAX_LENGTH, padding_side="left",
    )


def build_tiny_cogview4(folder: str | Path, variant: str = "6b", seed: int = 0) -> Path:
    """Write a tiny CogView4 pipeline to `folder` (rebuilt only when its marker names another
    version or variant)."""
    tiny_common.check_variant(variant, VARIANTS)
    marker = {"version": TINY_COGVIEW4_VERSION, "variant": variant, "arch": "cogview4"}
    return tiny_common.build_once(folder, seed, marker, _cogview4_pipeline, match=("version", "variant"))


def tiny_transformer() -> Any:
    """The tiny CogView4Transformer2DModel (random init from torch's current generator state)."""
    from diffusers import CogView4Transformer2DModel

    return CogView4Transformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        text_embed_dim=TEXT_DIM,
        time_embed_dim=16,
        condition_dim=8,
        pos_embed_max_size=32,
        sample_size=8,  # 64 px through the 8x VAE: the pipeline's default size
        rope_axes_dim=(32, 32),
    )


def _cogview4_pipeline() -> Any:
    """The CogView4Pipeline `build_tiny_cogview4` saves (torch's generator already seeded)."""
    from diffusers import CogView4Pipeline, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    tokenizer = build_tokenizer()
    text_encoder = GlmModel(GlmConfig(**tiny_common.small_decoder_config(
        len(tokenizer), TEXT_DIM, TINY_TEXT_MAX_LENGTH * 2, tokenizer.pad_token_id
    )))
    # a non-unit scaling factor, so a latent scaled the wrong way shows in the tests
    vae = tiny_common.tiny_autoencoder_kl(latent_channels=16, scaling_factor=0.5)
    return CogView4Pipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=tiny_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
    )
