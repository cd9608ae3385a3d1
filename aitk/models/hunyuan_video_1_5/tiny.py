"""Tiny random-init HunyuanVideo 1.5 pipelines (T2V / I2V) of the real classes, saved as diffusers
folders for the tests and the demo; nothing is downloaded.

HunyuanVideo15Transformer3DModel (patch 1, inputs = noisy latents + condition latents + a mask
channel), AutoencoderKLHunyuanVideo15 (16x spatial / 4x temporal compression, as the real one),
a Qwen2_5_VLTextModel prompt encoder with an offline byte-level Qwen2Tokenizer, a ByT5 glyph
encoder (T5EncoderModel + ByT5Tokenizer, which needs no vocabulary file), a SigLIP vision tower
for I2V, ClassifierFreeGuidance and the flow-match Euler scheduler. HunyuanVideo15Pipeline /
HunyuanVideo15ImageToVideoPipeline load the folder as they load the real model.

Two facts of the real parts the tiny ones keep:
- the pipeline drops the first 108 tokens of the chat-templated prompt (system message and turn
  headers, `prompt_template_encode_start_idx`); the tiny tokenizer holds most of the system
  message as one added token and spells the rest byte by byte, so that prefix is 108 tokens here
  too and the embeddings start at the prompt, as with the real tokenizer;
- the byT5 projection's hidden width is fixed at 2048 by diffusers (a 2048 x 2048 layer, 16 MB in
  float32), so the transformer is stored in bfloat16 to keep the folder under 10 MB; it is read
  back in the training dtype (torch_dtype) like any checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from aitk.models import tiny_common

TINY_HUNYUAN_VIDEO_15_VERSION = "1"  # bump when the shapes below change, so cached folders are rebuilt
VARIANTS = ("t2v", "i2v")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: the pipeline's prompt-template prefix in tokens (HunyuanVideo15Pipeline.prompt_template_encode_start_idx)
TEMPLATE_PREFIX_TOKENS = 108
TEXT_WIDTH = 32  # Qwen2.5-VL hidden size = the transformer's text_embed_dim (3584 in the real model)
GLYPH_WIDTH = 16  # byT5 d_model = text_embed_2_dim (1472)
VISION_WIDTH = 16  # SigLIP hidden size = image_embed_dim (1152)
VISION_IMAGE_SIZE = 32
LATENT_CHANNELS = 8  # 32 in the real VAE; the transformer takes 2 x 8 + 1 input channels
#: the flow shift of the 480p models' scheduler config
FLOW_SHIFT = 5.0
#: pixels per side the tiny I2V pipeline sizes its videos to (target_size; 640 / 960 in the real ones)
TARGET_SIZE = 64
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tiny_hunyuan_video_15(folder: str | Path, variant: str = "t2v", seed: int = 0) -> Path:
    """Write a tiny HunyuanVideo 1.5 pipeline to `folder`: "t2v" (HunyuanVideo15Pipeline) or "i2v"
    (HunyuanVideo15ImageToVideoPipeline with its SigLIP image encoder). Rebuilt only when the
    folder's marker names another version or variant."""
    tiny_common.check_variant(variant, VARIANTS)
    marker = {"version": TINY_HUNYUAN_VIDEO_15_VERSION, "variant": variant, "arch": "hunyuan_video_1_5"}
    return tiny_common.build_once(folder, seed, marker, lambda: _pipeline(variant), match=("version", "variant"))


def qwen_tokenizer(system_message: str) -> Any:
    """Qwen2.5-VL's tokenizer class over single bytes, its chat specials, and `system_message` but
    its last characters as one added token: the template's prefix is then exactly
    TEMPLATE_PREFIX_TOKENS tokens."""
    from tokenizers import AddedToken
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    tokens = sorted(ByteLevel.alphabet()) + list(SPECIAL_TOKENS)
    # <|im_start|> system \n [chunk] tail... <|im_end|> \n <|im_start|> user \n: 17 tokens besides the tail
    fixed = 1 + len("system\n") + 1 + 1 + 1 + 1 + len("user\n")
    tail = TEMPLATE_PREFIX_TOKENS - fixed
    tokenizer = Qwen2Tokenizer(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=[],
        model_max_length=32768,
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(system_message[:-tail], special=False, normalized=False)])
    return tokenizer


def _text_encoder(tokenizer: Any) -> Any:
    """Qwen2.5-VL's text model: 3 layers (the pipeline reads the third-to-last hidden states)."""
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        # multimodal RoPE: the sections add up to half a head (16 / 2), as 16 + 24 + 24 = 128 / 2
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
        bos_token_id=pad,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=pad,
    )
    return Qwen2_5_VLTextModel(config).eval()


def _glyph_encoder() -> tuple[Any, Any]:
    """(ByT5Tokenizer, a one-layer T5EncoderModel over its vocabulary)."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tokenizer = ByT5Tokenizer()
    encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=GLYPH_WIDTH, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
    ))
    return tokenizer, encoder.eval()


def _image_encoder() -> tuple[Any, Any]:
    """(SigLIP vision tower, its image processor): 16 image tokens of VISION_WIDTH."""
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip import SiglipImageProcessorPil

    model = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=VISION_WIDTH, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=VISION_IMAGE_SIZE, patch_size=8,
    ))
    processor = SiglipImageProcessorPil(size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE})
    return model.eval(), processor


def tiny_transformer(variant: str) -> Any:
    """The tiny HunyuanVideo15Transformer3DModel (random init from torch's current generator)."""
    from diffusers import HunyuanVideo15Transformer3DModel

    return HunyuanVideo15Transformer3DModel(
        in_channels=2 * LATENT_CHANNELS + 1,  # noisy latents, condition latents, condition mask
        out_channels=LATENT_CHANNELS,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        text_embed_dim=TEXT_WIDTH,
        text_embed_2_dim=GLYPH_WIDTH,
        image_embed_dim=VISION_WIDTH,
        rope_axes_dim=(4, 6, 6),  # sums to the head dim, as (16, 56, 56) sums to 128
        target_size=TARGET_SIZE,
        task_type=variant,
    )


def tiny_vae() -> Any:
    """AutoencoderKLHunyuanVideo15 with the real compression (4 spatial downsamples, 2 of them
    temporal too) and few channels."""
    from diffusers import AutoencoderKLHunyuanVideo15

    return AutoencoderKLHunyuanVideo15(
        block_out_channels=(8, 8, 8, 16, 16), layers_per_block=1, latent_channels=LATENT_CHANNELS,
    )


def _pipeline(variant: str) -> Any:
    """The pipeline `build_tiny_hunyuan_video_15` saves (torch's generator already seeded)."""
    from diffusers import (
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15ImageToVideoPipeline,
        HunyuanVideo15Pipeline,
    )

    transformer = tiny_transformer(variant).to(torch.bfloat16)  # stored small (module docstring)
    vae = tiny_vae()
    glyph_tokenizer, glyph_encoder = _glyph_encoder()
    parts: dict[str, Any] = dict(
        transformer=transformer, vae=vae, text_encoder_2=glyph_encoder, tokenizer_2=glyph_tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT),
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )
    pipe_cls = HunyuanVideo15Pipeline
    if variant == "i2v":
        parts["image_encoder"], parts["feature_extractor"] = _image_encoder()
        pipe_cls = HunyuanVideo15ImageToVideoPipeline
    # the system message comes from the pipeline itself: build once without the text encoder
    probe = pipe_cls(text_encoder=None, tokenizer=None, **parts)
    tokenizer = qwen_tokenizer(probe.system_message)
    pipe = pipe_cls(text_encoder=_text_encoder(tokenizer), tokenizer=tokenizer, **parts)
    prefix = _prefix_tokens(tokenizer, pipe.system_message)
    if prefix != pipe.prompt_template_encode_start_idx:  # diffusers changed its template
        raise RuntimeError(
            f"the tiny tokenizer spells the pipeline's prompt-template prefix in {prefix} tokens, the pipeline "
            f"drops {pipe.prompt_template_encode_start_idx}: update TEMPLATE_PREFIX_TOKENS"
        )
    return pipe


def _prefix_tokens(tokenizer: Any, system_message: str) -> int:
    """Tokens before the user's prompt in the chat-templated text (the prompt: one "Z")."""
    ids = list(tokenizer.apply_chat_template(
        [{"role": "system", "content": system_message}, {"role": "user", "content": "Z"}],
        add_generation_prompt=True, tokenize=True, return_dict=True,
    )["input_ids"])
    z = tokenizer.convert_tokens_to_ids("Z")
    return len(ids) - 1 - ids[::-1].index(z)
