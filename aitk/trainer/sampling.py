"""Preview images: the job's sample prompts rendered through the model's pipeline, written atomically."""

from __future__ import annotations

import random
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch

from aitk.config.prompts import PreviewRequest, build_preview_requests, preview_fields, unrenderable_previews
from aitk.config.schema import SampleConfig
from aitk.fsutil import atomic_write_bytes

__all__ = ["preview_fields", "preview_requests", "render_previews", "unrenderable_previews"]


def preview_requests(cfg: SampleConfig, trigger_word: str | None) -> list[PreviewRequest]:
    """The job's previews with their inline flags read (aitk.config.prompts.build_preview_requests)."""
    return build_preview_requests(cfg, trigger_word)


def _snap(size: int, multiple: int = 8) -> int:
    return max(multiple, size // multiple * multiple)


def _optional_kwargs(request: PreviewRequest, fields: Collection[str], with_text: bool) -> dict[str, Any]:
    """The request's settings only some families' pipelines take (SDXL's second prompts, SD's
    guidance rescale), for a model whose previews use them (`fields`: preview_fields); elsewhere
    `aitk validate` and the run's start say they are ignored. The second prompts go with the
    prompt text (with cached embeddings the text encoders are gone)."""
    wanted: dict[str, Any] = {"guidance_rescale": request.guidance_rescale or None}
    if with_text:
        wanted.update(prompt_2=request.prompt_2, negative_prompt_2=request.negative_2)
    field_of = {"negative_prompt_2": "negative_2"}
    return {k: v for k, v in wanted.items() if v is not None and field_of.get(k, k) in fields}


def preview_seed(request: PreviewRequest) -> int:
    """The request's seed; -1 (ai-toolkit's "random") draws a new one for every preview."""
    return request.seed if request.seed >= 0 else random.randrange(2**32)


def render_previews(
    pipeline: Any,
    requests: list[PreviewRequest],
    out_dir: Path,
    step: int,
    *,
    decode: Callable[[torch.Tensor], list[Any]],
    set_multiplier: Callable[[float], None],
    extra_kwargs: Callable[[PreviewRequest], dict[str, Any]] | None = None,
    prompt_kwargs: Callable[[PreviewRequest], dict[str, Any]] | None = None,
    skip: Collection[int] = (),
    fields: Collection[str] = (),
) -> list[Path]:
    """Render each request and write samples/<step:09d>_<i>.jpg (images) or .mp4 plus .webp
    (videos) atomically; the requests whose index is in `skip` are left out (unrenderable_previews:
    the run says why once), the others keep their index. `fields` are the optional settings the
    model's previews use (aitk.config.prompts.preview_fields of its arch).

    The pipeline stops at latents and `decode` (the model adapter's) turns them into images or
    frame lists, so the VAE decodes in its own precision whatever the training dtype.
    `extra_kwargs` (the adapter's preview_kwargs) adds model-specific pipeline arguments (frames,
    the control image); `prompt_kwargs` gives the prompts as cached embeddings instead of text
    (text encoders freed).
    """
    from aitk.trainer.preview_files import jpeg_bytes, mp4_bytes, webp_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline.set_progress_bar_config(disable=True)
    written = []
    try:
        for index, request in enumerate(requests):
            if index in skip:
                continue
            set_multiplier(request.multiplier)
            generator = torch.Generator(device="cpu").manual_seed(preview_seed(request))
            with torch.no_grad():
                if prompt_kwargs is not None:
                    prompts = prompt_kwargs(request)
                else:
                    prompts = {"prompt": request.prompt, "negative_prompt": request.negative or None}
                output = pipeline(
                    **prompts,
                    width=_snap(request.width),
                    height=_snap(request.height),
                    num_inference_steps=request.steps,
                    guidance_scale=request.guidance_scale,
                    generator=generator,
                    output_type="latent",
                    **_optional_kwargs(request, fields, with_text=prompt_kwargs is None),
                    **(extra_kwargs(request) if extra_kwargs is not None else {}),
                )
                latents = getattr(output, "images", None)
                if latents is None:
                    latents = output.frames
                result = decode(latents)[0]
            stem = out_dir / f"{step:09d}_{index}"
            if isinstance(result, list):  # a video: its frames
                written.append(atomic_write_bytes(stem.with_suffix(".mp4"), mp4_bytes(result, request.fps)))
                written.append(atomic_write_bytes(stem.with_suffix(".webp"), webp_bytes(result, request.fps)))
            else:
                written.append(atomic_write_bytes(stem.with_suffix(".jpg"), jpeg_bytes(result)))
    finally:
        set_multiplier(1.0)
    return written
