"""Tiny random-init ERNIE-Image pipelines of the real classes, saved as diffusers folders.

ErnieImageTransformer2DModel (one stream of image then text tokens, shared AdaLN, 3-axis RoPE, a
text projection since the text width differs from the model width), AutoencoderKLFlux2 (8x
downscale; 2x2 patches normalised by its batch-norm statistics, made non-trivial here), a
Mistral3Model text encoder (Ministral 3's text model with its Pixtral vision tower, as the real
folder holds) whose second-to-last hidden states condition the transformer, a byte-level fast
tokenizer that starts every prompt with `<s>` (built offline), and the model's scheduler
(FlowMatchEulerDiscreteScheduler, a fixed shift of 4). ErnieImagePipeline loads the folder as it
loads baidu/ERNIE-Image (without the optional prompt enhancer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aitk.models import tiny_common

TINY_ERNIE_IMAGE_VERSION = "1"  # bump when the shapes below change, so cached folders are rebuilt
VARIANTS = ("base",)
#: text tokens per prompt the tiny tokenizer allows
TINY_TEXT_MAX_LENGTH = 64
TEXT_DIM = 16  # Mistral hidden size = the transformer's text_in_dim (3072 in the real model)
LATENT_CHANNELS = 8  # the real VAE has 32; the transformer sees 2x2 patches of them
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
#: baidu/ERNIE-Image's scheduler/scheduler_config.json (the values that matter)
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "shift": 4.0, "use_dynamic_shifting": False, "base_shift": 0.5,
    "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096, "time_shift_type": "exponential",
}


def build_tokenizer() -> Any:
    """A byte-level fast tokenizer (each byte one token, no merges) that adds Mistral's `<s>` in
    front of every prompt, as the real tokenizer does with add_special_tokens=True."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*chars, BOS, EOS, PAD])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=TINY_TEXT_MAX_LENGTH,
    )


def build_tiny_ernie_image(folder: str | Path, variant: str = "base", seed: int = 0) -> Path:
    """Write a tiny ERNIE-Image pipeline to `folder` (rebuilt only when its marker names another
    version or variant)."""
    tiny_common.check_variant(variant, VARIANTS)
    marker = {"version": TINY_ERNIE_IMAGE_VERSION, "variant": variant, "arch": "ernie_image"}
    return tiny_common.build_once(folder, seed, marker, _pipeline, match=("version", "variant"))


def tiny_transformer() -> Any:
    """The tiny ErnieImageTransformer2DModel (random init from torch's current generator state)."""
    import torch
    from diffusers import ErnieImageTransformer2DModel

    model = ErnieImageTransformer2DModel(
        hidden_size=32,
        num_attention_heads=2,
        num_layers=2,
        ffn_hidden_size=64,
        in_channels=4 * LATENT_CHANNELS,
        out_channels=4 * LATENT_CHANNELS,
        patch_size=1,  # the latents are 2x2 patches already
        text_in_dim=TEXT_DIM,
        rope_axes_dim=(4, 6, 6),  # sums to the head dim (32 / 2), as 32 + 48 + 48 = 128
    )
    # the class starts its AdaLN modulation and output layer at zero (a trained model's are not):
    # the blocks would then neither change the output nor get a gradient
    with torch.no_grad():
        for layer in (model.adaLN_modulation[-1], model.final_linear):
            layer.weight.normal_(std=0.2)
            layer.bias.normal_(std=0.2)
    return model


def _text_encoder(tokenizer: Any) -> Any:
    from transformers import Mistral3Config, Mistral3Model

    config = Mistral3Config(
        text_config={
            "model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": TEXT_DIM,
            "intermediate_size": 2 * TEXT_DIM, "num_hidden_layers": 2,  # the pipeline reads the second-to-last
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 256,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
        },
        vision_config={
            "model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "head_dim": 8, "image_size": 28, "patch_size": 14,
        },
        image_token_index=tokenizer.pad_token_id,  # no image slots in text-only prompts
        spatial_merge_size=1,
    )
    return Mistral3Model(config).eval()


def _vae() -> Any:
    import torch
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        block_out_channels=(16, 16, 16, 16), layers_per_block=1, latent_channels=LATENT_CHANNELS,
        norm_num_groups=8, sample_size=64,
    )
    # a trained VAE's statistics are not 0 / 1: make the normalisation visible to the tests
    channels = vae.bn.running_mean.shape[0]
    vae.bn.running_mean.copy_(torch.randn(channels) * 0.1)
    vae.bn.running_var.copy_(torch.rand(channels) * 0.02 + 0.015)  # about the latents' own; a wrong eps shows
    return vae


def _pipeline() -> Any:
    """The ErnieImagePipeline `build_tiny_ernie_image` saves (torch's generator already seeded)."""
    from diffusers import ErnieImagePipeline, FlowMatchEulerDiscreteScheduler

    tokenizer = build_tokenizer()
    return ErnieImagePipeline(
        transformer=tiny_transformer(), vae=_vae(), text_encoder=_text_encoder(tokenizer), tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
    )
