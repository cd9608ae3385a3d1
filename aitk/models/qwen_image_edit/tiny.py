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
from aitk.models.qwen_image.tiny import SPECIAL_TOKENS, byte_tokenizer, denoising_parts, text_encoder

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
        tokenizer = byte_tokenizer(words)
        broken = [w for w in words if len(tokenizer.backend_tokenizer.model.tokenize(w)) != 1]
        if not broken:
            return tokenizer
        words = broken + [w for w in words if w not in broken]
    raise RuntimeError(f"the tiny tokenizer cannot spell {broken} as one token each")


def _pipeline(variant: str) -> Any:
    """The pipeline `build_tiny_qwen_image_edit` saves (torch's generator already seeded)."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    pipeline_class = QwenImageEditPlusPipeline if variant == "edit_plus" else QwenImageEditPipeline
    # Qwen-Image's parts (and scheduler_config.json, which Qwen-Image-Edit shares)
    pipe = pipeline_class(**denoising_parts(), text_encoder=None, tokenizer=None, processor=None)
    # the dropped prefix: the system turn and the user turn's start (the images come after it)
    template = pipe.prompt_template_encode
    prefix = template[: template.index(USER_TURN) + len(USER_TURN)]
    tokenizer = edit_tokenizer(prefix)
    pipe.register_modules(tokenizer=tokenizer, text_encoder=text_encoder(tokenizer, max_positions=8192))
    count = len(tokenizer(prefix).input_ids)
    if count != pipe.prompt_template_encode_start_idx:  # diffusers changed the template
        raise RuntimeError(
            f"the tiny tokenizer spells {pipeline_class.__name__}'s template prefix in {count} tokens, the "
            f"pipeline drops {pipe.prompt_template_encode_start_idx}: update edit_tokenizer"
        )
    return pipe
