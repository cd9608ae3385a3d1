"""FLUX.1 Kontext: the edit model, trained on (control image, target image, caption) triples.

Each sample's control image is VAE-encoded, packed and appended to the image tokens with ids whose
first axis is 1 (as FluxKontextPipeline does); only the target tokens are predicted and compared.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from aitk.models.base import BatchContext, NoisyBatch
from aitk.models.flux.adapter import FluxAdapter
from aitk.models.flux.latents import FluxInputError, encode_flux_latents, image_ids, pack_latents


@functools.cache
def _kontext_preview_pipeline_class() -> type:
    """FluxKontextPipeline that encodes the control image as training does.

    diffusers casts the control image to the transformer's dtype before the VAE sees it, which
    fails (bf16 / fp16 input, fp32 VAE) and would round the pixels; here the image is encoded
    from the pipeline's fp32 pixels first and handed on as latents, which the pipeline then casts
    to the transformer's dtype, exactly as training's control latents are.
    """
    from diffusers import FluxKontextPipeline

    class FluxKontextPreviewPipeline(FluxKontextPipeline):
        def prepare_latents(self, image: torch.Tensor | None, *args: Any, **kwargs: Any) -> Any:
            if image is not None and image.shape[1] != self.latent_channels:
                image = encode_flux_latents(self.vae, image, self.vae.device)
            return super().prepare_latents(image, *args, **kwargs)

    return FluxKontextPreviewPipeline


class FluxKontextAdapter(FluxAdapter):
    """FLUX.1 Kontext: image editing; trained on (control image, target image, caption) triples."""

    arch_names = ("flux_kontext",)
    uses_controls = True
    modelspec_architecture = "flux-1-kontext-dev/lora"
    model_label = "FLUX.1 Kontext"
    pipeline_name = "FluxKontextPipeline"
    step_auxiliary_names = ("vae",)  # encodes each batch's control images
    card_pipeline_tag = "image-to-image"

    def _pipeline_class(self) -> type:
        return _kontext_preview_pipeline_class()

    def _batch_extra(self, latents: torch.Tensor, context: BatchContext | None) -> dict[str, Any]:
        if context is None or context.controls is None:
            raise FluxInputError(
                "flux_kontext trains on image pairs but this batch has no control images: set the "
                "dataset's control_path to the folder of control (input) images, one per training "
                "image with the same file name"
            )
        if context.controls.shape[0] != latents.shape[0]:
            raise FluxInputError(
                f"{context.controls.shape[0]} control images for a batch of {latents.shape[0]} latents"
            )
        return {"control_latents": self.encode_images(context.controls).to(self.dtype)}

    def _reference_tokens(self, batch: NoisyBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        control = batch.extra.get("control_latents")
        if control is None:
            raise FluxInputError(
                "flux_kontext: NoisyBatch.extra has no control_latents (make the batch with make_noisy_batch)"
            )
        h, w = control.shape[-2:]
        return pack_latents(control), image_ids(h, w, control.device, self.dtype, first=1.0)

    def preview_kwargs(self, request: Any) -> dict[str, Any]:
        kwargs = super().preview_kwargs(request)
        height, width = self._preview_size or (request.height, request.width)
        # The pipeline otherwise resizes to ~1 MP (max_area) and snaps the control image to its
        # preferred resolutions; previews keep the requested size, as training keeps the bucket.
        kwargs.update(max_area=height * width, _auto_resize=False)
        if request.ctrl_img:
            from PIL import Image

            path = Path(request.ctrl_img).expanduser()
            if not path.is_file():
                raise FluxInputError(f"sample ctrl_img: {request.ctrl_img!r} is not a file")
            with Image.open(path) as image:
                # like the training pairs, the control image has the target's size
                kwargs["image"] = image.convert("RGB").resize((width, height), Image.BICUBIC)
        return kwargs
