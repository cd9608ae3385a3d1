"""Preview images: the job's sample prompts rendered through the model's pipeline, written atomically."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from aitk.config.prompts import PreviewRequest, parse_prompt
from aitk.config.schema import SampleConfig
from aitk.fsutil import atomic_write_bytes

def preview_requests(cfg: SampleConfig, trigger_word: str | None) -> list[PreviewRequest]:
    defaults = PreviewRequest(
        prompt="",
        width=cfg.width,
        height=cfg.height,
        seed=cfg.seed,
        guidance_scale=cfg.guidance_scale,
        steps=cfg.sample_steps,
        negative=cfg.neg,
        multiplier=cfg.network_multiplier,
        num_frames=cfg.num_frames,
        fps=cfg.fps,
        ctrl_img=cfg.ctrl_img,
    )
    requests = [parse_prompt(p, defaults) for p in cfg.prompts]
    for item in cfg.samples:
        request = parse_prompt(item.prompt, defaults)
        overrides = {
            "width": item.width, "height": item.height, "seed": item.seed,
            "guidance_scale": item.guidance_scale, "steps": item.sample_steps,
            "negative": item.neg, "multiplier": item.network_multiplier, "ctrl_img": item.ctrl_img,
        }
        requests.append(replace(request, **{k: v for k, v in overrides.items() if v is not None}))
    if trigger_word:
        requests = [replace(r, prompt=r.prompt.replace("[trigger]", trigger_word)) for r in requests]
    if cfg.walk_seed:
        requests = [replace(r, seed=r.seed + i) for i, r in enumerate(requests)]
    return requests


def _snap(size: int, multiple: int = 8) -> int:
    return max(multiple, size // multiple * multiple)


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
) -> list[Path]:
    """Render each request and write samples/<step:09d>_<i>.jpg (images) or .mp4 plus .webp
    (videos) atomically.

    The pipeline stops at latents and `decode` (the model adapter's) turns them into images or
    frame lists, so the VAE decodes in its own precision whatever the training dtype.
    `extra_kwargs` (the adapter's preview_kwargs) adds model-specific pipeline arguments;
    `prompt_kwargs` gives the prompts as cached embeddings instead of text (text encoders freed).
    """
    from aitk.trainer.preview_files import jpeg_bytes, mp4_bytes, webp_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline.set_progress_bar_config(disable=True)
    written = []
    try:
        for index, request in enumerate(requests):
            set_multiplier(request.multiplier)
            generator = torch.Generator(device="cpu").manual_seed(request.seed)
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
