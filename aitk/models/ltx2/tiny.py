"""Tiny random-init LTX-2 pipelines of the real diffusers / transformers classes.

LTX2Pipeline's parts at toy width: LTX2VideoTransformer3DModel (video and audio branches, their
cross-modal attention), AutoencoderKLLTX2Video with the real model's block layout (4x4 patches and
three 2x down-samplings in space, three in time: 32 px and 8k+1 frames, as LTX-2), the audio VAE
(AutoencoderKLLTX2Audio) and vocoder, LTX2TextConnectors (learnable registers, so prompts must be
padded to a multiple of them as in the real model), a Gemma-3 text encoder
(Gemma3ForConditionalGeneration, the class the real folder holds, with a tiny SigLIP tower) and a
GemmaTokenizer trained here in milliseconds; the real scheduler config (dynamic time shift).
LTX2Pipeline loads the folder as it loads Lightricks/LTX-2; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from aitk.models import tiny_common

TINY_LTX2_VERSION = "1"  # bump when the shapes below change, so cached folders are rebuilt
VARIANTS = ("base",)
GEMMA_DIM = 16  # the tiny Gemma's hidden size = the connectors' caption_channels
GEMMA_LAYERS = 2  # hidden states of the embeddings + 2 layers: the connectors read 3 x 16 per token
LATENT_CHANNELS = 8
#: tokens per prompt the tiny tokenizer allows (the real model pads to 1024); a multiple of REGISTERS
TOKENIZER_MAX_LENGTH = 128
REGISTERS = 16  # the connectors' learnable registers (128 in the real model)
#: LTX-2's scheduler (FlowMatchEulerDiscreteScheduler with its resolution-dependent shift)
SCHEDULER_CONFIG = {
    "base_image_seq_len": 1024,
    "base_shift": 0.95,
    "max_image_seq_len": 4096,
    "max_shift": 2.05,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.1,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}


def build_tiny_ltx2(folder: str | Path, variant: str = "base", seed: int = 0) -> Path:
    """Write a tiny LTX-2 pipeline to `folder` (rebuilt only when its marker names another version)."""
    tiny_common.check_variant(variant, VARIANTS)
    marker = {"version": TINY_LTX2_VERSION, "variant": variant, "seed": seed}
    return tiny_common.build_once(folder, seed, marker, _ltx2_pipeline, match=("version", "variant", "seed"))


def _video_vae() -> Any:
    from diffusers import AutoencoderKLLTX2Video

    vae = AutoencoderKLLTX2Video(
        latent_channels=LATENT_CHANNELS,
        block_out_channels=(8, 8, 16, 32),
        decoder_block_out_channels=(8, 16, 32),  # doubling per level, as the real decoder
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, True),
        decoder_spatio_temporal_scaling=(True, True, True),
        decoder_inject_noise=(False, False, False, False),
        downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
        upsample_type=("spatiotemporal", "spatiotemporal", "spatiotemporal"),
        upsample_residual=(True, True, True),
        upsample_factor=(2, 2, 2),
        patch_size=4,
        patch_size_t=1,
        spatial_compression_ratio=32,  # the real config states both, as here
        temporal_compression_ratio=8,
    )
    # per-channel statistics away from (0, 1), so the latent normalisation is exercised
    vae.latents_mean.copy_(torch.linspace(-0.2, 0.2, LATENT_CHANNELS))
    vae.latents_std.copy_(torch.linspace(0.5, 1.5, LATENT_CHANNELS))
    return vae


def _audio_parts() -> tuple[Any, Any]:
    from diffusers import AutoencoderKLLTX2Audio
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=8, ch_mult=(1, 2, 4), num_res_blocks=1, latent_channels=2, mel_bins=16, resolution=32
    )
    vocoder = LTX2Vocoder(
        in_channels=2 * 16,  # stereo x mel bins
        hidden_channels=8,
        out_channels=2,
        upsample_kernel_sizes=[4, 4],
        upsample_factors=[2, 2],
        resnet_kernel_sizes=[3],
        resnet_dilations=[[1]],
        output_sampling_rate=16000,
    )
    return audio_vae, vocoder


def _text_parts() -> tuple[Any, Any]:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from aitk.models.lumina2.tiny import build_tokenizer

    tokenizer = build_tokenizer()  # Gemma's tokenizer class over a tiny BPE vocabulary
    tokenizer.model_max_length = TOKENIZER_MAX_LENGTH
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=GEMMA_DIM, intermediate_size=32, num_hidden_layers=GEMMA_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=TOKENIZER_MAX_LENGTH,
        sliding_window=64, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision_config = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
        patch_size=14,
    )
    config = Gemma3Config(text_config=text_config, vision_config=vision_config, mm_tokens_per_image=4)
    return tokenizer, Gemma3ForConditionalGeneration(config)


def _ltx2_pipeline() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, LTX2Pipeline, LTX2VideoTransformer3DModel
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    vae = _video_vae()
    audio_vae, vocoder = _audio_parts()
    tokenizer, text_encoder = _text_parts()
    connectors = LTX2TextConnectors(
        caption_channels=GEMMA_DIM,
        text_proj_in_factor=GEMMA_LAYERS + 1,
        video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=8,
        video_connector_num_layers=1,
        video_connector_num_learnable_registers=REGISTERS,
        audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=8,
        audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=REGISTERS,
        rope_theta=10000.0,
    )
    transformer = LTX2VideoTransformer3DModel(
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_attention_heads=2,
        attention_head_dim=12,
        cross_attention_dim=24,
        audio_in_channels=2 * 4,  # audio latent channels x latent mel bins (16 / 4)
        audio_out_channels=2 * 4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=8,
        audio_cross_attention_dim=16,
        num_layers=2,
        caption_channels=GEMMA_DIM,
        audio_sampling_rate=16000,
        audio_hop_length=160,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    return LTX2Pipeline(
        scheduler=scheduler, vae=vae, audio_vae=audio_vae, text_encoder=text_encoder, tokenizer=tokenizer,
        connectors=connectors, transformer=transformer, vocoder=vocoder,
    )
