"""Loading a captioning model with its processor, and the captions of a batch of items.

Both families load through transformers: `AutoModelForImageTextToText` (Florence2ForConditionalGeneration,
Qwen2_5_VLForConditionalGeneration) and `AutoProcessor`. Qwen2.5-VL's processor also builds its
video processor, which transformers 5 only has with torchvision (not installed with aitk,
docs/install.md); without it the prompt goes through the tokenizer's chat template and the
images through transformers' PIL image processor (`aitk.models.qwen_image_edit.vl_inputs`), the
same tensors the processor gives.

Device: cuda when there is a GPU, else the CPU; precision: bf16 on a GPU (fp16 where bf16 is not
supported), fp32 on the CPU. Decoding is greedy (Florence-2: beam search of 3, as its model card
shows), so the same model writes the same captions again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aitk.caption.families import FLORENCE2, CaptionModelError, Family, is_local

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32"}


def pick_device(device: str | None) -> Any:
    import torch

    if device:
        try:
            chosen = torch.device(device)
        except (RuntimeError, ValueError):
            raise CaptionModelError(f"device {device!r} is not valid; use cuda, cuda:N, cpu or mps") from None
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise CaptionModelError(f"device {device!r}: there is no CUDA GPU here; use cpu")
        return chosen
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str | None, device: Any) -> Any:
    import torch

    if dtype:
        name = DTYPES.get(dtype.strip().lower())
        if name is None:
            raise CaptionModelError(f"dtype {dtype!r} is not valid; use one of {', '.join(DTYPES)}")
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class Captioner:
    """A loaded model: `caption(items, prompts, max_new_tokens)` gives one caption per item (the
    model's text, not cleaned). Each item is a list of images (one, or a video's frames)."""

    def __init__(self, family: Family, model_id: str, model: Any, device: Any, dtype: Any,
                 processor: Any | None = None, tokenizer: Any | None = None, image_processor: Any | None = None) -> None:
        self.family = family
        self.model_id = model_id
        self.model = model
        self.device = device
        self.dtype = dtype
        self.processor = processor  # AutoProcessor, when it could be built
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        self.image_processor = image_processor  # the fallback without torchvision (Qwen2.5-VL)

    def caption(self, items: Sequence[Sequence[Any]], prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        import torch

        inputs = self._inputs(items, prompts)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      num_beams=self.family.num_beams)
        if not self.model.config.is_encoder_decoder:
            out = out[:, inputs["input_ids"].shape[1]:]  # the prompt comes back first
        return list(self.tokenizer.batch_decode(out, skip_special_tokens=True))

    def _inputs(self, items: Sequence[Sequence[Any]], prompts: Sequence[str]) -> Any:
        if self.family is FLORENCE2:
            # one image per item; the processor puts the image tokens and the task's prompt together
            batch = self.processor(text=list(prompts), images=[frames[0] for frames in items], return_tensors="pt")
            return batch.to(self.device, dtype=self.dtype)
        texts = [self._chat_text(len(frames), prompt) for frames, prompt in zip(items, prompts)]
        images = [image for frames in items for image in frames]
        if self.processor is not None:
            batch = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
            return batch.to(self.device, dtype=self.dtype)
        from aitk.models.qwen_image_edit.vl_inputs import prompt_inputs

        batch = prompt_inputs(self.tokenizer, self.image_processor, texts, images, self.device)
        batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        return batch

    def _chat_text(self, image_count: int, prompt: str) -> str:
        content = [{"type": "image"} for _ in range(image_count)] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        owner = self.processor if self.processor is not None else self.tokenizer
        return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_captioner(model_id: str, family: Family, *, device: str | None = None, dtype: str | None = None,
                   log: Callable[[str], None] = print) -> Captioner:
    """The model and its processor on `device` in `dtype` (defaults: see the module docstring).
    Raises CaptionModelError with one line when the model cannot be loaded."""
    import torch
    from transformers import AutoModelForImageTextToText

    _quiet_transformers()
    where = pick_device(device)
    precision = pick_dtype(dtype, where)
    source = str(Path(model_id).expanduser()) if is_local(model_id) else model_id
    log(f"loading {family.label} {model_id} on {where} ({str(precision).removeprefix('torch.')})")
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=precision, device_map=str(where) if where.type == "cuda" else None)
        model = model.to(where).eval()
        parts = _processor_parts(source, family)
    except CaptionModelError:
        raise
    except torch.cuda.OutOfMemoryError:
        raise CaptionModelError(f"model {model_id!r} does not fit in the GPU's memory; use a smaller model "
                                "(docs/captions.md, GPU memory) or --device cpu") from None
    except Exception as exc:  # noqa: BLE001 - a model that cannot load is one line, not a traceback
        detail = " ".join(str(exc).split())[:400] or type(exc).__name__
        raise CaptionModelError(f"model {model_id!r} could not be loaded: {type(exc).__name__}: {detail}") from None
    return Captioner(family, model_id, model, where, precision, **parts)


def _processor_parts(source: str, family: Family) -> dict[str, Any]:
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(source)
    except ImportError:
        if family is FLORENCE2:
            raise
        return _without_video_processor(source)
    processor.tokenizer.padding_side = "left"  # decoder-only models generate after the prompt
    return {"processor": processor}


def _without_video_processor(source: str) -> dict[str, Any]:
    """Qwen2.5-VL's tokenizer and PIL image processor, for transformers without torchvision."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "left"
    if not tokenizer.chat_template:
        tokenizer.chat_template = _processor_chat_template(source)
    return {"tokenizer": tokenizer, "image_processor": AutoImageProcessor.from_pretrained(source)}


def _processor_chat_template(source: str) -> str:
    """The processor's chat template (chat_template.jinja, or chat_template.json's), for a tokenizer
    that has none of its own."""
    for name in ("chat_template.jinja", "chat_template.json"):
        path = _model_file(source, name)
        if path is None:
            continue
        text = path.read_text(encoding="utf-8")
        return text if name.endswith(".jinja") else json.loads(text)["chat_template"]
    raise CaptionModelError(f"model {source!r} has no chat template (tokenizer_config.json, chat_template.jinja "
                            "or chat_template.json)")


def _model_file(source: str, name: str) -> Path | None:
    if Path(source).is_dir():
        path = Path(source) / name
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, name))
    except Exception:  # noqa: BLE001 - the file is optional: the next one is tried
        return None
