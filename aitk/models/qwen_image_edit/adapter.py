"""Qwen-Image-Edit ("qwen_image_edit") and Qwen-Image-Edit-2509 ("qwen_image_edit_plus"):
Qwen-Image's transformer, VAE and objective (QwenImageAdapter) trained on (control image(s),
target image, instruction) triples, as ai-toolkit trains them.

- Control images reach the transformer as extra image tokens after the target's (VAE latents,
  2x2 patches; `img_shapes` lists the target then each control); only the target's tokens are
  predicted. Edit: one control image at the bucket's size. Edit-2509: one per control folder
  (datasets[].control_path as a list, up to 3 in ai-toolkit), each resized to about 1024x1024
  pixels (its pipeline's VAE_IMAGE_SIZE; model.model_kwargs.match_target_res: the target's area).
- The prompt is read by Qwen2.5-VL together with the control images (the vision tower is kept):
  Edit sees its control at about 1024x1024 pixels, Edit-2509 each at about 384x384 ("Picture i:"
  slots), as their pipelines do (pipelines.edit_prompt_embeds; vl_inputs for the image inputs).
  A caption's embeddings thus depend on the sample's control images: `prompt_reads_controls`, so
  the trainer gives `encode_prompts_with_controls` each caption with its control image files and
  keys its memory and the text cache on both (ai-toolkit's cache keys on the control paths too).
  The text encoder reads each file whole, as it is on disk (EXIF orientation applied), as
  ai-toolkit's cache does: not the bucket's crop or flip the transformer's control tokens get.
  Once every (caption, control files) pair is encoded (cache_text_embeddings) or with
  unload_text_encoder, the text encoder is released as for the other families.
  `encode_prompts` alone reads the text without images (unload_text_encoder's trigger word and
  blank prompt: ai-toolkit encodes those as plain text too).
- Previews: QwenImageEdit(Plus)Pipeline with the control image(s) (sample ctrl_img; Edit-2509 also
  ctrl_img_1 .. ctrl_img_3, each at its own size), prompts encoded as in training, guidance as
  Qwen-Image's true CFG.

LoRA files: Qwen-Image's keys (diffusion_model.<module path>, the same transformer); diffusers'
QwenImageEdit(Plus)Pipeline.load_lora_weights reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from aitk.models.base import BatchContext, NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.qwen_image import QwenImageAdapter
from aitk.models.qwen_image import latents as qlatents
from aitk.models.qwen_image_edit import pipelines
from aitk.models.qwen_image_edit import vl_inputs as vl
from aitk.models.qwen_image_edit.vl_inputs import QwenEditInputError

#: pixels the Edit pipeline gives the text encoder's view of the control image (its 1024 * 1024)
EDIT_CONDITION_AREA = 1024 * 1024
#: Edit-2509's pipeline: the text encoder's view (CONDITION_IMAGE_SIZE) and the VAE's (VAE_IMAGE_SIZE)
PLUS_CONDITION_AREA = 384 * 384
PLUS_VAE_AREA = 1024 * 1024


class QwenImageEditAdapter(QwenImageAdapter):
    arch_names = ("qwen_image_edit",)
    uses_controls = True
    prompt_reads_controls = True
    step_auxiliary_names = ("vae",)  # encodes each batch's control images
    processor_names = ("image_processor",)
    base_model_version = "qwen_image_edit"
    modelspec_architecture = "qwen-image-edit/lora"
    default_config_repo = "Qwen/Qwen-Image-Edit"
    model_label = "Qwen-Image-Edit"
    card_pipeline_tag = "image-to-image"
    card_tags = ("qwen-image", "qwen-image-edit")
    #: Edit-2509: several numbered control images, each resized by area
    plus = False
    condition_area = EDIT_CONDITION_AREA

    image_processor: Any

    lora_keys_shared_with = "qwen_image"  # the same transformer, the same LoRA keys

    @classmethod
    def matches_lora_keys(cls, tensors: Any) -> bool:
        return False  # Qwen-Image's keys: `aitk lora info` guesses that family and names these too

    # --- loading -------------------------------------------------------------------------
    def keep_of_text_encoder(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        return module  # the vision tower reads the control images

    def _load_parts(self, location: str) -> dict[str, Any]:
        """As Qwen-Image's, but the vision tower stays (it reads the control images) and the
        model's processor/ settings come as the PIL image processor (no torchvision needed)."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.tokenizer = Qwen2Tokenizer.from_pretrained(location, subfolder="tokenizer")
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(location, subfolder="processor")
        self.text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            location, subfolder="text_encoder", torch_dtype=self.dtype
        )
        self.vae = self._load_vae(location)
        return dict(FlowMatchEulerDiscreteScheduler.load_config(location, subfolder="scheduler"))

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        self.match_target_res = bool(self.model_cfg.model_kwargs.get("match_target_res", False))

    # --- encoding ------------------------------------------------------------------------
    def _pipeline(self, scheduler: Any | None = None) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        if scheduler is None:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        pipe = pipelines.preview_pipeline_class(self.plus)(
            scheduler=scheduler, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            processor=None, transformer=self.transformer,
        )
        pipe.vl_image_processor = getattr(self, "image_processor", None)
        return pipe

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """`prompts` read without control images (module docstring)."""
        return self.encode_prompts_with_controls(prompts, [()] * len(prompts))

    @torch.no_grad()
    def encode_prompts_with_controls(self, prompts: list[str], controls: list[tuple[Path, ...]]) -> PromptEmbeds:
        """Each prompt read with its control image files (module docstring), one call each."""
        rows = []
        for prompt, files in zip(prompts, controls, strict=True):
            if not self.plus and len(files) > 1:
                raise QwenEditInputError(
                    f"qwen_image_edit reads one control image per prompt, got {len(files)} ({', '.join(map(str, files))}): "
                    "give one control folder, or use arch qwen_image_edit_plus (Qwen-Image-Edit-2509)"
                )
            embeds = self.embed_prompt(prompt, self.condition_images([vl.open_rgb(f) for f in files]))
            rows.append(PromptEmbeds(embeds, {"mask": torch.ones(embeds.shape[:2], dtype=torch.long)}))
        return PromptEmbeds.cat(rows).to(self.device)

    @torch.no_grad()
    def embed_prompt(self, prompt: str, images: list[Any]) -> torch.Tensor:
        """(1, tokens, width) embeddings of `prompt` with `images` (PIL, at the text encoder's size)."""
        pipe = self._text_pipe = self._text_pipe or self._pipeline()
        return pipelines.edit_prompt_embeds(
            self.text_encoder, self.tokenizer, self.image_processor, pipe.prompt_template_encode,
            pipe.prompt_template_encode_start_idx, prompt, images, numbered=self.plus, device=self.device,
        )

    def condition_images(self, controls: list[Any]) -> list[Any]:
        """The text encoder's view of one sample's control images (PIL): resized by area as the pipeline does."""
        area = self.condition_area
        return [vl.resize_pil(image, *vl.fit_area(area, *image.size)) for image in controls]

    # --- training objective --------------------------------------------------------------
    def _sample_controls(self, context: BatchContext | None, batch: int) -> list[list[torch.Tensor]]:
        """Per sample, its control images (3, H, W) in [-1, 1], in control_path order."""
        controls = context.controls if context is not None else None
        if controls is None:
            raise QwenEditInputError(
                f"{self.arch_names[0]} trains on image pairs but this batch has no control images: set the "
                "dataset's control_path to the folder of control (input) images (a list of folders for "
                "several per image), each file named as its training image"
            )
        if controls.ndim == 4:
            controls = controls.unsqueeze(1)
        if controls.shape[0] != batch:
            raise QwenEditInputError(f"{controls.shape[0]} control images for a batch of {batch} latents")
        if not self.plus and controls.shape[1] != 1:
            raise QwenEditInputError(
                f"qwen_image_edit takes one control image per sample, this dataset gives {controls.shape[1]} "
                "(control_path is a list): give one folder, or use arch qwen_image_edit_plus (Qwen-Image-Edit-2509)"
            )
        return [list(sample) for sample in controls]

    def _vae_pixels(self, control: torch.Tensor, target_hw: tuple[int, int]) -> torch.Tensor:
        """One control image (3, H, W) as the VAE gets it: Edit at the bucket's size; Edit-2509 at
        about 1024x1024 pixels (or the target's area with match_target_res), as its pipeline resizes."""
        from diffusers.image_processor import VaeImageProcessor

        if not self.plus:
            return control.unsqueeze(0)
        area = target_hw[0] * target_hw[1] if self.match_target_res else PLUS_VAE_AREA
        image = vl.tensor_to_pil(control)
        width, height = vl.fit_area(area, *image.size)
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2).preprocess(image, height, width)

    def _batch_extra(self, latents: torch.Tensor, context: BatchContext | None) -> dict[str, Any]:
        """The control images' tokens and RoPE shapes, and the text encoder's view of them."""
        b, _, h, w = latents.shape
        per_sample = self._sample_controls(context, b)
        target_hw = (h * self.vae_scale_factor, w * self.vae_scale_factor)
        tokens, shapes = [], [[(1, h // 2, w // 2)] for _ in range(b)]
        for k in range(len(per_sample[0])):  # the k-th control of every sample: one size, one VAE batch
            pixels = torch.cat([self._vae_pixels(sample[k], target_hw) for sample in per_sample])
            control = self.encode_images(pixels.to(self.device))
            tokens.append(qlatents.pack_latents(control).to(self.dtype))
            for row in shapes:
                row.append((1, control.shape[-2] // 2, control.shape[-1] // 2))
        return {"control_tokens": torch.cat(tokens, dim=1), "img_shapes": shapes}

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        from aitk.models.qwen_image.adapter import _padded

        x = batch.noisy_latents.to(self.dtype)
        _, _, h, w = x.shape
        hidden, mask = cond.hidden_states.to(self.device, self.dtype), cond.extra["mask"].to(self.device)
        target = qlatents.pack_latents(x)
        tokens = torch.cat([target, batch.extra["control_tokens"].to(x.device, self.dtype)], dim=1)
        out = self.transformer(
            hidden_states=tokens,
            timestep=(batch.timesteps / 1000.0).to(x.device, self.dtype),
            encoder_hidden_states=hidden,
            encoder_hidden_states_mask=mask if _padded(mask) else None,
            img_shapes=batch.extra["img_shapes"],
            return_dict=False,
        )[0]
        return qlatents.unpack_latents(out[:, : target.shape[1]], h, w)

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        noisy, cond = super().example_batch(batch, size, frames, expert=expert, with_controls=with_controls)
        h, w = noisy.noisy_latents.shape[-2:]
        # one control image: at the bucket's size (Edit) or about 1 MP (Edit-2509)
        cw, ch = (size[0], size[1]) if not self.plus or self.match_target_res else vl.fit_area(PLUS_VAE_AREA, *size)
        ch, cw = ch // self.vae_scale_factor // 2, cw // self.vae_scale_factor // 2
        channels = self.transformer.config.in_channels
        noisy.extra.update(
            control_tokens=torch.randn(batch, ch * cw, channels, dtype=self.dtype),
            img_shapes=[[(1, h // 2, w // 2), (1, ch, cw)]] * batch,
        )
        # the prompt also holds the control image's tokens
        view = vl.fit_area(self.condition_area, *size)
        extra = vl.image_token_count(*view, getattr(self, "image_processor", None))
        length = cond.hidden_states.shape[1] + extra
        cond = PromptEmbeds(
            torch.randn(batch, length, cond.hidden_states.shape[-1], dtype=self.dtype),
            {"mask": torch.ones(batch, length, dtype=torch.long)},
        )
        return noisy, cond

    # --- previews ------------------------------------------------------------------------
    def preview_control_files(self, request: Any) -> tuple[Path, ...]:
        from aitk.config.prompts import preview_control_images

        found = (Path(p).expanduser() for p in preview_control_images(request, self.arch_names[0]))
        return tuple(path for path in found if path.is_file())  # a missing one skips the preview

    def preview_kwargs(self, request: Any) -> dict[str, Any]:
        from aitk.config.prompts import preview_control_images

        kwargs = super().preview_kwargs(request)
        paths = preview_control_images(request, self.arch_names[0])
        if paths:
            images = [self._preview_image(p, request) for p in paths]
        else:  # nothing to edit (`aitk validate` warns): a blank grey image
            from PIL import Image

            images = [Image.new("RGB", (request.width, request.height), (128, 128, 128))]
        kwargs["image"] = images if self.plus else images[0]
        return kwargs

    def _preview_image(self, path_text: str, request: Any) -> Any:
        from PIL import Image

        path = Path(path_text).expanduser()
        if not path.is_file():
            raise QwenEditInputError(f"sample ctrl_img: {path_text!r} is not a file")
        image = vl.open_rgb(path)
        # as ai-toolkit: Edit's control at the preview's size; Edit-2509's as it is
        return image if self.plus else image.resize((request.width, request.height), Image.BILINEAR)


class QwenImageEditPlusAdapter(QwenImageEditAdapter):
    """Qwen-Image-Edit-2509: up to three numbered control images per sample."""

    arch_names = ("qwen_image_edit_plus",)
    base_model_version = "qwen_image_edit_plus"
    modelspec_architecture = "qwen-image-edit-plus/lora"
    default_config_repo = "Qwen/Qwen-Image-Edit-2509"
    model_label = "Qwen-Image-Edit-2509"
    plus = True
    condition_area = PLUS_CONDITION_AREA
