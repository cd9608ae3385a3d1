"""Tiny random-init Qwen-Image-Edit / Qwen-Image-Edit-2509 folders (tests and the demo).

The real classes with toy sizes, in the real layout: transformer/, vae/, text_encoder/ (a
Qwen2_5_VLForConditionalGeneration with a one-block vision tower: the edit models see the control
images through it), tokenizer/, processor/ (the Qwen2-VL image processor's preprocessor_config.json
with the real model's min / max pixels) and scheduler/. Qwen-Image-Edit and 2509 share the
architecture; the variants differ in the pipeline class model_index.json names.

The tokenizer's merges spell each word of the edit template's system prompt as one token, so the
template's prefix is 64 tokens as with the real tokenizer and the pipelines'
`prompt_template_encode_start_idx` (64) drops exactly the template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aitk.models import tiny_common
from aitk.models.qwen_image.tiny import SPECIAL_TOKENS, TEXT_WIDTH

TINY_QWEN_EDIT_VERSION = "1"  # bump when the shapes below change, so cached folders are rebuilt
VARIANTS = ("edit", "edit_plus")
#: Qwen-Image-Edit's processor/preprocessor_config.json pixel range (the image processor's size)
MIN_PIXELS, MAX_PIXELS = 3136, 12845056
USER_TURN = "<|im_start|>user\n"


def build_tiny_qwen_image_edit(folder: str | Path, variant: str = "edit", seed: int = 0) -> Path:
    """Write a tiny Qwen-Image-Edit ("edit") or Qwen-Image-Edit-2509 ("edit_plus") folder.
    Rebuilt only when the folder's marker names another version or variant."""
    tiny_common.check_variant(variant, VARIANTS)
    marker = {"version": TINY_QWEN_EDIT_VERSION, "variant": variant, "arch": f"qwen_image_{variant}"}
    folder = tiny_common.build_once(folder, seed, marker, lambda: _pipeline(variant), match=("version", "variant"))
    processor = Path(folder) / "processor"
    if not (processor / "preprocessor_config.json").is_file():
        tiny_image_processor().save_pretrained(processor)
    return Path(folder)


def tiny_image_processor() -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def edit_tokenizer(template_prefix: str) -> Any:
    """A byte-level Qwen2Tokenizer with one token per pre-token of `template_prefix` (its text
    between special tokens), and the specials."""
    import re

    from transformers import Qwen2Tokenizer

    splitter = Qwen2Tokenizer(vocab={}, merges=[]).backend_tokenizer.pre_tokenizer
    segments = re.split("|".join(re.escape(t) for t in SPECIAL_TOKENS), template_prefix)
    words = list(dict.fromkeys(w for segment in segments for w, _ in splitter.pre_tokenize_str(segment) if len(w) > 1))
    # BPE applies the lowest-ranked pair first, so a word whose pieces another word's merges cut
    # apart goes to the front (its merges then rank first) until every word is one token
    for _ in range(len(words)):
        tokenizer = _byte_tokenizer(words)
        broken = [w for w in words if len(tokenizer.backend_tokenizer.model.tokenize(w)) != 1]
        if not broken:
            return tokenizer
        words = broken + [w for w in words if w not in broken]
    raise RuntimeError(f"the tiny tokenizer cannot spell {broken} as one token each")


def _byte_tokenizer(words: list[str]) -> Any:
    """Every byte, merges that spell each of `words` left to right, and the special tokens."""
    from tokenizers import AddedToken
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []
    for word in words:
        for end in range(2, len(word) + 1):
            if word[:end] not in vocab:
                vocab[word[:end]] = len(vocab)
                merges.append((word[: end - 1], word[end - 1]))
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def _text_encoder(tokenizer: Any) -> Any:
    """Qwen2.5-VL: a 2-layer text model as wide as the transformer's text input, a 1-block vision tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": TEXT_WIDTH, "intermediate_size": 2 * TEXT_WIDTH,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 8192,
            # multimodal RoPE: the sections add up to half a head (16 / 2), as 16 + 24 + 24 = 128 / 2
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": TEXT_WIDTH,
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _pipeline(variant: str) -> Any:
    """The pipeline `build_tiny_qwen_image_edit` saves (torch's generator already seeded)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )

    pipeline_class = QwenImageEditPlusPipeline if variant == "edit_plus" else QwenImageEditPipeline
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH, axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])
    # Qwen-Image-Edit's scheduler_config.json (Qwen-Image's)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )
    pipe = pipeline_class(
        scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, processor=None, transformer=transformer,
    )
    # the dropped prefix: the system turn and the user turn's start (the images come after it)
    template = pipe.prompt_template_encode
    prefix = template[: template.index(USER_TURN) + len(USER_TURN)]
    tokenizer = edit_tokenizer(prefix)
    pipe.register_modules(tokenizer=tokenizer, text_encoder=_text_encoder(tokenizer))
    count = len(tokenizer(prefix).input_ids)
    if count != pipe.prompt_template_encode_start_idx:  # diffusers changed the template
        raise RuntimeError(
            f"the tiny tokenizer spells {pipeline_class.__name__}'s template prefix in {count} tokens, the "
            f"pipeline drops {pipe.prompt_template_encode_start_idx}: update edit_tokenizer"
        )
    return pipe
