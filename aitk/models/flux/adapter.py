"""FLUX.1 (dev, schnell, Kontext): FluxTransformer2DModel + 16-channel VAE + CLIP-L (pooled) + T5.

Training is rectified flow (aitk.models.flow_matching): x = (1 - sigma) * x0 + sigma * noise,
target = noise - x0, the transformer gets timestep sigma (diffusers' Flux transformer multiplies
by 1000 itself; NoisyBatch.timesteps holds 1000 * sigma, the scheduler convention).
timestep_type "shift" (and ai-toolkit's "flux_shift" / "lumina2_shift", the same draw there) uses
FLUX's resolution-dependent time shift, mu = FluxPipeline's calculate_shift(image token count) with
the scheduler's base/max shift and sequence lengths; "weighted" draws uniform sigmas and weights
each sample's loss (aitk.models.flow_timestep_types).

Latents stay (B, 16, h, w) in NoisyBatch and in predictions, so loss masks apply as for other
models; `predict` packs them into 2x2-patch tokens with the ids FluxPipeline builds.

- dev (guidance-distilled, transformer.config.guidance_embeds): trained with guidance
  model.model_kwargs.guidance (default 1.0). schnell has no guidance embedding.
  train.bypass_guidance_embedding (Flex.1): training steps leave the guidance embedding out of the
  conditioning vector (timestep + pooled text only; its output is replaced by zeros while the
  transformer runs), so the guidance embedder is neither used nor trained; previews keep it.
- model.assistant_lora_path: a LoRA (any format FluxPipeline.lora_state_dict reads) loaded by
  diffusers as the peft adapter "assistant": active while training, switched off inside
  `preview_context()`, never part of the trained network or the saved file.
- Kontext (FluxKontextAdapter, aitk.models.flux.kontext): each sample's control image is
  VAE-encoded, packed and appended to the image tokens with ids whose first axis is 1; only the
  target tokens are predicted and compared.

LoRA files (save_format comfyui / kohya): `transformer.<module path>.lora_A.weight`,
`.lora_B.weight` and `.alpha`: diffusers' FluxPipeline.load_lora_weights reads the per-module
alpha only next to lora_A / lora_B (with lora_down / lora_up it drops it), and ComfyUI maps the
same names (docs/lora-formats.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from aitk.config.schema import TrainConfig
from aitk.models import diffusers_parts
from aitk.models.assistant import ASSISTANT_ADAPTER
from aitk.models.base import BatchContext, NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.flow_adapter import FlowTransformerAdapter
from aitk.models.flux.keys import flux_lora_candidates, is_flux_lora
from aitk.models.flux.latents import (
    FluxInputError,
    image_ids,
    image_seq_shift,
    pack_latents,
    unpack_latents,
)

__all__ = ["ASSISTANT_ADAPTER", "FOLDER_PARTS", "SINGLE_FILE_SUFFIXES", "FluxAdapter", "guidance_embedding_bypassed"]

SINGLE_FILE_SUFFIXES = set(diffusers_parts.CHECKPOINT_SUFFIXES)
FOLDER_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


@contextmanager
def guidance_embedding_bypassed(transformer: torch.nn.Module) -> Iterator[None]:
    """While open, the guidance embedder's output is zeros: the conditioning vector is timestep +
    pooled text embedding only (train.bypass_guidance_embedding), and no gradient reaches it."""
    embedder = getattr(getattr(transformer, "time_text_embed", None), "guidance_embedder", None)
    if embedder is None:
        raise FluxInputError("train.bypass_guidance_embedding: this transformer has no guidance embedder")
    handle = embedder.register_forward_hook(lambda _module, _args, output: torch.zeros_like(output))
    try:
        yield
    finally:
        handle.remove()


class FluxAdapter(FlowTransformerAdapter):
    arch_names = ("flux",)
    text_encoder_names = ("text_encoder", "text_encoder_2")
    lora_prefix = "transformer."  # dotted module paths: transformer.<path>
    #: lora_A / lora_B names next to `.alpha` (read by aitk.networks.export.save_lora)
    lora_weight_names = ("lora_A", "lora_B")
    base_model_version = "flux1"
    modelspec_architecture = "flux-1-dev/lora"
    #: modelspec architecture when the loaded transformer has no guidance embedding
    schnell_architecture = "flux-1-schnell/lora"
    modelspec_implementation = "https://github.com/black-forest-labs/flux"
    model_label = "FLUX.1"
    pipeline_name = "FluxPipeline"
    folder_parts = FOLDER_PARTS
    input_error = FluxInputError
    loads_assistant_lora = True
    card_tags = ("flux",)
    # the dev models' licence; schnell's is Apache 2.0 (card_license_fields)
    card_license = {
        "license": "other",
        "license_name": "flux-1-dev-non-commercial-license",
        "license_link": "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
    }

    text_encoder_2: Any
    tokenizer_2: Any

    @classmethod
    def card_license_fields(cls, base_model: str) -> dict[str, str]:
        if "schnell" in base_model.lower():
            return {"license": "apache-2.0"}
        return super().card_license_fields(base_model)

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        return is_flux_lora(tensors)

    # --- loading -------------------------------------------------------------------------
    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)  # FlowMatchEuler's defaults (an empty config) are FLUX.1's shift settings
        self.has_guidance = bool(self.transformer.config.guidance_embeds)
        self.modelspec_architecture = type(self).modelspec_architecture if self.has_guidance else self.schnell_architecture
        self.train_guidance = float(self.model_cfg.model_kwargs.get("guidance", 1.0))
        # T5 tokens per prompt: FLUX dev uses 512, schnell 256
        self.max_sequence_length = self._text_length(512 if self.has_guidance else 256, "tokenizer_2")

    def _load_parts(self, location: str) -> dict[str, Any]:
        """Load every part; returns the scheduler config."""
        from diffusers import FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

        self.tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer")
        # torch_dtype at load: the host never holds a part in a wider dtype than it trains in
        self.text_encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder", torch_dtype=self.dtype)
        self.tokenizer_2 = AutoTokenizer.from_pretrained(location, subfolder="tokenizer_2")
        self.text_encoder_2 = T5EncoderModel.from_pretrained(
            location, subfolder="text_encoder_2", torch_dtype=self.dtype
        )
        self.transformer = FluxTransformer2DModel.from_pretrained(
            location, subfolder="transformer", torch_dtype=self.dtype
        )
        self.vae = self._load_vae(location)
        return diffusers_parts.scheduler_config(location)

    def network_candidates(self, include_conv: bool) -> list[str]:
        return flux_lora_candidates(self.transformer)  # FLUX has no conv layers to add for LoCon

    # --- encoding ------------------------------------------------------------------------
    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        # FLUX previews run without classifier-free guidance (true_cfg_scale 1): no negative needed
        return {"prompt_embeds": positive.hidden_states, "pooled_prompt_embeds": positive.extra["pooled"]}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        hidden, pooled, _ = self._text_pipeline().encode_prompt(
            prompt=list(prompts), device=self.device, max_sequence_length=self.max_sequence_length
        )
        return PromptEmbeds(hidden, {"pooled": pooled})

    # --- training objective --------------------------------------------------------------
    def check_train_settings(self, train_cfg: Any) -> None:
        super().check_train_settings(train_cfg)
        if train_cfg.bypass_guidance_embedding and not self.has_guidance:
            raise FluxInputError(
                f"train.bypass_guidance_embedding: this {self.model_label} transformer has no guidance "
                "embedding (transformer config guidance_embeds is false, as in FLUX.1 schnell), so there is "
                "nothing to bypass; remove the key (it is for guidance-distilled models: FLUX.1 dev, Flex.1)"
            )

    def shift_kwargs(self, height: int, width: int) -> dict[str, float]:
        """FLUX's resolution-dependent mu of the image token count."""
        return {"mu": image_seq_shift((height // 2) * (width // 2), self.scheduler_config)}

    def make_noisy_batch(self, latents: torch.Tensor, train_cfg: TrainConfig, generator: torch.Generator | None,
                         context: BatchContext | None = None) -> NoisyBatch:
        batch = super().make_noisy_batch(latents, train_cfg, generator, context)
        if train_cfg.bypass_guidance_embedding:
            batch.extra["bypass_guidance"] = True
        return batch

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        config = self.transformer.config
        # the transformer sees 2x2 patches of the latent channels
        latents = self._example_latents(batch, size, config.in_channels // 4)
        extra: dict[str, Any] = {}
        if with_controls:
            extra["control_latents"] = torch.randn(latents.shape, dtype=self.dtype)
        noisy = self._example_noisy(latents, extra)
        cond = PromptEmbeds(
            torch.randn(batch, self.max_sequence_length, config.joint_attention_dim, dtype=self.dtype),
            {"pooled": torch.randn(batch, config.pooled_projection_dim, dtype=self.dtype)},
        )
        return noisy, cond

    def _reference_tokens(self, batch: NoisyBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(tokens (B, M, 4C), ids (M, 3)) appended after the image tokens (Kontext), or None."""
        return None

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        x = batch.noisy_latents.to(self.dtype)
        b, c, h, w = x.shape
        tokens = pack_latents(x)
        ids = image_ids(h, w, x.device, self.dtype)
        reference = self._reference_tokens(batch)
        if reference is not None:
            tokens = torch.cat([tokens, reference[0].to(self.dtype)], dim=1)
            ids = torch.cat([ids, reference[1]], dim=0)
        hidden = cond.hidden_states.to(self.device, self.dtype)
        txt_ids = torch.zeros(hidden.shape[1], 3, device=x.device, dtype=self.dtype)
        guidance = None
        if self.has_guidance:
            guidance = torch.full((b,), self.train_guidance, device=x.device, dtype=torch.float32)
        bypass = batch.extra.get("bypass_guidance", False)
        with guidance_embedding_bypassed(self.transformer) if bypass else nullcontext():
            out = self.transformer(
                hidden_states=tokens,
                timestep=(batch.timesteps / 1000.0).to(x.device, self.dtype),
                guidance=guidance,
                pooled_projections=cond.extra["pooled"].to(self.device, self.dtype),
                encoder_hidden_states=hidden,
                txt_ids=txt_ids,
                img_ids=ids,
                return_dict=False,
            )[0]
        n = (h // 2) * (w // 2)  # the target's tokens come first; reference tokens are not predicted
        return unpack_latents(out[:, :n], h * self.vae_scale_factor, w * self.vae_scale_factor, self.vae_scale_factor)

    # --- previews ------------------------------------------------------------------------
    def _unpack_preview(self, latents: torch.Tensor) -> torch.Tensor:
        return unpack_latents(latents, *self._preview_pixel_size(latents.shape[1]), self.vae_scale_factor)
