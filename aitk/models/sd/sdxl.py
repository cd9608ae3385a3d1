"""Stable Diffusion XL: UNet2DConditionModel with text_time added conditioning, two CLIP text
encoders, an AutoencoderKL that runs in fp32; epsilon or v-prediction.

Loading, the noise objective (min-SNR, noise offset, timestep bias) and LoRA targets are SD 1.5's;
SDXL adds the second text encoder (its pooled output conditions the UNet) and the six time ids
(original size, crop top-left, target size) per sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from aitk.config.schema import TrainConfig
from aitk.models.base import BatchContext, NoisyBatch, PromptEmbeds
from aitk.models.sd.adapter import SD15Adapter

# Component configs of a single-file checkpoint when no local config folder is given.
SDXL_CONFIG_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
#: PromptEmbeds.extra key of text_encoder_2's pooled (projected) output
POOLED = "pooled"
#: NoisyBatch.extra key of the (B, 6) time ids
TIME_IDS = "time_ids"

Size = tuple[int, int]


def sdxl_time_ids(
    batch: int,
    latent_hw: Size,
    vae_scale_factor: int,
    context: BatchContext | None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """SDXL's add_time_ids per sample, (B, 6) float32: original (h, w), crop (top, left), target (h, w).

    Taken from `context`; what it lacks falls back to what the pipeline assumes at inference:
    target = the latent size in pixels, original = target, no crop.
    """
    ctx = context or BatchContext()
    pixels = (latent_hw[0] * vae_scale_factor, latent_hw[1] * vae_scale_factor)

    def per_sample(values: Sequence[Sequence[int]], default: list[Size], what: str) -> list[Size]:
        if not values:
            return default
        if len(values) != batch:
            raise ValueError(f"BatchContext.{what} has {len(values)} entries for a batch of {batch}")
        return [(int(v[0]), int(v[1])) for v in values]

    targets = per_sample(ctx.target_sizes, [pixels] * batch, "target_sizes")
    originals = per_sample(ctx.original_sizes, targets, "original_sizes")
    crops = per_sample(ctx.crops_top_left, [(0, 0)] * batch, "crops_top_left")
    rows = [[*o, *c, *t] for o, c, t in zip(originals, crops, targets)]
    return torch.tensor(rows, dtype=torch.float32, device=device)


class SDXLAdapter(SD15Adapter):
    arch_names = ("sdxl",)
    bucket_divisibility = 64
    lora_prefix = "lora_unet"
    diffusers_lora_prefix = "unet"
    base_model_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"
    model_label = "Stable Diffusion XL"
    default_config_repo = SDXL_CONFIG_REPO
    card_tags = ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")
    card_license = {"license": "openrail++"}
    folder_parts = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet", "vae", "scheduler")

    tokenizer_2: Any
    text_encoder_2: Any

    # --- loading (SD 1.5's, with the second text encoder) ---------------------------------
    def _load_text_parts(self, location: str) -> None:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        super()._load_text_parts(location)
        self.tokenizer_2 = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer_2")
        self.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            location, subfolder="text_encoder_2", torch_dtype=self.dtype
        )

    def _text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    text_encoder_names = ("text_encoder", "text_encoder_2")
    text_encoder_lora_prefixes = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}  # kohya's SDXL names

    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        return {
            "prompt_embeds": positive.hidden_states,
            "pooled_prompt_embeds": positive.extra[POOLED],
            "negative_prompt_embeds": negative.hidden_states,
            "negative_pooled_prompt_embeds": negative.extra[POOLED],
        }

    def _single_file_pipeline(self, path: Path, config: str) -> Any:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline.from_single_file(str(path), config=config, add_watermarker=False)

    def _take_text_parts(self, pipe: Any) -> None:
        super()._take_text_parts(pipe)
        self.tokenizer_2, self.text_encoder_2 = pipe.tokenizer_2, pipe.text_encoder_2

    def _pipeline(self, scheduler: Any) -> Any:
        """StableDiffusionXLPipeline over the live modules (the UNet as the network wraps it);
        SD 1.5's sample_pipeline builds previews with it."""
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=self.unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,  # what SDXL's own model_index.json says
            add_watermarker=False,  # previews stop at latents; the watermark is a pixel operation
        )

    # --- encoding ------------------------------------------------------------------------
    # no torch.no_grad() here: with train.train_text_encoder the conditioner encodes with gradients
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        # The pipeline's own encoding (penultimate hidden states of both encoders, concatenated;
        # text_encoder_2's projected pooled output), so training sees exactly what previews and
        # users' pipelines feed the UNet.
        # One prompt per call: the pooled projection is a (B, width) matmul whose result for one
        # row changes with B (measured on CPU), and the trainer encodes whichever captions its
        # cache lacks, so batched encoding would make a resumed run drift from a straight one.
        pipe = self._pipeline(self.noise_scheduler)
        hidden, pooled = [], []
        for prompt in prompts:
            one, _, one_pooled, _ = pipe.encode_prompt(
                [prompt], device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            hidden.append(one)
            pooled.append(one_pooled)
        return PromptEmbeds(torch.cat(hidden), {POOLED: torch.cat(pooled)})

    # encode_images / decode_latents are SD 1.5's (fp32 VAE), which apply these statistics
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, std) of the latent channels when the VAE config has them (some SDXL-architecture
        models normalise latents this way; the SDXL pipeline undoes it before decoding)."""
        cfg = self.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is None or std is None:
            return None
        shape = (1, len(mean), 1, 1)
        return (
            torch.tensor(mean, dtype=like.dtype, device=like.device).view(shape),
            torch.tensor(std, dtype=like.dtype, device=like.device).view(shape),
        )

    def latent_space_id(self) -> str:
        return "sdxl-" + super().latent_space_id()

    # --- training objective --------------------------------------------------------------
    def make_noisy_batch(
        self,
        latents: torch.Tensor,
        train_cfg: TrainConfig,
        generator: torch.Generator | None,
        context: BatchContext | None = None,
    ) -> NoisyBatch:
        batch = super().make_noisy_batch(latents, train_cfg, generator, context)
        batch.extra[TIME_IDS] = sdxl_time_ids(
            latents.shape[0], (latents.shape[-2], latents.shape[-1]), self.vae_scale_factor, context,
            device=latents.device,
        )
        return batch

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        noisy, cond = super().example_batch(batch, size, frames, expert=expert, with_controls=with_controls)
        config = self.unet.config
        # text_time embedding input = pooled text embedding + 6 time ids of addition_time_embed_dim each
        pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        cond.extra[POOLED] = torch.randn(batch, pooled_dim, dtype=self.dtype)
        target_size = (size[1], size[0])  # BatchContext sizes are (height, width)
        noisy.extra[TIME_IDS] = sdxl_time_ids(
            batch, (size[1] // self.vae_scale_factor, size[0] // self.vae_scale_factor), self.vae_scale_factor,
            BatchContext(target_sizes=[target_size] * batch),
        )
        return noisy, cond

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        time_ids = batch.extra.get(TIME_IDS)
        if time_ids is None:  # a batch built elsewhere: the pipeline's defaults
            time_ids = sdxl_time_ids(
                batch.noisy_latents.shape[0], tuple(batch.noisy_latents.shape[-2:]), self.vae_scale_factor,
                None, device=batch.noisy_latents.device,
            )
        return self.unet(
            batch.noisy_latents,
            batch.timesteps,
            encoder_hidden_states=cond.hidden_states.to(self.dtype),
            added_cond_kwargs={"text_embeds": cond.extra[POOLED].to(self.dtype), "time_ids": time_ids.to(self.dtype)},
        ).sample
