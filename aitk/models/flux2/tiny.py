"""Tiny random-init FLUX.2 pipelines of the real classes, saved as diffusers folders (tests, demo).

Flux2Transformer2DModel (double- then single-stream blocks, 4-axis RoPE), AutoencoderKLFlux2 (8x
downscale, 2x2 patches normalised by its batch-norm statistics, here made non-trivial), and the
text encoders the pipelines read three hidden layers of: FLUX.2 dev's Mistral3ForConditionalGeneration
(30 text layers: the pipeline stacks layers 10, 20, 30) and Klein's Qwen3ForCausalLM (27 layers:
9, 18, 27), both narrow. Flux2Pipeline / Flux2KleinPipeline load the folders as the real models.

The dev tokenizer is a text tokenizer with Mistral's chat template (the real folder holds a
PixtralProcessor, which transformers 5 builds only with torchvision; the pipeline's text-only
prompts need its tokenizer alone, see aitk.models.flux2.adapter). The pipeline's system message is
one token of its vocabulary, so that a prompt fits the tiny text length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aitk.models import tiny_common

TINY_FLUX2_VERSION = "1"  # bump when the shapes below change, so cached folders are rebuilt
VARIANTS = ("dev", "klein_4b", "klein_9b")
#: text tokens per prompt the tiny tokenizers allow (the real ones: 512, the pipelines' default)
TINY_TEXT_MAX_LENGTH = 64
TEXT_WIDTH = 16  # the text models' hidden size; the transformer reads 3 layers side by side
LATENT_CHANNELS = 8  # the real VAE has 32; the transformer sees 2x2 patches of them
MISTRAL_SPECIALS = ("<s>", "</s>", "<pad>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]")
#: Mistral's chat template for text-only turns (a turn's content is a string or a list of text parts)
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | map(attribute='text') | join('') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def build_tiny_flux2(folder: str | Path, variant: str = "dev", seed: int = 0) -> Path:
    """Write a tiny FLUX.2 pipeline to `folder`: "dev" (Flux2Pipeline, guidance embedding,
    Mistral 3) or "klein_4b" / "klein_9b" (Flux2KleinPipeline, no guidance embedding, Qwen3).
    Rebuilt only when the folder's marker names another version or variant."""
    tiny_common.check_variant(variant, VARIANTS)
    marker = {"version": TINY_FLUX2_VERSION, "variant": variant, "arch": "flux2" if variant == "dev" else f"flux2_{variant}"}
    return tiny_common.build_once(folder, seed, marker, lambda: _pipeline(variant), match=("version", "variant"))


def mistral_tokenizer() -> Any:
    """A byte-level tokenizer with Mistral's special tokens and chat template; the pipeline's system
    message is one added token."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import AddedToken
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for token in (*MISTRAL_SPECIALS, SYSTEM_MESSAGE):
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], model_max_length=TINY_TEXT_MAX_LENGTH, chat_template=MISTRAL_CHAT_TEMPLATE,
        bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token=None,
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in (*MISTRAL_SPECIALS, SYSTEM_MESSAGE)])
    return tokenizer


def _mistral(tokenizer: Any) -> Any:
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config={
            "model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": TEXT_WIDTH,
            "intermediate_size": 2 * TEXT_WIDTH, "num_hidden_layers": 30, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 256,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "head_dim": 8, "image_size": 28, "patch_size": 14,
        },
        image_token_index=tokenizer.pad_token_id,  # no image slots in text-only prompts
        spatial_merge_size=1,
    )
    return Mistral3ForConditionalGeneration(config).eval()


def _qwen3(tokenizer: Any) -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
            num_hidden_layers=27, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
            max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        )
    ).eval()


def tiny_transformer(guidance: bool) -> Any:
    """The tiny Flux2Transformer2DModel (random init from torch's current generator state)."""
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        in_channels=4 * LATENT_CHANNELS,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * TEXT_WIDTH,  # three text layers side by side, as 3 x 5120 in dev
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),  # sums to the head dim, as 4 x 32 = 128
        guidance_embeds=guidance,
    )


def _vae() -> Any:
    import torch
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        block_out_channels=(16, 16, 16, 16), layers_per_block=1, latent_channels=LATENT_CHANNELS,
        norm_num_groups=8, sample_size=64,
    )
    # statistics of a trained VAE are not 0 / 1: make the normalisation visible to the tests
    channels = vae.bn.running_mean.shape[0]
    vae.bn.running_mean.copy_(torch.randn(channels) * 0.1)
    vae.bn.running_var.copy_(torch.rand(channels) + 0.5)
    return vae


def _pipeline(variant: str) -> Any:
    """The pipeline `build_tiny_flux2` saves (torch's generator already seeded)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline

    # FLUX.2's scheduler_config.json (dev and Klein)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
    )
    if variant == "dev":
        tokenizer = mistral_tokenizer()
        return Flux2Pipeline(scheduler=scheduler, vae=_vae(), text_encoder=_mistral(tokenizer), tokenizer=tokenizer,
                             transformer=tiny_transformer(guidance=True))
    from aitk.models.zimage.tiny import build_tokenizer  # Qwen3's chat template, byte-level, offline

    tokenizer = build_tokenizer()
    return Flux2KleinPipeline(scheduler=scheduler, vae=_vae(), text_encoder=_qwen3(tokenizer), tokenizer=tokenizer,
                              transformer=tiny_transformer(guidance=False), is_distilled=False)
