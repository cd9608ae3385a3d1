"""Chroma (lodestones' Chroma1-HD / -Base and the chroma-unlocked-vNN checkpoints): a FLUX.1-derived
transformer (ChromaTransformer2DModel) + FLUX's 16-channel VAE + T5-XXL, no CLIP, no guidance
embedding; each block's modulation comes from one distilled network (the "approximator",
distilled_guidance_layer) fed the timestep only.

Training is rectified flow as for FLUX (aitk.models.flow_matching): x = (1 - sigma) * x0 +
sigma * noise, target = noise - x0, NoisyBatch.timesteps = 1000 * sigma (the transformer gets
sigma). timestep_type "shift" / "flux_shift" / "lumina2_shift" use FLUX's resolution-dependent mu
(calculate_shift of the image token count with the scheduler's base / max shift), as ai-toolkit's
Chroma scheduler does; "weighted" weights each sample's loss. Latents stay (B, 16, h, w); `predict`
packs them into FLUX's 2x2-patch tokens and ids (imported from aitk.models.flux).

Text: the prompt through ChromaPipeline's own T5 encoding (attention-masked, max_sequence_length
tokens, default 512 as ai-toolkit), with Chroma's text mask (the prompt and one pad token) kept in
PromptEmbeds.extra["attention_mask"] and applied in the joint attention of every block, in training,
under gradient checkpointing and in previews alike (aitk.models.chroma.masking says why that needs
care in diffusers 0.42). Previews run ChromaPipeline's true classifier-free guidance with the
negative prompt (sample.guidance_scale, ai-toolkit's example uses 4).

LoRA targets are FLUX's: attention projections and feed-forward layers of the double and single
blocks; the approximator stays frozen (ai-toolkit runs it without gradients). Files name modules
`transformer.<module path>` with lora_A / lora_B and a per-module `.alpha`, which ChromaPipeline's
load_lora_weights (FluxLoraLoaderMixin) reads exactly and ComfyUI maps for Chroma as for FLUX
(docs/lora-formats.md). Buckets are multiples of 32 px, as ai-toolkit buckets Chroma.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aitk.models import diffusers_parts
from aitk.models.base import NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.chroma.masking import joint_mask, masked_checkpointing, preview_pipeline_class
from aitk.models.chroma.sources import DEFAULT_EXTRAS, FOLDER_HINT, resolve
from aitk.models.flow_adapter import FlowTransformerAdapter
from aitk.models.flux import (
    FluxAdapter,
    FluxInputError,
    flux_lora_candidates,
    image_ids,
    image_seq_shift,
    pack_latents,
    unpack_latents,
)

#: the text mask's key in PromptEmbeds.extra: (B, L) bool, the prompt's tokens and one pad token
MASK_KEY = "attention_mask"


class ChromaAdapter(FlowTransformerAdapter):
    arch_names = ("chroma",)
    text_encoder_names = ("text_encoder",)
    bucket_divisibility = 32  # ai-toolkit's Chroma value (the model itself needs 16: 8x VAE x 2x2 patches)
    lora_prefix = "transformer."  # dotted module paths: transformer.<path>, as FLUX
    lora_weight_names = ("lora_A", "lora_B")
    base_model_version = "chroma"  # ai-toolkit's ss_base_model_version for Chroma
    modelspec_architecture = "chroma/lora"
    modelspec_implementation = "https://github.com/lodestone-rock/flow"  # lodestones' reference code
    #: a single transformer file takes its part configs (and the other parts) from here
    default_config_repo = DEFAULT_EXTRAS
    model_label = "Chroma"
    pipeline_name = "ChromaPipeline"
    input_error = FluxInputError
    bypass_guidance_note = (
        "Chroma has no guidance embedding (its modulation comes from the timestep alone); remove the key"
    )
    card_tags = ("chroma",)
    card_license = {"license": "apache-2.0"}  # every Chroma release

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        # the same key names (and widths) as FLUX.1's: a file without a header could be either
        return FluxAdapter.matches_lora_keys(tensors)

    # --- loading -------------------------------------------------------------------------
    def _load_sources(self) -> dict[str, Any]:
        """Every part from a Chroma folder, the transformer perhaps from a single file
        (aitk.models.chroma.sources); returns the scheduler config."""
        source = resolve(self.model_cfg.name_or_path, self.model_cfg.model_kwargs)
        local = Path(source.folder).is_dir()
        with diffusers_parts.load_errors(self._what(), source.transformer_file or source.folder, FOLDER_HINT,
                                         local=local, extras=source.folder if source.transformer_file else None):
            from diffusers import ChromaTransformer2DModel
            from transformers import AutoTokenizer, T5EncoderModel

            location = source.folder
            # torch_dtype at load: the host never holds a wider copy
            self.tokenizer = AutoTokenizer.from_pretrained(location, subfolder="tokenizer")
            self.text_encoder = T5EncoderModel.from_pretrained(
                location, subfolder="text_encoder", torch_dtype=self.dtype
            )
            if source.transformer_file:
                self.transformer = ChromaTransformer2DModel.from_single_file(
                    source.transformer_file, config=location, subfolder="transformer", torch_dtype=self.dtype
                )
            else:
                self.transformer = ChromaTransformer2DModel.from_pretrained(
                    location, subfolder="transformer", torch_dtype=self.dtype
                )
            self.vae = self._load_vae(location)
            return diffusers_parts.scheduler_config(location)

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)  # FlowMatchEuler's defaults (an empty config) are Chroma's and FLUX.1's
        self.max_sequence_length = min(self._text_length(512), 512)  # ChromaPipeline refuses more than 512

    def network_candidates(self, include_conv: bool) -> list[str]:
        return flux_lora_candidates(self.transformer)  # the same block layout; no convs for LoCon

    # --- encoding ------------------------------------------------------------------------
    def _pipeline_class(self) -> type:
        return preview_pipeline_class()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        hidden, _, mask, *_ = self._text_pipeline().encode_prompt(
            prompt=list(prompts), device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return PromptEmbeds(hidden, {MASK_KEY: mask.to(torch.bool)})

    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        return {
            "prompt_embeds": positive.hidden_states, "prompt_attention_mask": positive.extra[MASK_KEY],
            "negative_prompt_embeds": negative.hidden_states,
            "negative_prompt_attention_mask": negative.extra[MASK_KEY],
        }

    # --- training objective --------------------------------------------------------------
    def check_train_settings(self, train_cfg: Any) -> None:
        from aitk.models.attention import MASKED_BACKENDS, requested

        super().check_train_settings(train_cfg)
        backend = requested(train_cfg)
        if backend is not None and backend[0] not in MASKED_BACKENDS:
            raise FluxInputError(
                f"{backend[1]}: that attention kernel takes no attention mask, and Chroma masks T5's padding "
                f"in every block; use one of {', '.join(MASKED_BACKENDS)} (or leave it unset)"
            )

    def shift_kwargs(self, height: int, width: int) -> dict[str, float]:
        """FLUX's resolution-dependent mu of the image token count, as ai-toolkit's Chroma scheduler."""
        return {"mu": image_seq_shift((height // 2) * (width // 2), self.scheduler_config)}

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        config = self.transformer.config
        # the transformer sees 2x2 patches of the latent channels
        noisy = self._example_noisy(self._example_latents(batch, size, config.in_channels // 4))
        length = self.max_sequence_length
        mask = torch.arange(length).expand(batch, length) < length // 2  # half prompt, half padding
        hidden = torch.randn(batch, length, config.joint_attention_dim, dtype=self.dtype)
        return noisy, PromptEmbeds(hidden, {MASK_KEY: mask})

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        x = batch.noisy_latents.to(self.dtype)
        _, _, h, w = x.shape
        tokens = pack_latents(x)
        hidden = cond.hidden_states.to(self.device, self.dtype)
        mask = joint_mask(cond.extra[MASK_KEY].to(self.device), tokens.shape[1])
        with masked_checkpointing(self.transformer, mask):
            out = self.transformer(
                hidden_states=tokens,
                timestep=(batch.timesteps / 1000.0).to(x.device, self.dtype),
                encoder_hidden_states=hidden,
                txt_ids=torch.zeros(hidden.shape[1], 3, device=x.device, dtype=self.dtype),
                img_ids=image_ids(h, w, x.device, self.dtype),
                attention_mask=mask,
                return_dict=False,
            )[0]
        size = self.vae_scale_factor
        return unpack_latents(out, h * size, w * size, size)

    # --- previews ------------------------------------------------------------------------
    def _unpack_preview(self, latents: torch.Tensor) -> torch.Tensor:
        return unpack_latents(latents, *self._preview_pixel_size(latents.shape[1]), self.vae_scale_factor)
