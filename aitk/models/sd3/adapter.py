"""Stable Diffusion 3 / 3.5 (medium, large): SD3Transformer2DModel (MMDiT), 16-channel VAE,
CLIP-L + CLIP-G (pooled projections joined) + T5.

Training is rectified flow (aitk.models.flow_matching), as ai-toolkit trains SD 3 (its
`flowmatch` scheduler with SD 3's settings): x = (1 - sigma) * x0 + sigma * noise,
target = noise - x0. The transformer takes the timestep 1000 * sigma as it is (NoisyBatch.timesteps,
the scheduler convention; StableDiffusion3Pipeline passes the scheduler's timesteps unchanged).
timestep_type "shift" (and ai-toolkit's "flux_shift" / "lumina2_shift", drawn alike there) uses
SD 3's fixed time shift: the scheduler's `shift` (3.0 for SD 3 and 3.5), sigma = s*u / (1 + (s-1)*u);
a scheduler config with `use_dynamic_shifting` gets the resolution-dependent mu of
StableDiffusion3Pipeline instead. "weighted" draws uniform sigmas and weights each sample's loss
(aitk.models.flow_timestep_types).

Latents stay (B, 16, h, w) in NoisyBatch and in predictions: the transformer patches them itself
(patch_size 2), so buckets are multiples of 16 px.

Text conditioning is the pipeline's own `encode_prompt` (without classifier-free guidance): CLIP-L's
and CLIP-G's penultimate hidden states joined (768 + 1280 wide on the real model), zero-padded to
T5's width and followed by T5's tokens (model.model_kwargs.max_sequence_length, default 256 as the
pipeline and ai-toolkit use); the pooled embedding is both CLIPs' projections joined.

SD 3.5 medium (MMDiT-X) differs only in its transformer config (`dual_attention_layers`: a second
image self-attention, `attn2`, in the first blocks), which the LoRA targets follow
(aitk.models.sd3.keys). LoRA files: see keys.py and docs/lora-formats.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from aitk.models import diffusers_parts
from aitk.models.base import NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.flow_adapter import FlowTransformerAdapter
from aitk.models.sd3.keys import is_sd3_lora, sd3_lora_candidates

SINGLE_FILE_SUFFIXES = set(diffusers_parts.CHECKPOINT_SUFFIXES)
FOLDER_PARTS = (
    "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
    "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler",
)
#: SD 3 and 3.5 ship FlowMatchEulerDiscreteScheduler with this fixed shift (ai-toolkit's SD flow config too)
DEFAULT_SHIFT = 3.0
#: T5 tokens per prompt: StableDiffusion3Pipeline's default, and what ai-toolkit encodes
DEFAULT_MAX_SEQUENCE_LENGTH = 256
#: the longest T5 sequence StableDiffusion3Pipeline accepts
PIPELINE_MAX_SEQUENCE_LENGTH = 512
CLIP_LENGTH = 77


class SD3InputError(ValueError):
    """A batch or setting this SD 3 model cannot train on."""


def sd3_architecture(transformer_config: Any) -> str:
    """modelspec.architecture of a LoRA for this transformer, as kohya's sd-scripts tells the
    models apart: SD 3 medium has no q/k norm, SD 3.5 medium has dual-attention blocks."""
    if not transformer_config.get("qk_norm"):
        return "stable-diffusion-3-medium/lora"
    if transformer_config.get("dual_attention_layers"):
        return "stable-diffusion-3-5-medium/lora"
    return "stable-diffusion-3-5-large/lora"


#: pixels in [-1, 1] -> SD 3's normalized latents, encoded in fp32 (the VAE's mode)
encode_sd3_latents = diffusers_parts.encode_scaled_latents


class SD3Adapter(FlowTransformerAdapter):
    arch_names = ("sd3",)
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    lora_prefix = "transformer."  # dotted module paths: transformer.<path> (ComfyUI's SD3 names)
    #: lora_A / lora_B names next to `.alpha` (read by aitk.networks.export.save_lora)
    lora_weight_names = ("lora_A", "lora_B")
    base_model_version = "sd_3"  # ai-toolkit's value for SD 3 files
    modelspec_architecture = "stable-diffusion-3-5-large/lora"  # set per model in `bind`
    modelspec_implementation = "https://github.com/Stability-AI/sd3.5"
    model_label = "SD 3"
    model_article = "an"
    pipeline_name = "StableDiffusion3Pipeline"
    folder_parts = FOLDER_PARTS
    folder_example = "stabilityai/stable-diffusion-3.5-large"
    # an empty config (the plan reads none) means SD 3's own schedule
    default_scheduler = {"shift": DEFAULT_SHIFT}
    input_error = SD3InputError
    latent_space_name = "sd3-vae"
    card_tags = ("sd3", "sd3-diffusers")
    # SD 3 medium and 3.5 are released under the Stability AI Community License
    card_license = {
        "license": "other",
        "license_name": "stabilityai-ai-community",
        "license_link": "https://huggingface.co/stabilityai/stable-diffusion-3.5-large/blob/main/LICENSE.md",
    }

    text_encoder_2: Any
    tokenizer_2: Any
    text_encoder_3: Any
    tokenizer_3: Any

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        return is_sd3_lora(tensors)

    # --- loading -------------------------------------------------------------------------
    def _load_parts(self, location: str) -> dict[str, Any]:
        """Load every part; returns the scheduler config."""
        from diffusers import SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

        # torch_dtype at load: the host never holds a part in a wider dtype than it trains in
        for suffix in ("", "_2"):
            setattr(self, f"tokenizer{suffix}", CLIPTokenizer.from_pretrained(location, subfolder=f"tokenizer{suffix}"))
            encoder = CLIPTextModelWithProjection.from_pretrained(
                location, subfolder=f"text_encoder{suffix}", torch_dtype=self.dtype
            )
            setattr(self, f"text_encoder{suffix}", encoder)
        self.tokenizer_3 = AutoTokenizer.from_pretrained(location, subfolder="tokenizer_3")
        self.text_encoder_3 = T5EncoderModel.from_pretrained(location, subfolder="text_encoder_3", torch_dtype=self.dtype)
        self.transformer = SD3Transformer2DModel.from_pretrained(location, subfolder="transformer", torch_dtype=self.dtype)
        self.vae = self._load_vae(location)
        return diffusers_parts.scheduler_config(location)

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        config = self.transformer.config
        self.modelspec_architecture = sd3_architecture(config)
        self.patch_size = self.latent_patch = int(config.patch_size)
        kwargs = self.model_cfg.model_kwargs
        wanted = int(kwargs.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH))
        if not 1 <= wanted <= PIPELINE_MAX_SEQUENCE_LENGTH:
            raise SD3InputError(
                f"model.model_kwargs.max_sequence_length: {wanted} is out of range; StableDiffusion3Pipeline "
                f"takes 1 to {PIPELINE_MAX_SEQUENCE_LENGTH} T5 tokens (default {DEFAULT_MAX_SEQUENCE_LENGTH})"
            )
        # never more T5 tokens than the tokenizer allows (the tiny test models: 32)
        self.max_sequence_length = min(wanted, int(configs.tokenizer_lengths.get("tokenizer_3", wanted)))
        self.clip_length = int(configs.tokenizer_lengths.get("tokenizer", CLIP_LENGTH))

    def network_candidates(self, include_conv: bool) -> list[str]:
        return sd3_lora_candidates(self.transformer)  # only the patch embedding is a conv: never a target

    # --- encoding ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        hidden, _, pooled, _ = self._text_pipeline().encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return PromptEmbeds(hidden, {"pooled": pooled})

    # --- training objective --------------------------------------------------------------
    def shift_mu(self, height: int, width: int) -> float:
        """The time shift mu = log(shift) for latents of height x width: the scheduler's fixed
        shift, or with use_dynamic_shifting StableDiffusion3Pipeline's resolution-dependent mu."""
        config = self.scheduler_config
        if not config.get("use_dynamic_shifting"):
            return math.log(float(config.get("shift", DEFAULT_SHIFT)))
        from aitk.models.flow_matching import resolution_shift

        tokens = (height // self.patch_size) * (width // self.patch_size)
        return resolution_shift(tokens, config, max_shift=1.16)  # StableDiffusion3Pipeline's default

    def shift_kwargs(self, height: int, width: int) -> dict[str, float]:
        return {"mu": self.shift_mu(height, width)}

    def _check_latent_size(self, height: int, width: int) -> None:
        if height % self.patch_size or width % self.patch_size:
            raise SD3InputError(
                f"{self.model_label} latents need a height and width divisible by the patch size "
                f"{self.patch_size}, got {height}x{width} (buckets must be multiples of {self.bucket_divisibility} px)"
            )

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        config = self.transformer.config
        noisy = self._example_noisy(self._example_latents(batch, size, config.in_channels))
        tokens = self.clip_length + self.max_sequence_length  # CLIP tokens, then T5's
        cond = PromptEmbeds(
            torch.randn(batch, tokens, config.joint_attention_dim, dtype=self.dtype),
            {"pooled": torch.randn(batch, config.pooled_projection_dim, dtype=self.dtype)},
        )
        return noisy, cond

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        x = batch.noisy_latents.to(self.dtype)
        self._check_latent_size(*x.shape[-2:])
        return self.transformer(
            hidden_states=x,
            timestep=batch.timesteps.to(x.device, self.dtype),
            encoder_hidden_states=cond.hidden_states.to(self.device, self.dtype),
            pooled_projections=cond.extra["pooled"].to(self.device, self.dtype),
            return_dict=False,
        )[0]

    # --- previews ------------------------------------------------------------------------
    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        # classifier-free guidance: the pipeline takes both prompts' embeddings and pooled embeddings
        return {
            "prompt_embeds": positive.hidden_states,
            "pooled_prompt_embeds": positive.extra["pooled"],
            "negative_prompt_embeds": negative.hidden_states,
            "negative_pooled_prompt_embeds": negative.extra["pooled"],
        }
