"""PixArt-alpha and PixArt-Sigma: PixArtTransformer2DModel (DiT with cross-attention to T5),
a 4-channel AutoencoderKL (SD's for alpha, SDXL's for Sigma) and T5 v1.1 XXL.

Training is DDPM's, as ai-toolkit trains PixArt (the SD families' objective): integer timesteps
drawn by train.timestep_type on the model's noise schedule (aitk.models.sd.timesteps), the
variance-preserving forward process, target = noise (epsilon; v with model.is_v_pred or a
v_prediction scheduler config), min-SNR weights with train.min_snr_gamma. The released
transformers learn their variance too ("learned sigma": 8 output channels for 4 latent ones);
the loss is on the noise prediction only, the first half of the channels, as the pipelines
and diffusers' PixArt training scripts read it.

PixArt-XL-2-1024-MS is also conditioned on the image size and aspect ratio
(`use_additional_conditions`): each batch passes its bucket's size after resolution binning,
the nearest (height, width) of the model's aspect-ratio bins (ASPECT_RATIO_1024_BIN for the 1024
models) as ai-toolkit does. Previews render at the requested size (binning is off: a latent
output cannot be resized back), so a preview at a bin size (1024 x 1024, 768 x 1344 ...) gets the
conditioning training gave.

Text: T5's last hidden states of the prompt padded to max_sequence_length with its attention
mask (the pipeline's own encode_prompt, captions not cleaned): 120 tokens for alpha, 300 for
Sigma (model.model_kwargs.max_sequence_length; ai-toolkit's lengths).

LoRA files (comfyui / kohya): `transformer.<module path>` with `.lora_A.weight`, `.lora_B.weight`
and `.alpha` (keys.py); the PixArt pipelines have no LoRA loader (docs/lora-formats.md).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from aitk.config.schema import TrainConfig
from aitk.models import common, diffusers_parts
from aitk.models.base import BatchContext, ModelAdapter, NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.pixart.keys import is_pixart_lora, pixart_lora_candidates

#: files refused as model.name_or_path (PixArt loads diffusers folders and hub ids only)
SINGLE_FILE_SUFFIXES = (*diffusers_parts.CHECKPOINT_SUFFIXES, ".pth")
FOLDER_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
#: the released models' noise schedule (their scheduler configs): DDPM's linear betas
DEFAULT_NOISE_SCHEDULE: dict[str, Any] = dict(
    beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000, prediction_type="epsilon"
)


class PixArtInputError(ValueError):
    """A batch or setting this PixArt model cannot train on."""


def aspect_ratio_bins(sample_size: int) -> dict[str, list[float]] | None:
    """The pipelines' aspect-ratio bins for a transformer of `sample_size` latents (None: no table)."""
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
        ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN,
    )
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

    tables = {256: ASPECT_RATIO_2048_BIN, 128: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_512_BIN, 32: ASPECT_RATIO_256_BIN}
    return tables.get(int(sample_size))


def binned_size(height: int, width: int, sample_size: int) -> tuple[int, int]:
    """(height, width) in pixels after resolution binning; the size itself without a bin table."""
    from diffusers.image_processor import PixArtImageProcessor

    bins = aspect_ratio_bins(sample_size)
    if bins is None:
        return height, width
    return PixArtImageProcessor.classify_height_width_bin(height, width, ratios=bins)


@functools.cache
def preview_pipeline_class(base: type) -> type:
    """`base` (PixArtAlphaPipeline / PixArtSigmaPipeline) taking negative_prompt=None as no negative
    prompt (its default ""), as the other families' pipelines do; the preview loop passes None."""

    class PixArtPreviewPipeline(base):
        def __call__(self, *args: Any, negative_prompt: str | None = None, **kwargs: Any) -> Any:
            if negative_prompt is None and kwargs.get("negative_prompt_embeds") is None:
                negative_prompt = ""
            return super().__call__(*args, negative_prompt=negative_prompt, **kwargs)

    PixArtPreviewPipeline.__name__ = base.__name__  # diffusers names the pipeline by its class
    return PixArtPreviewPipeline


class PixArtAlphaAdapter(ModelAdapter):
    trains_ddpm = True
    arch_names = ("pixart",)
    text_encoder_names = ("text_encoder",)
    bucket_divisibility = 16  # 8x VAE downscale x 2x2 patches
    lora_prefix = "transformer."  # ComfyUI's PixArt names: transformer.<diffusers module path>
    lora_weight_names = ("lora_A", "lora_B")
    diffusers_lora_prefix = "transformer"
    base_model_version = "pixart"  # ai-toolkit's
    modelspec_architecture = "pixart-alpha/lora"
    modelspec_implementation = "https://github.com/PixArt-alpha/PixArt-alpha"
    model_label = "PixArt-alpha"
    denoiser_names = ("transformer",)
    card_tags = ("pixart", "pixart-alpha")
    # PixArt-alpha and PixArt-Sigma weights are released under the CreativeML Open RAIL++-M licence
    card_license = {"license": "openrail++"}
    #: T5 tokens per prompt (ai-toolkit's: 120 alpha, 300 Sigma; the pipelines' defaults)
    default_max_sequence_length = 120
    example_repo = "PixArt-alpha/PixArt-XL-2-1024-MS"

    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        return is_pixart_lora(tensors)

    @staticmethod
    def pipeline_class() -> type:
        from diffusers import PixArtAlphaPipeline

        return PixArtAlphaPipeline

    # --- loading -------------------------------------------------------------------------
    def load(self) -> None:
        hint = diffusers_parts.folder_hint(FOLDER_PARTS, self.example_repo)
        scheduler_config = diffusers_parts.load_from_folder(
            self.model_cfg.name_or_path, f"a {self.model_label} model", self.model_label, hint, self._load_parts,
            checkpoint_suffixes=SINGLE_FILE_SUFFIXES,
        )
        diffusers_parts.freeze_loaded(self.loaded_parts(), self.dtype, self.auxiliary_names)
        self.bind_loaded(scheduler_config)

    def _load_parts(self, location: str) -> dict[str, Any]:
        """Load every part; returns the scheduler config."""
        from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel
        from transformers import AutoTokenizer, T5EncoderModel

        # torch_dtype at load: the host never holds a part in a wider dtype than it trains in
        self.tokenizer = AutoTokenizer.from_pretrained(location, subfolder="tokenizer")
        self.text_encoder = T5EncoderModel.from_pretrained(location, subfolder="text_encoder", torch_dtype=self.dtype)
        self.transformer = PixArtTransformer2DModel.from_pretrained(location, subfolder="transformer", torch_dtype=self.dtype)
        self.vae = diffusers_parts.load_vae(AutoencoderKL, location, self.model_cfg.vae_path)
        return dict(DDPMScheduler.load_config(location, subfolder="scheduler"))

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        from diffusers import DDPMScheduler

        super().bind(parts, configs)
        wanted = int(self.model_cfg.model_kwargs.get("max_sequence_length", self.default_max_sequence_length))
        if wanted < 1:
            raise PixArtInputError(f"model.model_kwargs.max_sequence_length: {wanted} must be at least 1")
        # never more T5 tokens than the tokenizer allows (the tiny test models: 32)
        self.max_sequence_length = min(wanted, int(configs.tokenizer_lengths.get("tokenizer", wanted)))
        self.scheduler_config = dict(configs.scheduler or DEFAULT_NOISE_SCHEDULE)
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        if self.model_cfg.is_v_pred:
            self.noise_scheduler.register_to_config(prediction_type="v_prediction")
        self.vae_scale_factor = common.vae_scale_from_config(configs.part("vae"))
        config = self.transformer.config
        self.learned_sigma = int(config.out_channels) == 2 * int(config.in_channels)
        self.size_conditioned = bool(self.transformer.use_additional_conditions)
        self._text_pipe: Any = None

    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def offload_blocks(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        if module is self.transformer:  # diffusers' _no_split_modules names the patch embedding too
            return list(module.transformer_blocks)
        return super().offload_blocks(module)

    def network_candidates(self, include_conv: bool) -> list[str]:
        return pixart_lora_candidates(self.transformer)  # the patch embedding conv is never a target

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    # --- encoding ------------------------------------------------------------------------
    def _pipeline(self, scheduler: Any) -> Any:
        return preview_pipeline_class(self.pipeline_class())(
            tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
            transformer=self.transformer, scheduler=scheduler,
        )

    def release_text_encoders(self) -> int:
        self._text_pipe = None  # it holds the encoder too
        return super().release_text_encoders()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        # The pipeline's own encoder, so training sees exactly what previews and other tools see.
        if self._text_pipe is None:
            self._text_pipe = self._pipeline(self.noise_scheduler)
        hidden, mask, _, _ = self._text_pipe.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, device=self.device, clean_caption=False,
            max_sequence_length=self.max_sequence_length,
        )
        return PromptEmbeds(hidden, {"mask": mask})

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return diffusers_parts.encode_scaled_latents(self.vae, pixels, self.device, shifted=False)

    def text_encoder_id(self) -> str:
        # the T5 length is part of the embedding's shape: a cache of another length must not be reused
        return f"{self.modelspec_architecture}|{self.model_cfg.name_or_path}|t5:{self.max_sequence_length}"

    def latent_space_id(self) -> str:
        source = self.model_cfg.vae_path or self.model_cfg.name_or_path
        return diffusers_parts.vae_space_id("sd-vae", self.vae, source, shifted=False)

    # --- training objective --------------------------------------------------------------
    def check_train_settings(self, train_cfg: Any) -> None:
        from aitk.models.sd.timesteps import timestep_kind

        timestep_kind(train_cfg, self.model_label)

    def size_conditions(self, batch: int, height: int, width: int) -> dict[str, torch.Tensor | None]:
        """added_cond_kwargs for latents of height x width: the binned pixel size and its aspect
        ratio on the size-conditioned model, None for the others (as the pipelines pass them)."""
        if not self.size_conditioned:
            return {"resolution": None, "aspect_ratio": None}
        pixel_h, pixel_w = binned_size(height * self.vae_scale_factor, width * self.vae_scale_factor,
                                       int(self.transformer.config.sample_size))
        resolution = torch.tensor([[float(pixel_h), float(pixel_w)]]).repeat(batch, 1)
        aspect_ratio = torch.tensor([[pixel_h / pixel_w]]).repeat(batch, 1)
        return {"resolution": resolution, "aspect_ratio": aspect_ratio}

    def make_noisy_batch(
        self,
        latents: torch.Tensor,
        train_cfg: TrainConfig,
        generator: torch.Generator | None,
        context: BatchContext | None = None,
    ) -> NoisyBatch:
        from aitk.models.sd.ddpm import ddpm_noisy_batch

        h, w = latents.shape[-2:]
        if h % self.transformer.config.patch_size or w % self.transformer.config.patch_size:
            raise PixArtInputError(
                f"{self.model_label} latents need a height and width divisible by the patch size, got {h}x{w} "
                f"(buckets must be multiples of {self.bucket_divisibility} px)"
            )
        return ddpm_noisy_batch(self.noise_scheduler, latents, train_cfg, generator, self.model_label, self.dtype)

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        config = self.transformer.config
        h, w = size[1] // self.vae_scale_factor, size[0] // self.vae_scale_factor
        latents = torch.randn(batch, config.in_channels, h, w)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (batch,))
        noisy = NoisyBatch(latents.to(self.dtype), timesteps, torch.randn(latents.shape))
        cond = PromptEmbeds(
            torch.randn(batch, self.max_sequence_length, config.caption_channels, dtype=self.dtype),
            {"mask": torch.ones(batch, self.max_sequence_length, dtype=torch.long)},
        )
        return noisy, cond

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        x = batch.noisy_latents.to(self.dtype)
        device = x.device
        # the size conditioning follows from the latents' size (None on models without it)
        added = {k: v.to(device, self.dtype) if v is not None else None
                 for k, v in self.size_conditions(x.shape[0], *x.shape[-2:]).items()}
        out = self.transformer(
            x,
            encoder_hidden_states=cond.hidden_states.to(device, self.dtype),
            encoder_attention_mask=cond.extra["mask"].to(device),
            timestep=batch.timesteps.to(device),
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        # learned sigma: the loss (and the pipelines' sampling) reads the noise half only
        return out.chunk(2, dim=1)[0] if self.learned_sigma else out

    # --- previews ------------------------------------------------------------------------
    def sample_pipeline(self, sampler: str | None = None) -> Any:
        from aitk.models.samplers import preview_scheduler

        return self._pipeline(preview_scheduler(sampler, self.scheduler_config))

    def preview_sampler_note(self, sampler: str) -> str | None:
        if sampler == "flowmatch":
            return f"Euler (EulerDiscreteScheduler): {self.model_label} is not a flow-matching model"
        return None

    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        return {
            "prompt_embeds": positive.hidden_states,
            "prompt_attention_mask": positive.extra["mask"],
            "negative_prompt_embeds": negative.hidden_states,
            "negative_prompt_attention_mask": negative.extra["mask"],
        }

    def preview_kwargs(self, request: Any) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length, "clean_caption": False, "use_resolution_binning": False}

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Any]:
        latents = latents.to(self.device, torch.float32)
        pixels = diffusers_parts.decode_scaled_latents(self.vae, latents, shifted=False)
        return common.pixels_to_pil(pixels, self.vae_scale_factor)


class PixArtSigmaAdapter(PixArtAlphaAdapter):
    """PixArt-Sigma: PixArt-alpha's transformer layout (no size conditioning in the released
    models), SDXL's VAE, 300 T5 tokens, PixArtSigmaPipeline."""

    arch_names = ("pixart_sigma",)
    base_model_version = "pixart_sigma"
    modelspec_architecture = "pixart-sigma/lora"
    modelspec_implementation = "https://github.com/PixArt-alpha/PixArt-sigma"
    model_label = "PixArt-Sigma"
    card_tags = ("pixart", "pixart-sigma")
    default_max_sequence_length = 300
    example_repo = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"

    @staticmethod
    def pipeline_class() -> type:
        from diffusers import PixArtSigmaPipeline

        return PixArtSigmaPipeline
