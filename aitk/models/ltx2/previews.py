"""LTX-2 previews: LTX2Pipeline over the live modules (LTX2ImageToVideoPipeline when a preview
has a first-frame image), preview arguments, decoding of the video latents.

A mixin of aitk.models.ltx2.adapter.LTX2Adapter; it reads the adapter's parts and facts.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

#: the block LTX2Pipeline perturbs for spatio-temporal guidance by default
STG_BLOCK = 28


@functools.cache
def preview_pipeline_class() -> type:
    """LTX2Pipeline that renders image-to-video when given `image` (through
    LTX2ImageToVideoPipeline over the same parts) and floors sizes to the 32 px it requires."""
    from diffusers import LTX2ImageToVideoPipeline, LTX2Pipeline

    class LTX2PreviewPipeline(LTX2Pipeline):
        def __call__(self, *args: Any, image: Any = None, height: int = 512, width: int = 768, **kwargs: Any) -> Any:
            step = self.vae_spatial_compression_ratio
            height, width = max(step, height // step * step), max(step, width // step * step)
            if image is None:
                return super().__call__(*args, height=height, width=width, **kwargs)
            i2v = LTX2ImageToVideoPipeline(**self.components)
            i2v.set_progress_bar_config(disable=True)
            return i2v(*args, image=image, height=height, width=width, **kwargs)

    return LTX2PreviewPipeline


class LTX2Previews:
    """Preview methods of the LTX-2 adapter (see the module docstring)."""

    def preview_kwargs(self, request: Any) -> dict[str, Any]:
        from aitk.data.video import snap_frame_count

        blocks = [STG_BLOCK] if STG_BLOCK < self.transformer.config.num_layers else []
        kwargs: dict[str, Any] = {
            "num_frames": max(1, snap_frame_count(int(request.num_frames or 1), self.frame_rule)),
            "frame_rate": float(request.fps or self.frame_rate),
            "max_sequence_length": self.max_sequence_length,
            "use_cross_timestep": False,  # LTX-2.0's modulation, as training runs it
            # the pipeline's guidance defaults; spatio-temporal guidance only where its block exists
            "spatio_temporal_guidance_blocks": blocks,
        }
        if not blocks:
            kwargs.update(stg_scale=0.0, audio_stg_scale=0.0)
        if getattr(request, "ctrl_img", None):
            from PIL import Image

            path = Path(request.ctrl_img).expanduser()
            if not path.is_file():
                raise ValueError(f"sample.ctrl_img of preview {request.prompt!r}: {request.ctrl_img!r} is not an image file")
            with Image.open(path) as image:
                kwargs["image"] = image.convert("RGB")
        return kwargs

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Any]:
        """The pipeline's latents (un-normalised, (B, C, F, h, w)) -> per sample, its frames as PIL
        images (the VAE decodes in fp32, at decode timestep 0 where it is timestep-conditioned)."""
        from diffusers.video_processor import VideoProcessor

        if latents.ndim == 4:
            latents = latents.unsqueeze(2)
        latents = latents.to(self.device, torch.float32)
        temb = None
        if self.vae.config.timestep_conditioning:
            temb = torch.zeros(latents.shape[0], device=latents.device)
        video = self.vae.decode(latents, temb, return_dict=False)[0]
        processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor)
        return processor.postprocess_video(video, output_type="pil")
