"""A tiny random-init Chroma pipeline saved as a diffusers folder (tests and the demo).

The real classes with toy sizes, laid out as lodestones/Chroma1-HD ships: ChromaTransformer2DModel
(one double and one single block, a one-layer modulation approximator), a 16-channel
AutoencoderKL with FLUX's scaling and shift factors and 8x downscale, a T5 encoder with an offline
character-level tokenizer, FlowMatchEulerDiscreteScheduler with FLUX's dynamic shifting.
ChromaPipeline loads the folder as it loads the real model; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aitk.models import tiny_common
from aitk.models.flux.tiny import tiny_flux_vae, tiny_t5_encoder

TINY_CHROMA_VERSION = "1"  # bump when the shapes below change, so cached folders are rebuilt
VARIANTS = ("base",)
#: T5 tokens per prompt the tiny tokenizer allows (the real one: 512); keeps the joint attention small
TINY_T5_MAX_LENGTH = 32
TEXT_DIM = 32  # T5 d_model = the transformer's joint_attention_dim


def _t5_vocab() -> list[tuple[str, float]]:
    """Unigram pieces in T5's layout (<pad>=0, </s>=1, <unk>=2): the word-start marker and every
    printable character, so any ASCII prompt tokenizes without <unk> (one piece per character)."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    return specials + [("\u2581", -1.0)] + [(c, -2.0) for c in tiny_common.PRINTABLE]


def build_tiny_chroma(folder: str | Path, variant: str = "base", seed: int = 0) -> Path:
    """Write the tiny Chroma pipeline to `folder` (rebuilt only when its marker names another
    version or variant)."""
    tiny_common.check_variant(variant, VARIANTS)
    marker = {"version": TINY_CHROMA_VERSION, "variant": variant, "arch": "chroma"}
    return tiny_common.build_once(folder, seed, marker, _chroma_pipeline, match=("version", "variant"))


def _chroma_pipeline() -> Any:
    """The ChromaPipeline `build_tiny_chroma` saves (torch's generator already seeded)."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x a 2x2 patch, as in Chroma / FLUX.1
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        approximator_num_channels=16,  # 4 x the timestep embedding width, as 64 is in the real model
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    vae = tiny_flux_vae()
    vocab = _t5_vocab()
    text_encoder = tiny_t5_encoder(vocab, TEXT_DIM)  # T5 v1.1 (T5-XXL), Chroma's text encoder
    scheduler = FlowMatchEulerDiscreteScheduler(  # Chroma1-HD's scheduler_config.json values
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    return ChromaPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder,
        tokenizer=tiny_common.t5_tokenizer(vocab, TINY_T5_MAX_LENGTH), transformer=transformer,
    )
