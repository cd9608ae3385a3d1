"""Tiny random-init captioning models of both families, built offline and saved like the real ones
(tests): the real classes with toy sizes, so AutoProcessor / AutoModelForImageTextToText load them
as they load a hub model. Their captions are random text; what they test is everything around it.

- Florence-2: Florence2ForConditionalGeneration (a 4-stage DaViT vision tower of one block per
  stage, a one-layer BART), a byte-level BartTokenizer with Florence-2's `<image>` token, a CLIP
  image processor at 64 x 64 (5 image tokens: the 2 x 2 grid and the pooled one), Florence2Processor.
- Qwen2.5-VL: the tiny Qwen2_5_VLForConditionalGeneration and byte-level Qwen2Tokenizer of the
  Qwen-Image text encoder (aitk.models.qwen_image.tiny), Qwen2-VL's PIL image processor with the
  real pixel range, and a chat template that writes Qwen's turns and vision tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aitk.models import tiny_common

TINY_CAPTION_VERSION = "1"  # bump when the shapes below change, so cached folders are rebuilt
FLORENCE_SIZE = 64  # pixels: the vision tower downsamples by 32, so 2 x 2 patches + 1 pooled token
FLORENCE_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
#: Qwen's chat turns with the image placeholders its processor expands (the real template's format)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_florence2(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny Florence-2 model folder (rebuilt only when its version marker changes)."""
    marker = {"version": TINY_CAPTION_VERSION, "family": "florence2"}
    return tiny_common.build_once(folder, seed, marker, _florence2, match=("version", "family"))


def build_tiny_qwen25_vl(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny Qwen2.5-VL model folder (rebuilt only when its version marker changes)."""
    marker = {"version": TINY_CAPTION_VERSION, "family": "qwen2_5_vl"}
    return tiny_common.build_once(folder, seed, marker, _qwen25_vl, match=("version", "family"))


def florence_tokenizer() -> Any:
    """A BartTokenizer over every byte, BART's special tokens and Florence-2's image token."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import BartTokenizer

    vocab = {token: i for i, token in enumerate([*FLORENCE_SPECIALS, *sorted(ByteLevel.alphabet())])}
    vocab["<mask>"] = len(vocab)
    return BartTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})


class _Saved:
    """What build_once saves: the model, and its processor (or tokenizer and image processor) beside it."""

    def __init__(self, *parts: Any) -> None:
        self.parts = parts

    def save_pretrained(self, folder: str | Path, **_: Any) -> None:
        for part in self.parts:
            part.save_pretrained(folder)


def _florence2() -> Any:
    from transformers import Florence2Config, Florence2ForConditionalGeneration, Florence2Processor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = florence_tokenizer()
    side = {"height": FLORENCE_SIZE, "width": FLORENCE_SIZE}
    tokens = (FLORENCE_SIZE // 32) ** 2 + 1
    image_processor = CLIPImageProcessorPil(size=side, crop_size=side, do_center_crop=False, image_seq_length=tokens)
    config = Florence2Config(
        text_config={
            "model_type": "bart", "vocab_size": len(tokenizer), "d_model": 32, "encoder_layers": 1,
            "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 32,
            "decoder_ffn_dim": 32, "max_position_embeddings": 256, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "decoder_start_token_id": tokenizer.eos_token_id, "forced_bos_token_id": tokenizer.bos_token_id,
            "tie_word_embeddings": False,
        },
        vision_config={"depths": [1, 1, 1, 1], "embed_dim": [8, 8, 16, 16], "num_heads": [1, 1, 2, 2],
                       "num_groups": [1, 1, 2, 2], "window_size": 2, "projection_dim": 32,
                       "max_position_embeddings": 8, "max_temporal_embeddings": 4},
        image_token_id=tokenizer.image_token_id,
        # untied: a random model whose output matrix is its input one repeats its last token (the end token)
        tie_word_embeddings=False,
    )
    model = Florence2ForConditionalGeneration(config).eval()
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                   post_processor_config={"pure_text": {}})
    return _Saved(model, processor)


def _qwen25_vl() -> Any:
    from aitk.models.qwen_image.tiny import byte_tokenizer, text_encoder
    from aitk.models.qwen_image_edit.tiny import tiny_image_processor

    tokenizer = byte_tokenizer(())
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return _Saved(text_encoder(tokenizer), tokenizer, tiny_image_processor())
