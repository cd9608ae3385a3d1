"""Tiny random-init HiDream-I1 pipelines of the real classes, saved as diffusers folders.

HiDreamImageTransformer2DModel (double-stream then single-stream blocks, each image feed-forward
a mixture of experts: a shared expert, four routed ones, two active per token), FLUX.1's
16-channel AutoencoderKL with its scaling and shift (HiDream uses FLUX's VAE) and the 8x
downscale, two CLIP text encoders with projection (their pooled outputs joined), T5 and a
LlamaForCausalLM whose per-layer hidden states condition the blocks, each through its own
caption projection; tokenizers built offline; UniPCMultistepScheduler on flow sigmas with shift 3,
as HiDream-I1-Full ships. HiDreamImagePipeline loads the folder as it loads the real model with
its Llama passed in (here the Llama is saved in the folder as text_encoder_4/, tokenizer_4/).

`max_resolution` (8, 8) latents: the pipeline renders at that area (64 px here, 1024 px on the
real model), and non-square buckets pad to its 16 tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aitk.models import tiny_common

TINY_HIDREAM_VERSION = "1"  # bump when the shapes below change, so cached folders are rebuilt
VARIANTS = ("full",)
#: T5 and Llama tokens per prompt the tiny tokenizers allow (the pipeline's default: 128)
TINY_TEXT_MAX_LENGTH = 32
#: HiDream's CLIPs take up to 218 tokens (the pipeline's cap); their position tables are longer
CLIP_POSITIONS = 248
CLIP_L_WIDTH, CLIP_G_WIDTH = 32, 48  # different widths, as the real 768 / 1280: a mix-up shows
T5_WIDTH, LLAMA_WIDTH = 40, 24  # caption_channels [T5, Llama], as the real [4096, 4096]
LLAMA_LAYERS = 2
#: the Llama hidden state each block reads (block order: double, then single); the real model
#: reads layers 0-31, then layer 31 again for the other 16 single blocks
BLOCK_LLAMA_LAYERS = [0, 1, 1]
LLAMA_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>")


def build_tiny_hidream(folder: str | Path, variant: str = "full", seed: int = 0) -> Path:
    """Write a tiny HiDream-I1 pipeline to `folder` (rebuilt only when its marker names another
    version or variant)."""
    tiny_common.check_variant(variant, VARIANTS)
    marker = {"version": TINY_HIDREAM_VERSION, "variant": variant, "arch": "hidream"}
    return tiny_common.build_once(folder, seed, marker, _hidream_pipeline, match=("version", "variant"))


def llama_tokenizer() -> Any:
    """Llama 3's tokenizer layout over a byte-level vocabulary (each byte one token, no merges):
    <|begin_of_text|> first on every prompt, <|end_of_text|> the pipeline's padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(sorted(ByteLevel.alphabet()) + list(LLAMA_SPECIAL_TOKENS))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    bos = LLAMA_SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=LLAMA_SPECIAL_TOKENS[1], model_max_length=TINY_TEXT_MAX_LENGTH
    )


def _t5_vocab() -> list[tuple[str, float]]:
    """A character-level Unigram vocabulary in T5's layout (<pad>=0, </s>=1, <unk>=2)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -2.5) for c in tiny_common.PRINTABLE]
    return vocab + [(c, -3.0) for c in tiny_common.PRINTABLE]


def tiny_transformer() -> Any:
    """The tiny HiDreamImageTransformer2DModel (random init from torch's current generator state)."""
    from diffusers import HiDreamImageTransformer2DModel

    return HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        caption_channels=[T5_WIDTH, LLAMA_WIDTH],
        text_emb_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,  # both pooled projections, joined
        num_routed_experts=4,
        num_activated_experts=2,
        axes_dims_rope=(8, 4, 4),  # sums to the head dim
        max_resolution=(8, 8),
        llama_layers=BLOCK_LLAMA_LAYERS,
    )


def _clip(width: int, act: str) -> Any:
    from transformers import CLIPTextModelWithProjection

    config = tiny_common.clip_text_config(width, 2, act)
    config.max_position_embeddings = CLIP_POSITIONS
    return CLIPTextModelWithProjection(config)


def _hidream_pipeline() -> Any:
    """The HiDreamImagePipeline `build_tiny_hidream` saves (torch's generator already seeded)."""
    from diffusers import HiDreamImagePipeline, UniPCMultistepScheduler
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5EncoderModel

    transformer = tiny_transformer()
    vae = tiny_common.tiny_autoencoder_kl(
        latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
    )
    t5_vocab = _t5_vocab()
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(t5_vocab), d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, pad_token_id=0, eos_token_id=1,
    ))
    tokenizer_4 = llama_tokenizer()
    text_encoder_4 = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer_4), hidden_size=LLAMA_WIDTH, intermediate_size=48, num_hidden_layers=LLAMA_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=6, max_position_embeddings=64,
        bos_token_id=tokenizer_4.bos_token_id, eos_token_id=tokenizer_4.eos_token_id, tie_word_embeddings=True,
    ))
    # HiDream-I1-Full's scheduler: UniPC on flow-matching sigmas, shift 3
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    return HiDreamImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=_clip(CLIP_L_WIDTH, "quick_gelu"),
        tokenizer=tiny_common.clip_tokenizer(),
        text_encoder_2=_clip(CLIP_G_WIDTH, "gelu"),
        tokenizer_2=tiny_common.clip_tokenizer(pad_token="!"),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tiny_common.t5_tokenizer(t5_vocab, TINY_TEXT_MAX_LENGTH),
        text_encoder_4=text_encoder_4,
        tokenizer_4=tokenizer_4,
        transformer=transformer,
    )
