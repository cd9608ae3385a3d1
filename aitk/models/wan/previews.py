"""WAN previews: the diffusers pipeline over the live modules, preview arguments, decoding.

A mixin of aitk.models.wan.adapter.Wan21Adapter (kept apart so the adapter stays readable): it
reads the adapter's parts (tokenizer, text encoder, VAE, scheduler, experts, image encoder) and
facts (i2v, flow shift, boundary ratio, frame rule).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from aitk.models.wan.flow import NUM_TRAIN_TIMESTEPS

HIGH_NOISE = "high_noise"
LOW_NOISE = "low_noise"
MAIN = "main"


def to_pil(frames: torch.Tensor) -> list[Any]:
    """(B, 3, H, W) in [-1, 1] -> PIL images, the input type the pipelines' image encoders get."""
    from PIL import Image

    array = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in array]


@functools.cache
def _i2v_preview_pipeline_class() -> type:
    """WanImageToVideoPipeline whose prompt cleaning uses ftfy only when it is installed.

    diffusers' I2V module calls ftfy unconditionally (NameError without it), while WanPipeline's
    identical encoder skips ftfy when missing; delegating keeps previews working without ftfy and
    guarantees the same text embeddings as training (which encodes through WanPipeline).
    """
    from diffusers import WanImageToVideoPipeline, WanPipeline

    class WanI2VPreviewPipeline(WanImageToVideoPipeline):
        def _get_t5_prompt_embeds(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            return WanPipeline._get_t5_prompt_embeds(self, *args, **kwargs)

    return WanI2VPreviewPipeline


class WanPreviews:
    """Preview methods of the WAN adapters (see the module docstring)."""

    def preview_scheduler(self, sampler: str | None) -> Any:
        """The model's own scheduler (UniPC over flow sigmas in WAN's folders); "flowmatch" /
        "euler" give diffusers' flow-match Euler with the same shift. Other names keep the model's
        scheduler: DDPM-family samplers do not apply to a flow model."""
        import diffusers

        if (sampler or "").lower() in ("flowmatch", "euler"):
            return diffusers.FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=self.flow_shift
            )
        return type(self.scheduler).from_config(self.scheduler.config)

    def preview_sampler_note(self, sampler: str) -> str | None:
        own = type(self.scheduler).__name__
        if sampler in ("flowmatch", "euler") or (sampler == "unipc" and own == "UniPCMultistepScheduler"):
            return None
        return f"the model's own {own}: WAN is a flow-matching model, {sampler} does not apply"

    def sample_pipeline(self, sampler: str | None = None) -> Any:
        from diffusers import WanPipeline

        experts = self.experts()
        parts: dict[str, Any] = dict(
            tokenizer=self.tokenizer,
            text_encoder=self.text_encoder,
            vae=self.vae,
            scheduler=self.preview_scheduler(sampler),
            transformer=experts.get(HIGH_NOISE, experts.get(MAIN)),
            transformer_2=experts.get(LOW_NOISE),
            boundary_ratio=self.boundary_ratio,
        )
        if not self.i2v:
            return WanPipeline(**parts)
        if self.uses_image_encoder:
            parts.update(image_encoder=self.image_encoder, image_processor=self.image_processor)
        return _i2v_preview_pipeline_class()(**parts)

    def preview_kwargs(self, request: Any) -> dict[str, Any]:
        from aitk.data.video import snap_frame_count

        kwargs: dict[str, Any] = {
            "num_frames": max(1, snap_frame_count(int(request.num_frames or 1), self.frame_rule)),
            "max_sequence_length": self.max_sequence_length,
        }
        if self.i2v:
            from PIL import Image

            if not request.ctrl_img:
                raise ValueError(
                    f"{self.arch_names[0]} previews start from an image: set sample.ctrl_img, ctrl_img of the "
                    "sample entry or --ctrl_img <image> in the prompt to the first frame's image file"
                )
            path = Path(request.ctrl_img).expanduser()
            if not path.is_file():
                raise ValueError(f"sample.ctrl_img of preview {request.prompt!r}: {request.ctrl_img!r} is not an image file")
            with Image.open(path) as image:
                kwargs["image"] = image.convert("RGB")
        return kwargs

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Any]:
        """Per sample, the video's frames as PIL images (the VAE decodes in fp32)."""
        from diffusers.video_processor import VideoProcessor

        if latents.ndim == 4:
            latents = latents.unsqueeze(2)
        video = self._decode_pixels(latents)
        processor = VideoProcessor(vae_scale_factor=self.vae.config.scale_factor_spatial)
        return processor.postprocess_video(video, output_type="pil")
