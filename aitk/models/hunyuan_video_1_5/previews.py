"""HunyuanVideo 1.5 previews: its diffusers pipelines with ai-toolkit's preview arguments.

diffusers' HunyuanVideo 1.5 pipelines take classifier-free guidance from a `guider` component and
no `guidance_scale`; the I2V pipeline sizes its video from the start image (buckets around the
transformer's `target_size`) and takes no height / width. The preview classes here take the
sample's guidance_scale (1 = no guidance, ai-toolkit's convention; g > 1 = CFG of scale g with the
negative prompt), floor T2V sizes to the VAE's 16 px, size I2V videos around the sample's width x
height, and use the adapter's prompt length (`tokenizer_max_length`), so previews read prompts as
training does.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch


def _with_preview_arguments(base: type) -> type:
    class HunyuanVideo15Preview(base):  # type: ignore[misc, valid-type]
        def __call__(self, *args: Any, guidance_scale: float = 1.0, height: int | None = None,
                     width: int | None = None, **kwargs: Any) -> Any:
            from diffusers import ClassifierFreeGuidance

            self.guider = ClassifierFreeGuidance(guidance_scale=float(guidance_scale))
            step = self.vae_scale_factor_spatial
            if "image" in kwargs:  # I2V: the start image's bucket, of about the sample's area
                if height and width:
                    self.target_size = max(step, int(math.sqrt(height * width)) // step * step)
                return super().__call__(*args, **kwargs)
            height = max(step, height // step * step) if height else None
            width = max(step, width // step * step) if width else None
            return super().__call__(*args, height=height, width=width, **kwargs)

    HunyuanVideo15Preview.__name__ = f"{base.__name__}Preview"
    return HunyuanVideo15Preview


@functools.cache
def preview_pipeline_class(i2v: bool) -> type:
    """HunyuanVideo15Pipeline (or the I2V pipeline) with the preview arguments above."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline, HunyuanVideo15Pipeline

    return _with_preview_arguments(HunyuanVideo15ImageToVideoPipeline if i2v else HunyuanVideo15Pipeline)


def to_pil(frames: torch.Tensor) -> list[Any]:
    """(B, 3, H, W) in [-1, 1] -> PIL images, what the I2V pipeline hands its image processor."""
    from PIL import Image

    array = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in array]


@torch.no_grad()
def decode_video(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, F, h, w) as the transformer sees them -> pixels (B, 3, F', H, W) in about
    [-1, 1], one sample at a time (diffusers 0.42's VAE attention fails on batches above 1)."""
    latents = latents.to(torch.float32) / vae.config.scaling_factor
    return torch.cat([vae.decode(one).sample for one in latents.split(1)])
