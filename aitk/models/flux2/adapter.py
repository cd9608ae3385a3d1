"""FLUX.2: dev (`flux2`: Flux2Transformer2DModel with a guidance embedding, Mistral Small 3.1 as
text encoder) and Klein base 4B / 9B (`flux2_klein_4b` / `flux2_klein_9b`: no guidance embedding,
Qwen3-4B / Qwen3-8B), with the 32-channel FLUX.2 VAE; trained with flow matching as ai-toolkit does.

- Text: the pipeline's own encode_prompt (Flux2Pipeline: Mistral's chat template with the
  pipeline's system message, hidden layers 10, 20, 30 side by side; Flux2KleinPipeline: Qwen3's
  template, layers 9, 18, 27), every prompt padded to model.model_kwargs.max_sequence_length
  tokens (default 512, never more than the tokenizer allows) and given whole to the transformer,
  padding included, as the pipelines do.
- FLUX.2 dev's tokenizer/ is a PixtralProcessor, which transformers 5 builds only with
  torchvision installed. Prompts are text only and need its tokenizer alone, so when the processor
  cannot be built the folder's tokenizer is loaded instead (AutoTokenizer: the same vocabulary
  and chat template), with one log line; the vision tower is never run and is dropped on load.
- Latents (aitk.models.flux2.latents): normalised 2x2 patches of the VAE latents; x = (1 - s) x0
  + s e, target e - x0; the transformer gets timestep s. The shift types draw with FLUX's
  resolution-dependent mu (the scheduler's base / max shift over 256 .. 4096 image tokens), as
  ai-toolkit's training scheduler for FLUX.2; "weighted" weights each sample's loss.
- dev trains with guidance model.model_kwargs.guidance (default 1.0, ai-toolkit's); Klein none.
- Text-to-image only: FLUX.2's reference images (datasets' control_path, --ctrl_img) are not
  fed to the transformer in this version (`aitk validate` says control_path is unused).
- Sources: a diffusers folder or hub id; or the transformer alone (a transformer folder, or a
  .safetensors file through diffusers' from_single_file) with the other parts from
  model.extras_name_or_path (default: the family's hub repo).

LoRA files (comfyui / kohya): `diffusion_model.<original path>.lora_A.weight`, `.lora_B.weight`
and `.alpha` (aitk.models.flux2.keys; docs/lora-formats.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from aitk.models import diffusers_parts
from aitk.models.base import NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.flow_adapter import FlowTransformerAdapter
from aitk.models.flux2 import latents as f2
from aitk.models.flux2.keys import FUSED_QKV, flux2_lora_candidates, is_flux2_lora, lora_key_stem, module_for_stem

log = logging.getLogger(__name__)

#: FLUX.2's scheduler_config.json: the schedule when a model is bound without one (the plan)
DEFAULT_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
    "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
}
DEFAULT_TEXT_LENGTH = 512  # the pipelines' max_sequence_length


class Flux2InputError(ValueError):
    """A batch or setting this FLUX.2 model cannot train on."""


class Flux2Adapter(FlowTransformerAdapter):
    arch_names = ("flux2",)
    text_encoder_names = ("text_encoder",)
    lora_prefix = "diffusion_model."  # ai-toolkit's and ComfyUI's: diffusion_model.<original path>
    lora_weight_names = ("lora_A", "lora_B")  # ai-toolkit's FLUX.2 names
    lora_fused_weights = FUSED_QKV  # one LoRA on each fused img_attn / txt_attn qkv in comfyui-layout files
    lora_alpha_in_weights = True  # no .alpha in comfyui files: diffusers' loader reads them
    base_model_version = "flux2"  # ai-toolkit's
    modelspec_architecture = "flux-2-dev/lora"
    modelspec_implementation = "https://github.com/black-forest-labs/flux2"
    default_config_repo = "black-forest-labs/FLUX.2-dev"
    model_label = "FLUX.2 dev"
    pipeline_name = "Flux2Pipeline"
    vae_class_name = "AutoencoderKLFlux2"
    transformer_class_name = "Flux2Transformer2DModel"
    default_scheduler = DEFAULT_SCHEDULER
    input_error = Flux2InputError
    text_length_tag = "len"
    bypass_guidance_note = "not supported for FLUX.2 dev in this version; remove the key"
    card_tags = ("flux2", "flux")
    card_license = {
        "license": "other",
        "license_name": "flux-dev-non-commercial-license",
        "license_link": "https://huggingface.co/black-forest-labs/FLUX.2-dev",
    }
    #: guidance-distilled: previews take guidance_scale as the embedded guidance, no negative prompt
    distilled = True

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        return is_flux2_lora(tensors)

    # --- loading -------------------------------------------------------------------------
    def _single_file_extras(self) -> str:
        """model.model_kwargs.config, else the family's hub repo."""
        return str(self.model_cfg.model_kwargs.get("config") or self.default_config_repo)

    def _folder_extras(self) -> str | None:
        return self._single_file_extras()  # a transformer folder alone: as a single file

    def _load_parts(self, location: str) -> dict[str, Any]:
        """The VAE, text encoder and tokenizer; returns the scheduler config."""
        self.tokenizer = self._load_tokenizer(location)
        self.text_encoder = self._load_text_encoder(location)
        self.vae = self._load_vae(location)
        return diffusers_parts.scheduler_config(location, DEFAULT_SCHEDULER)

    def _load_tokenizer(self, location: str) -> Any:
        """The folder's PixtralProcessor, or its tokenizer when the processor cannot be built
        (module docstring): text-only prompts use the tokenizer's chat template alone."""
        from transformers import AutoProcessor, AutoTokenizer

        try:
            return AutoProcessor.from_pretrained(location, subfolder="tokenizer")
        except Exception as exc:  # ImportError without torchvision, ValueError / OSError for a plain tokenizer
            tokenizer = AutoTokenizer.from_pretrained(location, subfolder="tokenizer")
            log.info("FLUX.2 tokenizer: the processor was not built (%s); using its text tokenizer", exc)
            return tokenizer

    def _load_text_encoder(self, location: str) -> Any:
        from transformers import Mistral3ForConditionalGeneration

        encoder = Mistral3ForConditionalGeneration.from_pretrained(
            location, subfolder="text_encoder", torch_dtype=self.dtype
        )
        return self.keep_of_text_encoder("text_encoder", encoder)

    def keep_of_text_encoder(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        # text-only conditioning: the vision tower and its projector are never run
        module.model.vision_tower = None
        module.model.multi_modal_projector = None
        return module

    def bind_loaded(self, scheduler: Mapping[str, Any] | None, boundary_ratio: float | None = None) -> None:
        parts = self.loaded_parts()
        text_tokenizer = getattr(self.tokenizer, "tokenizer", self.tokenizer)  # a processor's own tokenizer
        self.bind(parts, PartConfigs.of_loaded(parts, {"tokenizer": text_tokenizer}, scheduler, boundary_ratio))

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        self.max_sequence_length = self._text_length(DEFAULT_TEXT_LENGTH)
        self.has_guidance = bool(configs.part("transformer").get("guidance_embeds", self.distilled))
        self.train_guidance = float(self.model_cfg.model_kwargs.get("guidance", 1.0))

    def network_candidates(self, include_conv: bool) -> list[str]:
        return flux2_lora_candidates(self.transformer)  # no conv layers to add for LoCon

    #: a typical wrapped module, for the tools' messages (aitk.tools.layout)
    lora_example_module = "transformer_blocks.0.attn.to_out.0"

    def lora_key_stem(self, module_name: str) -> str:
        return lora_key_stem(module_name)

    def lora_module_for_stem(self, stem: str) -> str | None:
        """Inverse of `lora_key_stem` (the tools read files back through it)."""
        return module_for_stem(stem)

    # --- encoding ------------------------------------------------------------------------
    def _pipeline_class(self) -> type:
        from aitk.models.flux2.previews import dev_pipeline_class

        return dev_pipeline_class()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        # the pipeline's own encoder, so training sees exactly what previews and other tools see
        hidden, _ = self._text_pipeline().encode_prompt(
            prompt=list(prompts), device=self.device, max_sequence_length=self.max_sequence_length
        )
        return PromptEmbeds(hidden)

    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        if self.distilled:  # guidance-distilled: no unconditional branch
            return {"prompt_embeds": positive.hidden_states}
        return {"prompt_embeds": positive.hidden_states, "negative_prompt_embeds": negative.hidden_states}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return f2.encode_latents(self.vae, pixels, self.device)

    def latent_space_id(self) -> str:
        source = self.model_cfg.vae_path or self._parts_source()
        return f"flux2-vae:{self.vae.config.latent_channels}:{source}"

    # --- training objective --------------------------------------------------------------
    def shift_kwargs(self, height: int, width: int) -> dict[str, float]:
        from aitk.models.flux.latents import image_seq_shift

        return {"mu": image_seq_shift(height * width, self.scheduler_config)}  # one token per latent position

    def _check_latent_size(self, height: int, width: int) -> None:
        """Any size: the latents are 2x2 patches of the VAE's already."""

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        config = self.transformer.config
        step = self.vae_scale_factor * 2  # one token per 2x2 patch of latents
        noisy = self._example_noisy(torch.randn(batch, config.in_channels, size[1] // step, size[0] // step))
        cond = PromptEmbeds(torch.randn(batch, self.max_sequence_length, config.joint_attention_dim, dtype=self.dtype))
        return noisy, cond

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        x = batch.noisy_latents.to(self.dtype)
        b, _, h, w = x.shape
        tokens, ids = f2.pack(x)
        hidden = cond.hidden_states.to(x.device, self.dtype)
        guidance = torch.full((b,), self.train_guidance, device=x.device, dtype=torch.float32) if self.has_guidance else None
        out = self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=hidden,
            timestep=(batch.timesteps / 1000.0).to(x.device, self.dtype),
            img_ids=ids,
            txt_ids=f2.text_ids(hidden),
            guidance=guidance,
            return_dict=False,
        )[0]
        return f2.unpack(out, h, w)

    # --- previews ------------------------------------------------------------------------
    def _unpack_preview(self, latents: torch.Tensor) -> torch.Tensor:
        height, width = self._preview_pixel_size(latents.shape[1])
        step = self.vae_scale_factor * 2
        return f2.unpack(latents, height // step, width // step)

    def _decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        return f2.decode_latents(self.vae, latents)  # also Klein's VAE-space latents


class Flux2KleinAdapter(Flux2Adapter):
    """FLUX.2 Klein base: no guidance embedding, Qwen3 text encoder, classifier-free guidance in
    previews (Flux2KleinPipeline)."""

    distilled = False
    pipeline_name = "Flux2KleinPipeline"
    card_tags = ("flux2", "flux2-klein", "flux")

    def _pipeline_class(self) -> type:
        from aitk.models.flux2.previews import klein_pipeline_class

        return klein_pipeline_class()

    def _load_tokenizer(self, location: str) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(location, subfolder="tokenizer")

    def _load_text_encoder(self, location: str) -> Any:
        from transformers import Qwen3ForCausalLM

        return Qwen3ForCausalLM.from_pretrained(location, subfolder="text_encoder", torch_dtype=self.dtype)


class Flux2Klein4BAdapter(Flux2KleinAdapter):
    arch_names = ("flux2_klein_4b",)
    base_model_version = "flux2_klein_4b"
    modelspec_architecture = "flux-2-klein-4b/lora"
    default_config_repo = "black-forest-labs/FLUX.2-klein-base-4B"
    model_label = "FLUX.2 Klein 4B"
    bypass_guidance_note = "not supported for FLUX.2 Klein 4B in this version; remove the key"
    card_license = {"license": "apache-2.0"}


class Flux2Klein9BAdapter(Flux2KleinAdapter):
    arch_names = ("flux2_klein_9b",)
    base_model_version = "flux2_klein_9b"
    modelspec_architecture = "flux-2-klein-9b/lora"
    default_config_repo = "black-forest-labs/FLUX.2-klein-base-9B"
    model_label = "FLUX.2 Klein 9B"
    bypass_guidance_note = "not supported for FLUX.2 Klein 9B in this version; remove the key"
    card_license = {
        "license": "other",
        "license_name": "flux-non-commercial-license",
        "license_link": "https://huggingface.co/black-forest-labs/FLUX.2-klein-base-9B",
    }
