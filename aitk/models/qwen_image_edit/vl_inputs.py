"""Qwen2.5-VL inputs of the edit pipelines' prompts, without Qwen2VLProcessor.

QwenImageEdit(Plus)Pipeline hand prompt and control images to a Qwen2VLProcessor, which in
transformers 5 cannot be built without torchvision (its video processor needs it). What it does for
images is done here with the pieces that need no torchvision:
- pixels: transformers' own PIL image processor (Qwen2VLImageProcessorPil: resize to multiples of
  patch x merge (28 px) within min / max pixels, CLIP mean / std, flattened 14 px patches) gives
  `pixel_values` and `image_grid_thw`;
- text: each `<|image_pad|>` of the prompt becomes grid_t * grid_h * grid_w / merge^2 pad tokens
  (one per merged patch), images in the order the placeholders appear, then the tokenizer pads
  the batch (`attention_mask` 0 on padding).
The prompt texts (templates, "Picture N:" prefixes) stay the pipelines' own (`pipelines.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

IMAGE_PAD = "<|image_pad|>"
#: a token that cannot appear in a prompt: stands for expanded pads while the text is rewritten
_HOLD = "\x00image\x00"


class QwenEditInputError(ValueError):
    """A batch, control image or setting the Qwen-Image-Edit models cannot use."""


def fit_area(area: int, width: int, height: int) -> tuple[int, int]:
    """(width, height) of about `area` pixels with the aspect of width x height, sides multiples of
    32: the edit pipelines' calculate_dimensions, as (width, height)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    new_width, new_height, *_ = calculate_dimensions(area, width / height)
    return int(new_width), int(new_height)


def expand_image_pads(texts: list[str], grids: torch.Tensor, merge_size: int) -> list[str]:
    """`texts` with the i-th `<|image_pad|>` (counted over all texts) repeated once per merged
    patch of image i (its grid row t, h, w: t * h * w / merge_size^2)."""
    placeholders = sum(text.count(IMAGE_PAD) for text in texts)
    if placeholders != len(grids):
        raise QwenEditInputError(f"{placeholders} image placeholders in the prompts for {len(grids)} images")
    index, out = 0, []
    for text in texts:
        while IMAGE_PAD in text:
            count = int(grids[index].prod()) // merge_size**2
            text = text.replace(IMAGE_PAD, _HOLD * count, 1)
            index += 1
        out.append(text.replace(_HOLD, IMAGE_PAD))
    return out


def prompt_inputs(
    tokenizer: Any, image_processor: Any, texts: list[str], images: list[Any] | None, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """Qwen2VLProcessor(text=texts, images=images, padding=True)'s tensors the pipelines pass to
    the text encoder: input_ids, attention_mask, and with images pixel_values, image_grid_thw."""
    found: dict[str, torch.Tensor] = {}
    if images:
        pixels = image_processor(images=list(images), return_tensors="pt")
        found = {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
        texts = expand_image_pads(texts, found["image_grid_thw"], int(image_processor.merge_size))
    elif any(IMAGE_PAD in text for text in texts):
        raise QwenEditInputError("the prompts hold image placeholders but no image was given")
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    found.update(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return {name: value.to(device) for name, value in found.items()}


def image_token_count(width: int, height: int, image_processor: Any | None = None) -> int:
    """How many pad tokens an image of width x height becomes: with `image_processor`'s settings,
    else Qwen2-VL's defaults (the plan has no processor)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

    proc = image_processor or Qwen2VLImageProcessorPil
    patch, merge = int(proc.patch_size), int(proc.merge_size)
    size = dict(proc.size)
    h, w = smart_resize(height, width, factor=patch * merge, min_pixels=size["shortest_edge"],
                        max_pixels=size["longest_edge"])
    return (h // patch) * (w // patch) // merge**2


def tensor_to_pil(pixels: torch.Tensor) -> Any:
    """(3, H, W) in [-1, 1] -> an RGB PIL image (what the pipelines' processor is given)."""
    from PIL import Image

    array = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy())


def open_rgb(path: str | Path) -> Any:
    """An image file as RGB PIL, EXIF orientation applied (a control image as the text encoder reads it)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except OSError as exc:
        raise QwenEditInputError(f"control image {path} cannot be read ({exc}): fix or replace the file") from exc


def resize_pil(image: Any, width: int, height: int) -> Any:
    """The pipelines' resize (VaeImageProcessor.resize of a PIL image: Lanczos)."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=16).resize(image, height, width)
