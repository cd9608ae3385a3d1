"""The edit models' prompt encoding and preview pipelines.

`edit_prompt_embeds` is the edit pipelines' prompt encoding (their `_get_qwen_prompt_embeds`) for
one prompt and its images, with the VL inputs of `vl_inputs` in place of Qwen2VLProcessor:
the prompt inside the pipeline's chat template, after one `<|vision_start|><|image_pad|>
<|vision_end|>` per image (Qwen-Image-Edit-2509 numbers them "Picture 1: ", "Picture 2: "...);
the text encoder's last hidden state without the template's first
`prompt_template_encode_start_idx` tokens. Training and previews both encode through it.

The preview pipelines are QwenImageEdit(Plus)Pipeline with that encoding (no processor needed),
sample.guidance_scale as the true CFG scale with the blank prompt as the default negative (as
Qwen-Image's previews, aitk.models.qwen_image.previews), and control images VAE-encoded in fp32
before the pipeline casts them to the transformer's dtype (the training path).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from aitk.models.qwen_image_edit.vl_inputs import prompt_inputs

VISION_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"


def image_prefix(count: int, numbered: bool) -> str:
    """The text before the prompt for `count` images: numbered "Picture i: " slots (2509) or bare ones."""
    if numbered:
        return "".join(f"Picture {i + 1}: {VISION_SLOT}" for i in range(count))
    return VISION_SLOT * count


def edit_prompt_embeds(
    text_encoder: Any,
    tokenizer: Any,
    image_processor: Any,
    template: str,
    drop: int,
    prompt: str,
    images: list[Any],
    *,
    numbered: bool,
    device: torch.device | str,
) -> torch.Tensor:
    """(1, tokens, width) embeddings of `prompt` seen with `images` (PIL, already at the size the
    text encoder gets), on `device` in the encoder's dtype. One prompt per call: nothing is padded."""
    if numbered:  # 2509's template has no image slot: the numbered ones go before the prompt
        text = template.format(image_prefix(len(images), True) + prompt)
    else:  # the first model's template holds one slot; more images would need more slots
        text = template.replace(VISION_SLOT, image_prefix(len(images), False)).format(prompt)
    encoder_device = next(text_encoder.parameters()).device
    inputs = prompt_inputs(tokenizer, image_processor, [text], images, encoder_device)
    out = text_encoder(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        pixel_values=inputs.get("pixel_values"),
        image_grid_thw=inputs.get("image_grid_thw"),
        output_hidden_states=True,
    )
    return out.hidden_states[-1][:, drop:].to(device)


def pre_encoded(vae: Any, images: Any) -> Any:
    """The pipelines' VAE inputs (B, 3, 1, H, W) as normalised latents (B, 16, 1, h, w), encoded in
    fp32 as training encodes (the pipelines then pass them on as latents)."""
    from aitk.models.qwen_image.latents import encode_latents

    def one(image: torch.Tensor) -> torch.Tensor:
        if image.shape[1] == vae.config.z_dim:
            return image
        return encode_latents(vae, image[:, :, 0].float(), vae.device).unsqueeze(2)

    if images is None:
        return None
    return [one(image) for image in images] if isinstance(images, list) else one(images)


def _preview_class(base: type, numbered: bool) -> type:
    class EditPreviewPipeline(base):  # type: ignore[misc, valid-type]
        #: Qwen2VLImageProcessorPil of the model (set by the adapter; not a pipeline component)
        vl_image_processor: Any = None

        def _get_qwen_prompt_embeds(
            self, prompt: str | list[str] | None = None, image: Any = None, device: Any = None, dtype: Any = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
            from aitk.models.base import PromptEmbeds

            prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
            images = image if isinstance(image, list) else ([image] if image is not None else [])
            device = device or self._execution_device
            embeds = [
                edit_prompt_embeds(
                    self.text_encoder, self.tokenizer, self.vl_image_processor, self.prompt_template_encode,
                    self.prompt_template_encode_start_idx, text, images, numbered=numbered, device=device,
                )
                for text in prompts
            ]
            joined = PromptEmbeds.cat([
                PromptEmbeds(e, {"mask": torch.ones(e.shape[:2], dtype=torch.long, device=e.device)}) for e in embeds
            ])
            return joined.hidden_states.to(dtype or self.text_encoder.dtype), joined.extra["mask"]

        def prepare_latents(self, images: Any, *args: Any, **kwargs: Any) -> Any:
            return super().prepare_latents(pre_encoded(self.vae, images), *args, **kwargs)

        def __call__(self, *args: Any, guidance_scale: float | None = None, **kwargs: Any) -> Any:
            if kwargs.get("true_cfg_scale") is None:
                kwargs["true_cfg_scale"] = 1.0 if guidance_scale is None else float(guidance_scale)
            guided = kwargs["true_cfg_scale"] > 1.0
            if guided and kwargs.get("negative_prompt") is None and kwargs.get("negative_prompt_embeds") is None:
                kwargs["negative_prompt"] = ""
            return super().__call__(*args, guidance_scale=None, **kwargs)

    EditPreviewPipeline.__name__ = f"{base.__name__}Preview"
    return EditPreviewPipeline


@functools.cache
def preview_pipeline_class(plus: bool) -> type:
    """QwenImageEditPipeline (plus: QwenImageEditPlusPipeline) for previews (module docstring)."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    return _preview_class(QwenImageEditPlusPipeline if plus else QwenImageEditPipeline, numbered=plus)
