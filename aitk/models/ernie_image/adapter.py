"""ERNIE-Image (baidu/ERNIE-Image; the 8-step ERNIE-Image-Turbo loads alike): a single-stream
ErnieImageTransformer2DModel, FLUX.2's 32-channel VAE and a Mistral 3 (Ministral 3B) text encoder.

Training is rectified flow (aitk.models.flow_matching): x = (1 - sigma) * x0 + sigma * noise,
target = noise - x0, and the transformer takes the timestep 1000 * sigma and predicts the target,
as ErnieImagePipeline steps with it. timestep_type "shift" (and "flux_shift" / "lumina2_shift",
drawn alike) uses ai-toolkit's fixed ERNIE-Image training shift of 3; "weighted" draws uniform
sigmas and weights each sample's loss. Previews use the model's own scheduler (baidu's: shift 4).

Latents: the VAE's latents (mode) in 2x2 patches (128 channels at 1/16 of the image), normalised
by the VAE's batch-norm statistics with the pipeline's eps of 1e-5 (not the config's).

Text: the pipeline's own encode_prompt: each prompt alone, `<s>` + its tokens, no chat template,
the text model's second-to-last hidden states of the real tokens. The real tokenizer is a plain
text tokenizer (no image processor, so nothing needs torchvision); the encoder's vision tower is
dropped on load, as prompts are text only. Prompts are cut to model.model_kwargs.max_sequence_length
tokens (default 512; the pipeline keeps up to the tokenizer's limit): the text model is causal, so
cutting its hidden states equals cutting the tokens. PromptEmbeds keeps each prompt's tokens with a
bool "mask"; the transformer gets them right-padded with their lengths (it masks the padding and
places the image after each prompt's own length), so a batch predicts as each prompt alone.

Loading: a diffusers folder or hub id; or the transformer alone (a transformer folder, or a
.safetensors file through diffusers' from_single_file) with the VAE, text encoder, tokenizer and
scheduler from model.extras_name_or_path (default for a single file: baidu/ERNIE-Image).

LoRA files (comfyui / kohya): `diffusion_model.<diffusers module path>.lora_A.weight`,
`.lora_B.weight` and `.alpha`, the names ai-toolkit writes, ComfyUI's ERNIE-Image model has (the
same module paths) and ErnieImagePipeline.load_lora_weights converts (docs/lora-formats.md).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from aitk.models import diffusers_parts
from aitk.models.base import NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.flow_adapter import FlowTransformerAdapter

#: ai-toolkit's training shift for ERNIE-Image (its train scheduler: shift 3, no dynamic shifting)
TRAIN_SHIFT = 3.0
#: baidu/ERNIE-Image's scheduler: previews of a model bound without one (the plan)
DEFAULT_SCHEDULER = {"num_train_timesteps": 1000, "shift": 4.0, "use_dynamic_shifting": False}
DEFAULT_TEXT_LENGTH = 512
SINGLE_FILE_EXTRAS = "baidu/ERNIE-Image"
#: the batch-norm eps ErnieImagePipeline normalises latents with (its VAE config says 1e-4)
BN_EPS = 1e-5
#: an ERNIE-Image LoRA names the attention of its `layers` blocks `self_attention.to_q` (Z-Image's
#: and Lumina 2's blocks name theirs `attention`), in ours / diffusers' / kohya's names
ERNIE_STARTS = ("diffusion_model.layers.", "transformer.layers.", "lora_unet_layers_")
ERNIE_PARTS = (".self_attention.to_q.", "_self_attention_to_q")


class ErnieImageInputError(ValueError):
    """A batch or setting this ERNIE-Image model cannot train on."""


@functools.cache
def preview_pipeline_class() -> type:
    """ErnieImagePipeline that floors sizes to the 16 px it requires and cuts each prompt, as
    training does, to `max_sequence_length` tokens (a keyword the pipeline itself does not take)."""
    from diffusers import ErnieImagePipeline

    class ErnieImagePreviewPipeline(ErnieImagePipeline):
        text_limit: int | None = None

        def encode_prompt(self, prompt: Any, device: torch.device, num_images_per_prompt: int = 1) -> list:
            hidden = super().encode_prompt(prompt, device, num_images_per_prompt)
            return [h[: self.text_limit] for h in hidden] if self.text_limit else hidden

        def __call__(self, *args: Any, height: int = 1024, width: int = 1024, max_sequence_length: int | None = None,
                     **kwargs: Any) -> Any:
            step = self.vae_scale_factor
            self.text_limit = max_sequence_length
            return super().__call__(*args, height=max(step, height // step * step),
                                    width=max(step, width // step * step), **kwargs)

    return ErnieImagePreviewPipeline


def prompt_lengths(cond: PromptEmbeds) -> torch.Tensor:
    """Each prompt's token count (B,) from its "mask"; all full length without a mask or with a
    mask of fake tensors (the plan's example batches have no values)."""
    from torch._subclasses.fake_tensor import is_fake

    hidden, mask = cond.hidden_states, cond.extra.get("mask")
    if mask is None or is_fake(mask):
        return torch.full((hidden.shape[0],), hidden.shape[1], dtype=torch.long, device=hidden.device)
    return mask.to(hidden.device).sum(1).long()


def prompt_tokens(cond: PromptEmbeds, device: Any, dtype: torch.dtype) -> list[torch.Tensor]:
    """Each prompt's own tokens (L_i, D): what the pipeline takes as prompt_embeds."""
    hidden = cond.hidden_states.to(device, dtype)
    return [hidden[i, :n] for i, n in enumerate(prompt_lengths(cond).tolist())]


class ErnieImageAdapter(FlowTransformerAdapter):
    arch_names = ("ernie_image",)
    text_encoder_names = ("text_encoder",)
    lora_prefix = "diffusion_model."  # ai-toolkit's and ComfyUI's: diffusion_model.<module path>
    lora_weight_names = ("lora_A", "lora_B")
    lora_alpha_in_weights = True  # no .alpha in comfyui files: diffusers' loader reads them
    base_model_version = "ernie_image"  # ai-toolkit's
    modelspec_architecture = "ernie-image/lora"
    model_label = "ERNIE-Image"
    model_article = "an"
    pipeline_name = "ErnieImagePipeline"
    transformer_class_name = "ErnieImageTransformer2DModel"
    single_file_extras = SINGLE_FILE_EXTRAS
    vae_class_name = "AutoencoderKLFlux2"
    default_scheduler = DEFAULT_SCHEDULER
    input_error = ErnieImageInputError
    latent_patch = 1  # the latents are 2x2 patches already; the transformer's own patch is 1
    text_length_tag = "mistral3"
    bypass_guidance_note = "ERNIE-Image has no guidance embedding; remove the key"
    card_tags = ("ernie-image",)
    card_license = {"license": "apache-2.0"}  # baidu/ERNIE-Image and ERNIE-Image-Turbo

    text_encoder: Any
    tokenizer: Any

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        return any(k.startswith(ERNIE_STARTS) and any(p in k for p in ERNIE_PARTS) for k in tensors)

    # --- loading -------------------------------------------------------------------------
    def keep_of_text_encoder(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        module.vision_tower = None  # text-only prompts never run it
        module.multi_modal_projector = None
        return module

    def _load_parts(self, location: str) -> dict[str, Any]:
        """The tokenizer, text encoder (its vision tower dropped) and VAE; returns the scheduler
        config (baidu's where the source has none)."""
        from transformers import Mistral3Model

        self._load_folder_parts(location, Mistral3Model)
        return diffusers_parts.scheduler_config(location, DEFAULT_SCHEDULER)

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        self.max_sequence_length = self._text_length(DEFAULT_TEXT_LENGTH)

    def _vae_scale(self, configs: PartConfigs) -> int:
        # the pipeline's rule: 2 ** blocks, the VAE's 8x and the 2x2 patches together
        blocks = configs.part("vae").get("block_out_channels") or (0,) * 4
        return 2 ** len(blocks)

    def network_candidates(self, include_conv: bool) -> list[str]:
        """Every Linear of the `layers` blocks: ai-toolkit's ERNIE-Image LoRA (its transformer
        blocks are `layers`; the embedders, AdaLN modulation and output layer stay frozen)."""
        from aitk.networks.lora import eligible_modules

        return [name for name in eligible_modules(self.transformer) if name.startswith("layers.")]

    # --- encoding ------------------------------------------------------------------------
    def _pipeline_class(self) -> type:
        return preview_pipeline_class()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        # the pipeline's own encoder (each prompt alone, hidden_states[-2]), cut to the limit
        hidden = self._text_pipeline().encode_prompt(list(prompts), self.device)
        items = [h[: self.max_sequence_length].unsqueeze(0) for h in hidden]
        return PromptEmbeds.cat([PromptEmbeds(h, {"mask": torch.ones(h.shape[:2], dtype=torch.bool)}) for h in items])

    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        return {
            "prompt_embeds": prompt_tokens(positive, self.device, self.dtype),
            "negative_prompt_embeds": prompt_tokens(negative, self.device, self.dtype),
        }

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        from diffusers import ErnieImagePipeline

        from aitk.models import common

        latents = ErnieImagePipeline._patchify_latents(common.encode_mode(self.vae, pixels, self.device))
        mean, std = self._bn_stats(latents)
        return (latents - mean) / std

    def _decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        from diffusers import ErnieImagePipeline

        mean, std = self._bn_stats(latents)
        return self.vae.decode(ErnieImagePipeline._unpatchify_latents(latents * std + mean)).sample

    def _bn_stats(self, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(ref.device, ref.dtype)
        return mean, torch.sqrt(bn.running_var.view(1, -1, 1, 1) + BN_EPS).to(ref.device, ref.dtype)

    def latent_space_id(self) -> str:
        source = self.model_cfg.vae_path or self._parts_source()
        return f"ernie-image-vae:{self.vae.config.latent_channels}:bn{BN_EPS}:{source}"

    # --- training objective --------------------------------------------------------------
    def shift_kwargs(self, height: int, width: int) -> dict[str, float]:
        return {"shift": TRAIN_SHIFT}

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        return self._example_text_to_image(batch, size, "text_in_dim", torch.bool)

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        from torch._subclasses.fake_tensor import is_fake

        x = batch.noisy_latents.to(self.dtype)
        lengths = prompt_lengths(cond).to(x.device)
        text = cond.hidden_states.to(x.device, self.dtype)
        if not is_fake(lengths):  # the batch's longest prompt, as the pipeline pads them
            text = text[:, : int(lengths.max())]
        return self.transformer(
            hidden_states=x,
            timestep=batch.timesteps.to(x.device, self.dtype).expand(x.shape[0]),
            text_bth=text,
            text_lens=lengths,
            return_dict=False,
        )[0]
