"""Tiny random-init Lumina-Image 2.0 pipelines of the real diffusers / transformers classes.

Lumina2Transformer2DModel with grouped-query attention as in the real model (fewer key / value
heads than query heads, so q / k / v differ in size), the FLUX VAE's 16-channel AutoencoderKL with
its scaling and shift factors, a Gemma-2 text encoder (Gemma2Model, the class the real folder
holds) and a GemmaTokenizer whose BPE vocabulary is trained here in milliseconds, and the real
scheduler config (FlowMatchEulerDiscreteScheduler, fixed shift 6). Lumina2Pipeline loads the folder
as it loads Alpha-VLLM/Lumina-Image-2.0; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aitk.models import tiny_common
from aitk.models.flux.tiny import tiny_flux_vae

TINY_LUMINA2_VERSION = "1"  # bump when the shapes below change, so cached folders are rebuilt
VARIANTS = ("base",)
#: the real model's scheduler: a fixed time shift of 6 (no resolution-dependent shift)
SCHEDULER_SHIFT = 6.0
GEMMA_DIM = 32  # the tiny Gemma's hidden size = the transformer's cap_feat_dim
#: tokens per prompt the tiny tokenizer allows: Lumina2Pipeline's default length, which holds its
#: system prompt and a caption
TOKENIZER_MAX_LENGTH = 256
# Lumina2Pipeline prefixes every prompt with this text (its `system_prompt`); the tokenizer learns
# its words so a prompt's own words stay inside the 256 tokens
_SYSTEM_TEXT = (
    "You are an assistant designed to generate superior images with the superior degree of "
    "image-text alignment based on textual prompts or user prompts. <Prompt Start> "
)


def _corpus() -> list[str]:
    words = (
        "a the of on in with and red green blue yellow white black grey circle square triangle "
        "shape style photo background shp person cat dog fill"
    ).split()
    return [_SYSTEM_TEXT] * 8 + [" ".join(words[i:] + words[:i]) for i in range(len(words))]


def build_tokenizer() -> Any:
    """Gemma's tokenizer class (byte-fallback BPE, spaces as "▁") over a vocabulary trained on a
    few lines with the `tokenizers` library: no download, no sentencepiece. Every printable
    character and the 256 byte tokens are in it, so any prompt tokenizes without <unk>."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # Gemma's ids 0..4
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")  # GemmaTokenizer's normalizer
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("\u2581"), behavior="merged_with_next")
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + len(bytes_) + 200,
        special_tokens=specials + bytes_,
        initial_alphabet=list(tiny_common.PRINTABLE) + ["\u2581"],
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    merges = [tuple(pair) for pair in json.loads(tok.to_str())["model"]["merges"]]
    return GemmaTokenizer(vocab=tok.get_vocab(), merges=merges, model_max_length=TOKENIZER_MAX_LENGTH)


def build_tiny_lumina2(folder: str | Path, variant: str = "base", seed: int = 0) -> Path:
    """Write a tiny Lumina-Image 2.0 pipeline to `folder` (rebuilt only when its marker names
    another version or variant)."""
    tiny_common.check_variant(variant, VARIANTS)
    marker = {"version": TINY_LUMINA2_VERSION, "variant": variant, "arch": "lumina2"}
    return tiny_common.build_once(folder, seed, marker, _lumina2_pipeline, match=("version", "variant"))


def _lumina2_pipeline() -> Any:
    """The Lumina2Pipeline `build_tiny_lumina2` saves (torch's generator already seeded)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = build_tokenizer()
    transformer = Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        hidden_size=32,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,  # grouped-query attention as in the real model (24 / 8 heads)
        multiple_of=16,
        axes_dim_rope=(4, 6, 6),  # sums to the head size, 16
        axes_lens=(300, 64, 64),  # caption positions first: up to 256 tokens
        cap_feat_dim=GEMMA_DIM,
    )
    vae = tiny_flux_vae()  # FLUX's VAE, as the real model's: 8x downscale
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=GEMMA_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=TOKENIZER_MAX_LENGTH,
            sliding_window=TOKENIZER_MAX_LENGTH,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SCHEDULER_SHIFT)
    return Lumina2Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer
    )
