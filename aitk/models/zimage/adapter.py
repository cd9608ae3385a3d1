"""Z-Image (Turbo, base, De-Turbo): ZImageTransformer2DModel + FLUX.1's 16-channel VAE + Qwen3.

Training is rectified flow (aitk.models.flow_matching): x = (1 - sigma) * x0 + sigma * noise,
target = noise - x0, NoisyBatch.timesteps = 1000 * sigma. The transformer runs the other way round,
as ZImagePipeline drives it: it gets t = 1 - sigma and predicts x0 - noise, so `predict` returns
its output negated. timestep_type "shift" (and "flux_shift" / "lumina2_shift", drawn alike) uses
ai-toolkit's fixed Z-Image shift of 3 (no resolution-dependent shift); "weighted" draws uniform
sigmas and weights each sample's loss (aitk.models.flow_timestep_types).

Text: Qwen3's second-to-last hidden states of the prompt wrapped in its chat template (the
pipeline's own encode_prompt), only the real tokens (no padding). PromptEmbeds keeps them padded to
max_sequence_length with a "mask" so cached prompts of any length batch together; `predict` hands
the transformer each prompt's real tokens, as the pipeline does.

Loading: a diffusers folder or hub id (Tongyi-MAI/Z-Image-Turbo, Tongyi-MAI/Z-Image), a
transformer-only folder / hub repo (ostris/Z-Image-De-Turbo: its transformer/), or a single
.safetensors transformer file (diffusers' from_single_file); the VAE, text encoder, tokenizer and
scheduler come from model.extras_name_or_path when set, else from the model itself (a single file:
Tongyi-MAI/Z-Image-Turbo, as ai-toolkit does).

- model.assistant_lora_path (aitk.models.assistant): the Turbo training adapter, read by
  ZImagePipeline's LoRA loader; on while training, off for previews.
- model.model_kwargs.max_sequence_length: Qwen3 tokens per prompt (default 512, the pipeline's).
- Previews take ai-toolkit's guidance convention: sample guidance_scale 1 is no guidance (Turbo),
  g > 1 is classifier-free guidance of scale g with the negative prompt (ZImagePipeline's own
  guidance_scale is g - 1).

LoRA files (comfyui / kohya): `diffusion_model.<module path>.lora_A.weight`, `.lora_B.weight` and
`.alpha`, the names ComfyUI maps for Z-Image (comfy.utils.z_image_to_diffusers) and diffusers'
ZImagePipeline.load_lora_weights converts (docs/lora-formats.md).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import torch

from aitk.models import diffusers_parts
from aitk.models.base import NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.flow_adapter import FlowTransformerAdapter

#: ai-toolkit's training (and preview) scheduler for Z-Image: a fixed shift, no dynamic shifting
TRAIN_SHIFT = 3.0
DEFAULT_SCHEDULER = {"num_train_timesteps": 1000, "shift": TRAIN_SHIFT, "use_dynamic_shifting": False}
DEFAULT_TEXT_LENGTH = 512  # ZImagePipeline's max_sequence_length
#: where the VAE, text encoder and tokenizer of a single-file transformer come from (ai-toolkit's choice)
SINGLE_FILE_EXTRAS = "Tongyi-MAI/Z-Image-Turbo"
SINGLE_FILE_SUFFIXES = diffusers_parts.TRANSFORMER_FILE_SUFFIXES
PATCH = 2  # the transformer's 2x2 patches ("2-1" embedder)
#: a Z-Image LoRA key stem: the attention of a block under its diffusers names, in ComfyUI's
#: (`diffusion_model.`), diffusers' (`transformer.`), kohya's (`lora_unet_`) or a bare form; Lumina 2's
#: files name the same blocks' attention `attention.qkv` / `attention.out` or `attn.to_q`
ZIMAGE_ATTENTION_STEM = re.compile(
    r"^(?:diffusion_model\.|transformer\.|lora_unet_)?(?:layers|noise_refiner|context_refiner)[._]\d+[._]"
    r"attention[._]to_(?:q|k|v|out)(?=[._])"
)


class ZImageInputError(ValueError):
    """A batch or setting this Z-Image model cannot train on."""


def zimage_lora_candidates(transformer: torch.nn.Module) -> list[str]:
    """Default LoRA targets: every Linear of the main transformer layers (attention, feed-forward
    and AdaLN modulation), as ai-toolkit's LoRA on Z-Image ("layers" blocks only; the refiners and
    embedders stay frozen)."""
    from aitk.networks.lora import eligible_modules

    return [name for name in eligible_modules(transformer) if name.startswith("layers.")]


@functools.cache
def preview_pipeline_class() -> type:
    """ZImagePipeline with ai-toolkit's preview conventions: guidance_scale g means classifier-free
    guidance of scale g (1 = none), and sizes are floored to the 16 px the pipeline requires."""
    from diffusers import ZImagePipeline

    class ZImagePreviewPipeline(ZImagePipeline):
        def __call__(self, *args: Any, guidance_scale: float = 1.0, height: int | None = None,
                     width: int | None = None, **kwargs: Any) -> Any:
            step = self.vae_scale_factor * 2
            height = max(step, height // step * step) if height else None
            width = max(step, width // step * step) if width else None
            return super().__call__(*args, guidance_scale=max(0.0, float(guidance_scale) - 1.0),
                                    height=height, width=width, **kwargs)

    return ZImagePreviewPipeline


def padded_prompts(embeds: list[torch.Tensor], length: int) -> PromptEmbeds:
    """Per-prompt hidden states (L_i, D) -> PromptEmbeds (B, length, D) with a bool "mask" of the
    real tokens."""
    dim = embeds[0].shape[-1]
    hidden = embeds[0].new_zeros(len(embeds), length, dim)
    mask = torch.zeros(len(embeds), length, dtype=torch.bool, device=embeds[0].device)
    for i, e in enumerate(embeds):
        hidden[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = True
    return PromptEmbeds(hidden, {"mask": mask})


def prompt_list(cond: PromptEmbeds, device: Any, dtype: torch.dtype) -> list[torch.Tensor]:
    """Each prompt's real tokens (what the transformer and the pipeline take). A mask of fake
    tensors (the plan's example batches, made full length) has no values: every position counts."""
    from torch._subclasses.fake_tensor import is_fake

    hidden = cond.hidden_states.to(device, dtype)
    mask = cond.extra.get("mask")
    if mask is None or is_fake(mask):
        return list(hidden.unbind(0))
    mask = mask.to(device).bool()
    return [hidden[i][mask[i]] for i in range(hidden.shape[0])]


class ZImageAdapter(FlowTransformerAdapter):
    arch_names = ("zimage",)
    text_encoder_names = ("text_encoder",)
    lora_prefix = "diffusion_model."  # ComfyUI's Z-Image LoRA names: diffusion_model.<module path>
    lora_weight_names = ("lora_A", "lora_B")
    base_model_version = "zimage"  # ai-toolkit's
    modelspec_architecture = "z-image/lora"
    model_label = "Z-Image"
    pipeline_name = "ZImagePipeline"
    transformer_class_name = "ZImageTransformer2DModel"
    single_file_extras = SINGLE_FILE_EXTRAS
    default_scheduler = DEFAULT_SCHEDULER
    input_error = ZImageInputError
    latent_patch = PATCH
    text_length_tag = "qwen3"
    loads_assistant_lora = True
    bypass_guidance_note = "Z-Image has no guidance embedding; remove the key"
    card_tags = ("z-image",)
    card_license = {"license": "apache-2.0"}  # Z-Image Turbo, Z-Image and De-Turbo

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        return any(ZIMAGE_ATTENTION_STEM.match(key) for key in tensors)

    # --- loading -------------------------------------------------------------------------
    def _load_parts(self, location: str) -> dict[str, Any]:
        """The VAE, text encoder and tokenizer; returns the scheduler config (ai-toolkit's
        Z-Image schedule where the source has none)."""
        from transformers import Qwen3Model

        self._load_folder_parts(location, Qwen3Model)
        return diffusers_parts.scheduler_config(location, DEFAULT_SCHEDULER)

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        self.max_sequence_length = self._text_length(DEFAULT_TEXT_LENGTH)

    def network_candidates(self, include_conv: bool) -> list[str]:
        return zimage_lora_candidates(self.transformer)  # no conv layers to add for LoCon

    # --- encoding ------------------------------------------------------------------------
    def _pipeline_class(self) -> type:
        return preview_pipeline_class()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        # the pipeline's own encoder: chat template, hidden_states[-2], real tokens only
        embeds, _ = self._text_pipeline().encode_prompt(
            prompt=list(prompts), device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return padded_prompts(embeds, self.max_sequence_length)

    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        return {
            "prompt_embeds": prompt_list(positive, self.device, self.dtype),
            "negative_prompt_embeds": prompt_list(negative, self.device, self.dtype),
        }

    def _parts_source(self) -> str:
        return getattr(self, "parts_source", self.model_cfg.name_or_path)

    # --- training objective --------------------------------------------------------------
    def shift_kwargs(self, height: int, width: int) -> dict[str, float]:
        return {"shift": TRAIN_SHIFT}  # ai-toolkit's fixed Z-Image shift

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        config = self.transformer.config
        noisy = self._example_noisy(self._example_latents(batch, size, config.in_channels))
        # every position a real token (prompt_list reads no values off a fake mask)
        return noisy, self._example_prompts(batch, config.cap_feat_dim, torch.bool)

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        x = batch.noisy_latents.to(self.dtype)
        # the transformer's time runs from 0 (noise) to 1 (clean), in float32 as the pipeline gives it
        t = 1.0 - batch.timesteps.to(x.device, torch.float32) / 1000.0
        out = self.transformer(
            list(x.unsqueeze(2).unbind(0)),  # (C, frames=1, h, w) per sample
            t,
            prompt_list(cond, x.device, self.dtype),
            return_dict=False,
        )[0]
        return -torch.stack(out).squeeze(2)
