"""Tiny random-init WAN pipelines (2.1 / 2.2, T2V / I2V) of the real diffusers classes.

Used by the tests: the adapter's real loading code runs on them and diffusers' own WanPipeline /
WanImageToVideoPipeline load them, so nothing is downloaded. Shapes follow the real models
(16-channel VAE with 8x spatial and 4x temporal compression, 36 input channels for I2V, a CLIP
vision tower whose penultimate hidden states feed 2.1 I2V's image attention), only much smaller.
The 2.2 TI2V 5B variant ("22_5b") has the 5B's structure: the residual 48-channel VAE that
patchifies 2x2 before three downsamplings (16x spatial, 4x temporal), a 48-in / 48-out
transformer and a WanPipeline with expand_timesteps (per-token timesteps).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from aitk.models import tiny_common

TINY_WAN_VERSION = "1"  # bump when the shapes below change, so cached folders are rebuilt
VARIANTS = ("t2v", "i2v", "22_t2v", "22_i2v", "22_5b")
#: boundary_ratio of the 2.2 pipelines (diffusers' Wan2.2 A14B configs)
BOUNDARY_RATIOS = {"22_t2v": 0.875, "22_i2v": 0.9}

TEXT_DIM = 32  # umT5 d_model = the transformer's text_dim
CLIP_DIM = 32  # CLIP vision hidden size = the transformer's image_dim (2.1 I2V)
CLIP_IMAGE_SIZE = 32
TEXT_LENGTH = 512  # WAN's text length; the tokenizer pads to it


def _corpus() -> list[str]:
    """A few caption-like lines: enough for the trainer to learn frequent pieces."""
    words = (
        "a the of on in with and red green blue yellow white black grey circle square triangle "
        "shape style photo video frame camera moving slowly background shp person cat dog"
    ).split()
    return [" ".join(words[i:] + words[:i]) for i in range(len(words))]


def build_tokenizer() -> object:
    """umT5's tokenizer class (T5Tokenizer, a SentencePiece-style Unigram) over a vocabulary
    trained here in milliseconds with the `tokenizers` library: no download, no sentencepiece."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    specials = ["<pad>", "</s>", "<unk>"]  # T5's ids 0, 1, 2
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=160,
        special_tokens=specials,
        unk_token="<unk>",
        # every printable character is kept, so unusual prompts still tokenize without <unk>
        initial_alphabet=list(tiny_common.PRINTABLE),
        shrinking_factor=0.75,
    )
    tok.train_from_iterator(_corpus(), trainer)
    vocab = [(piece, float(score)) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]
    return tiny_common.t5_tokenizer(vocab, TEXT_LENGTH)


def _transformer(in_channels: int, image_dim: int | None, seed: int, out_channels: int = 16) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    heads, head_dim = 2, 12  # head_dim splits into the t / h / w rotary parts (4 each)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=image_dim,
        # the image key/value projections read the image embedding after its projection to
        # the model width, as in the real 2.1 I2V model (added_kv_proj_dim = inner dim)
        added_kv_proj_dim=heads * head_dim if image_dim is not None else None,
        rope_max_seq_len=32,
    )


def build_tiny_wan(folder: str | Path, variant: str = "t2v", seed: int = 0) -> Path:
    """Write a tiny WAN pipeline folder; returns `folder`. Idempotent (version marker).

    variant: "t2v" / "i2v" (WAN 2.1: one transformer; I2V adds a CLIP vision encoder and
    processor), "22_t2v" / "22_i2v" (WAN 2.2 14B: `transformer` = high-noise expert,
    `transformer_2` = low-noise expert, `boundary_ratio` in model_index.json; no image encoder),
    "22_5b" (WAN 2.2 TI2V 5B: 48-channel VAE and transformer, expand_timesteps).
    """
    tiny_common.check_variant(variant, VARIANTS)
    marker = {"version": TINY_WAN_VERSION, "variant": variant, "seed": seed}
    return tiny_common.build_once(
        folder, seed, marker, lambda: _wan_pipeline(variant, seed), match=("version", "variant", "seed")
    )


def _wan_pipeline(variant: str, seed: int) -> Any:
    """The WanPipeline (WanImageToVideoPipeline for I2V) `build_tiny_wan` saves; torch's generator
    is already seeded with `seed`, the transformers and the image encoder reseed from it."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    if variant == "22_5b":
        return _ti2v_pipeline(seed)
    i2v = variant in ("i2v", "22_i2v")
    two_experts = variant in ("22_t2v", "22_i2v")
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    tokenizer = build_tokenizer()
    text_encoder = _text_encoder(len(tokenizer))
    # WAN's own scheduler: UniPC over flow-matching sigmas with the 480p shift
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    )
    in_channels = 36 if i2v else 16  # I2V: 16 noisy + 4 mask + 16 condition latent channels
    image_dim = CLIP_DIM if variant == "i2v" else None
    transformer = _transformer(in_channels, image_dim, seed + 1)
    parts: dict[str, object] = dict(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )
    if two_experts:
        parts["transformer_2"] = _transformer(in_channels, image_dim, seed + 2)
        parts["boundary_ratio"] = BOUNDARY_RATIOS[variant]
    if variant == "i2v":
        torch.manual_seed(seed + 3)
        parts["image_encoder"] = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=CLIP_DIM,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=CLIP_IMAGE_SIZE,
                patch_size=8,
                projection_dim=CLIP_DIM,
            )
        )
        parts["image_processor"] = CLIPImageProcessor(
            size={"shortest_edge": CLIP_IMAGE_SIZE},
            crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
        )
    pipe_cls = WanImageToVideoPipeline if i2v else WanPipeline
    return pipe_cls(**parts)


def _text_encoder(vocab_size: int) -> torch.nn.Module:
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(
        UMT5Config(
            vocab_size=vocab_size,
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            dropout_rate=0.0,
        )
    )


def _ti2v_pipeline(seed: int) -> Any:
    """WAN 2.2 TI2V 5B's WanPipeline: the residual 48-channel VAE (2x2 patchify, then 8x: 16x
    spatial), one 48-channel transformer, expand_timesteps, UniPC with the 5B's flow shift 5."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    from aitk.models.wan.ti2v import TI2V_FLOW_SHIFT, TI2V_LATENTS_MEAN, TI2V_LATENTS_STD

    vae = AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=48,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        in_channels=12,  # 3 colours x 2x2 patch
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        latents_mean=list(TI2V_LATENTS_MEAN),
        latents_std=list(TI2V_LATENTS_STD),
    )
    tokenizer = build_tokenizer()
    text_encoder = _text_encoder(len(tokenizer))
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=TI2V_FLOW_SHIFT, num_train_timesteps=1000
    )
    transformer = _transformer(48, None, seed + 1, out_channels=48)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer,
        expand_timesteps=True,
    )
