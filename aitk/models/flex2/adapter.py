"""Flex.2 (ostris/Flex.2-preview): FLUX.1's transformer, text encoders and VAE, with an x_embedder
that also reads inpaint and control inputs (aitk.models.flex2.inputs).

Training is FLUX's (FluxAdapter: rectified flow, FLUX's resolution shift, guidance embedding
bypassed as upstream's example asks); each batch adds its conditioning channels to the noisy
latents before they are packed into 2x2-patch tokens, so the transformer sees upstream's layout.
The dataset's control images (control_path, optional) are VAE-encoded as the control input;
model.model_kwargs draw random inpaint areas and dropouts as upstream's Flex2 does.

Previews: diffusers' FluxPipeline (FluxPipeline maths, scheduler and guidance embedding) whose
noise has the VAE's 16 channels and whose transformer gets the conditioning tokens appended to
each call's image tokens: blank without a control image; a preview's ctrl_img is the control
image, or the inpaint image when its file name holds ".inpaint." and it has an alpha channel
(alpha 0 = the area to fill), as upstream's ctrl_idx 1 / 0 ask.

LoRA files: FLUX's names and layout (transformer.<module path> with lora_A / lora_B / alpha).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from aitk.config.schema import TrainConfig
from aitk.models.base import BatchContext, NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.flex2.inputs import (
    Flex2InputError,
    Flex2Options,
    blank_inpaint,
    check_transformer,
    conditioning_channels,
    inpaint_input,
    training_inputs,
)
from aitk.models.flux import FluxAdapter, pack_latents

#: NoisyBatch.extra key of the conditioning channels (B, 2C + 1, h, w)
FLEX2_INPUTS = "flex2_inputs"
#: the part of a preview ctrl_img's file name that makes it the inpaint image (upstream's convention)
INPAINT_MARK = ".inpaint."


@functools.cache
def _preview_pipeline_class() -> type:
    """FluxPipeline for Flex.2: 16-channel noise, the conditioning tokens appended to each call."""
    from diffusers import FluxPipeline

    class Flex2PreviewPipeline(FluxPipeline):
        def prepare_latents(self, batch_size: int, num_channels_latents: int, *args: Any, **kwargs: Any) -> Any:
            # FluxPipeline derives the noise channels from in_channels, which counts the conditioning too
            return super().prepare_latents(batch_size, self.transformer.config.out_channels // 4, *args, **kwargs)

        def __call__(self, *args: Any, conditioning_latents: torch.Tensor | None = None, **kwargs: Any) -> Any:
            if conditioning_latents is None:
                raise Flex2InputError("Flex.2 previews need conditioning_latents (Flex2Adapter.preview_kwargs)")
            tokens = pack_latents(conditioning_latents)

            def append(_module: Any, call_args: tuple, call_kwargs: dict) -> tuple[tuple, dict]:
                image = call_kwargs["hidden_states"]
                extra = tokens.to(image.device, image.dtype).expand(image.shape[0], -1, -1)
                call_kwargs["hidden_states"] = torch.cat([image, extra], dim=-1)
                return call_args, call_kwargs

            handle = self.transformer.register_forward_pre_hook(append, with_kwargs=True)
            try:
                return super().__call__(*args, **kwargs)
            finally:
                handle.remove()

    return Flex2PreviewPipeline


class Flex2Adapter(FluxAdapter):
    arch_names = ("flex2",)
    uses_controls = True  # optional: without control images the control input is zeros
    step_auxiliary_names = ("vae",)  # encodes each batch's control images
    base_model_version = "flex2"
    modelspec_architecture = "flex-2/lora"
    schnell_architecture = "flex-2/lora"
    modelspec_implementation = "https://huggingface.co/ostris/Flex.2-preview"
    model_label = "Flex.2"
    card_tags = ("flux", "flex2")
    card_license = {"license": "apache-2.0"}

    @classmethod
    def card_license_fields(cls, base_model: str) -> dict[str, str]:
        return dict(cls.card_license)

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        self.latent_channels = check_transformer(dict(self.transformer.config), self.model_label)
        self.options = Flex2Options.from_kwargs(self.model_cfg.model_kwargs)

    def _pipeline_class(self) -> type:
        return _preview_pipeline_class()

    # --- training ------------------------------------------------------------------------
    def make_noisy_batch(
        self,
        latents: torch.Tensor,
        train_cfg: TrainConfig,
        generator: torch.Generator | None,
        context: BatchContext | None = None,
    ) -> NoisyBatch:
        batch = super().make_noisy_batch(latents, train_cfg, generator, context)
        controls = context.controls if context is not None else None
        inputs = training_inputs(latents.float(), controls, self.options, generator, self.encode_images)
        batch.extra[FLEX2_INPUTS] = inputs.to(self.dtype)
        return batch

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        inputs = batch.extra.get(FLEX2_INPUTS)
        if inputs is None:
            raise Flex2InputError(f"Flex.2: NoisyBatch.extra has no {FLEX2_INPUTS} (make the batch with make_noisy_batch)")
        x = batch.noisy_latents.to(self.dtype)
        # channels first, then 2x2 patches: the same tokens as packing each part and joining them
        widened = NoisyBatch(torch.cat([x, inputs.to(x)], dim=1), batch.timesteps, batch.target,
                             batch.loss_weights, batch.extra)
        return super().predict(widened, cond)

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        noisy, cond = super().example_batch(batch, size, frames, expert=expert, with_controls=False)
        c = self.latent_channels
        h, w = size[1] // self.vae_scale_factor, size[0] // self.vae_scale_factor
        latents = torch.randn(batch, c, h, w)
        extra = {FLEX2_INPUTS: torch.randn(batch, conditioning_channels(c), h, w, dtype=self.dtype)}
        return NoisyBatch(latents.to(self.dtype), noisy.timesteps, torch.randn(latents.shape), None, extra), cond

    # --- previews ------------------------------------------------------------------------
    def preview_kwargs(self, request: Any) -> dict[str, Any]:
        kwargs = super().preview_kwargs(request)
        height, width = self._preview_size or (request.height, request.width)
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        empty = torch.zeros(1, self.latent_channels, h, w)
        inpaint, control = blank_inpaint(empty), empty
        if request.ctrl_img:
            pixels, keep = self._preview_image(request.ctrl_img, width, height)
            latents = self.encode_images(pixels.to(self.device)).float().cpu()
            if keep is None:
                control = latents
            else:
                keep = torch.nn.functional.interpolate(keep, size=(h, w), mode="bilinear", align_corners=False)
                inpaint = inpaint_input(latents, keep)
        kwargs["conditioning_latents"] = torch.cat([inpaint, control], dim=1).to(self.device, self.dtype)
        return kwargs

    @staticmethod
    def _preview_image(path_text: str, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pixels (1, 3, H, W) in [-1, 1], the keep mask (1, 1, H, W) of an inpaint image or None)."""
        import numpy as np
        from PIL import Image

        path = Path(path_text).expanduser()
        if not path.is_file():
            raise Flex2InputError(f"sample ctrl_img: {path_text!r} is not a file")
        with Image.open(path) as image:
            inpaint = INPAINT_MARK in path.name
            if inpaint and "A" not in image.getbands():
                raise Flex2InputError(
                    f"sample ctrl_img: {path_text!r} is named as an inpaint image ({INPAINT_MARK}) but has no alpha "
                    "channel; erase the area to fill (alpha 0) and save it as PNG or WebP, or rename it to use it "
                    "as a control image"
                )
            resized = image.convert("RGBA" if inpaint else "RGB").resize((width, height), Image.BICUBIC)
        array = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        pixels = array[:, :3] * 2 - 1
        return pixels, (array[:, 3:4] if inpaint else None)
