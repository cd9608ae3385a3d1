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
from pathlib import Path
from typing import Any

import torch

from aitk.config.schema import TrainConfig
from aitk.models import common
from aitk.models.base import BatchContext, ModelAdapter, ModelLoadError, NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.sd3.keys import is_sd3_lora, sd3_lora_candidates

SINGLE_FILE_SUFFIXES = {".safetensors", ".sft", ".ckpt"}
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


def encode_sd3_latents(vae: Any, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pixels in [-1, 1] -> SD 3's normalized latents, encoded in fp32 (the VAE's mode)."""
    latents = common.encode_mode(vae, pixels, device)
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


class SD3Adapter(ModelAdapter):
    arch_names = ("sd3",)
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    bucket_divisibility = 16  # 8x VAE downscale x 2x2 patches
    lora_prefix = "transformer."  # dotted module paths: transformer.<path> (ComfyUI's SD3 names)
    #: lora_A / lora_B names next to `.alpha` (read by aitk.networks.export.save_lora)
    lora_weight_names = ("lora_A", "lora_B")
    diffusers_lora_prefix = "transformer"
    base_model_version = "sd_3"  # ai-toolkit's value for SD 3 files
    modelspec_architecture = "stable-diffusion-3-5-large/lora"  # set per model in `bind`
    modelspec_implementation = "https://github.com/Stability-AI/sd3.5"
    model_label = "SD 3"
    denoiser_names = ("transformer",)
    card_tags = ("sd3", "sd3-diffusers")
    # SD 3 medium and 3.5 are released under the Stability AI Community License
    card_license = {
        "license": "other",
        "license_name": "stabilityai-ai-community",
        "license_link": "https://huggingface.co/stabilityai/stable-diffusion-3.5-large/blob/main/LICENSE.md",
    }

    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    text_encoder_2: Any
    tokenizer_2: Any
    text_encoder_3: Any
    tokenizer_3: Any

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        return is_sd3_lora(tensors)

    # --- loading -------------------------------------------------------------------------
    def load(self) -> None:
        source = self.model_cfg.name_or_path
        path = Path(source).expanduser()
        folder_hint = (
            "give a diffusers folder (model_index.json with "
            + ", ".join(f"{p}/" for p in FOLDER_PARTS)
            + ") or a hub id (owner/name), e.g. stabilityai/stable-diffusion-3.5-large"
        )
        if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(
                f"model.name_or_path: {source!r} is a single file; {self.model_label} loads from a "
                f"diffusers folder or hub id only in this version; {folder_hint}"
            )
        if not common.could_be_hub_id(source) and not path.exists():
            raise ModelLoadError(
                f"model.name_or_path: {source!r} is neither an existing folder nor a hub id; {folder_hint}"
            )
        if path.exists() and not path.is_dir():
            raise ModelLoadError(f"model.name_or_path: {source!r} is a file, not a folder; {folder_hint}")
        location = str(path) if path.exists() else source
        try:
            scheduler_config = self._load_parts(location)
        except ModelLoadError:
            raise
        except Exception as exc:  # OSError for missing parts / hub look-ups, others for bad files
            where = folder_hint if path.exists() else (
                "no local folder of that name exists, so it was looked up as a hub id"
                f"{common.offline_note()}; {folder_hint}"
            )
            raise ModelLoadError(
                f"model.name_or_path: could not load an {self.model_label} model from {source!r}: {exc} ({where})"
            ) from exc
        encoders = (self.text_encoder, self.text_encoder_2, self.text_encoder_3)
        common.freeze((self.transformer, self.vae, *encoders))
        for module in (self.transformer, *encoders):
            common.cast(module, self.dtype)
        common.cast(self.vae, torch.float32)  # encodes / decodes in fp32 whatever trains
        self.bind_loaded(scheduler_config)

    def _load_parts(self, location: str) -> dict[str, Any]:
        """Load every part; returns the scheduler config."""
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
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
        return dict(FlowMatchEulerDiscreteScheduler.load_config(location, subfolder="scheduler"))

    def _load_vae(self, location: str) -> Any:
        """The model's vae/, or model.vae_path (a VAE folder, a pipeline folder with vae/, a hub id)."""
        from diffusers import AutoencoderKL

        vae_source = self.model_cfg.vae_path
        if not vae_source:
            return AutoencoderKL.from_pretrained(location, subfolder="vae")
        vae_path = Path(vae_source).expanduser()
        try:
            if vae_path.is_dir() and not (vae_path / "config.json").is_file():
                return AutoencoderKL.from_pretrained(str(vae_path), subfolder="vae")
            return AutoencoderKL.from_pretrained(str(vae_path) if vae_path.exists() else vae_source)
        except Exception as exc:
            raise ModelLoadError(
                f"model.vae_path: could not load a VAE from {vae_source!r}: {exc} (give a VAE folder with "
                f"config.json, a pipeline folder with vae/ or a hub id{common.offline_note()})"
            ) from exc

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        config = self.transformer.config
        self.modelspec_architecture = sd3_architecture(config)
        self.patch_size = int(config.patch_size)
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
        # an empty config (the plan reads none) means SD 3's own schedule
        self.scheduler_config = dict(configs.scheduler or {"shift": DEFAULT_SHIFT})
        self.vae_scale_factor = common.vae_scale_from_config(configs.part("vae"))
        self._text_pipe: Any = None

    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def network_candidates(self, include_conv: bool) -> list[str]:
        return sd3_lora_candidates(self.transformer)  # only the patch embedding is a conv: never a target

    # --- encoding ------------------------------------------------------------------------
    def _pipeline(self, scheduler: Any | None = None) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        if scheduler is None:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        return StableDiffusion3Pipeline(
            transformer=self.transformer,
            scheduler=scheduler,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            text_encoder_3=self.text_encoder_3,
            tokenizer_3=self.tokenizer_3,
        )

    def release_text_encoders(self) -> int:
        self._text_pipe = None  # it holds the encoders too
        return super().release_text_encoders()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        # The pipeline's own encoder, so training sees exactly what previews and other tools see.
        if self._text_pipe is None:
            self._text_pipe = self._pipeline()
        hidden, _, pooled, _ = self._text_pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return PromptEmbeds(hidden, {"pooled": pooled})

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_sd3_latents(self.vae, pixels, self.device)

    def text_encoder_id(self) -> str:
        # the T5 length is part of the embedding's shape: a cache of another length must not be reused
        return f"{self.modelspec_architecture}|{self.model_cfg.name_or_path}|t5:{self.max_sequence_length}"

    def latent_space_id(self) -> str:
        cfg = self.vae.config
        return (
            f"sd3-vae:{cfg.latent_channels}:{cfg.scaling_factor}:{cfg.shift_factor}:"
            f"{self.model_cfg.vae_path or self.model_cfg.name_or_path}"
        )

    # --- training objective --------------------------------------------------------------
    def check_train_settings(self, train_cfg: Any) -> None:
        from aitk.models.flow_matching import check_train_config

        check_train_config(train_cfg, self.model_label)

    def shift_mu(self, height: int, width: int) -> float:
        """The time shift mu = log(shift) for latents of height x width: the scheduler's fixed
        shift, or with use_dynamic_shifting StableDiffusion3Pipeline's resolution-dependent mu."""
        config = self.scheduler_config
        if not config.get("use_dynamic_shifting"):
            return math.log(float(config.get("shift", DEFAULT_SHIFT)))
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        tokens = (height // self.patch_size) * (width // self.patch_size)
        return float(calculate_shift(
            tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        ))

    def _check_latent_size(self, height: int, width: int) -> None:
        if height % self.patch_size or width % self.patch_size:
            raise SD3InputError(
                f"{self.model_label} latents need a height and width divisible by the patch size "
                f"{self.patch_size}, got {height}x{width} (buckets must be multiples of {self.bucket_divisibility} px)"
            )

    def make_noisy_batch(
        self,
        latents: torch.Tensor,
        train_cfg: TrainConfig,
        generator: torch.Generator | None,
        context: BatchContext | None = None,
    ) -> NoisyBatch:
        from aitk.models.flow_matching import noisy_and_target, sample_sigmas
        from aitk.models.flow_timestep_types import weighted_loss
        from aitk.models.noise import apply_noise_offset

        self.check_train_settings(train_cfg)
        b, _, h, w = latents.shape
        self._check_latent_size(h, w)
        # noise levels first: the same seed then draws the same levels at every image size
        sigma = sample_sigmas(b, train_cfg, generator, mu=self.shift_mu(h, w)).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        noise = apply_noise_offset(noise, train_cfg.noise_offset, generator).to(latents.device)
        noisy, target = noisy_and_target(latents, noise, sigma)
        weights = weighted_loss(sigma) if (train_cfg.timestep_type or "").lower() == "weighted" else None
        return NoisyBatch(noisy.to(self.dtype), sigma * 1000.0, target, weights, {})

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        config = self.transformer.config
        h, w = size[1] // self.vae_scale_factor, size[0] // self.vae_scale_factor
        latents = torch.randn(batch, config.in_channels, h, w)
        noisy = NoisyBatch(latents.to(self.dtype), torch.rand(batch) * 1000.0, torch.randn(latents.shape), None, {})
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
    def sample_pipeline(self, sampler: str | None = None) -> Any:
        # previews use SD 3's own flow-match Euler scheduler whatever sample.sampler says
        # (preview_sampler_note says so at start)
        return self._pipeline()

    def preview_sampler_note(self, sampler: str) -> str | None:
        if sampler in ("flowmatch", "euler"):
            return None
        return f"flow-match Euler: {self.model_label} is a flow-matching model, {sampler} does not apply"

    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        # classifier-free guidance: the pipeline takes both prompts' embeddings and pooled embeddings
        return {
            "prompt_embeds": positive.hidden_states,
            "pooled_prompt_embeds": positive.extra["pooled"],
            "negative_prompt_embeds": negative.hidden_states,
            "negative_pooled_prompt_embeds": negative.extra["pooled"],
        }

    def preview_kwargs(self, request: Any) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Any]:
        latents = latents.to(self.device, torch.float32)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        pixels = self.vae.decode(latents).sample
        return common.pixels_to_pil(pixels, self.vae_scale_factor * self.patch_size)
