"""Stable Diffusion 1.x / 2.x: UNet2DConditionModel + AutoencoderKL + CLIP, epsilon or v-prediction."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch

from aitk.config.schema import TrainConfig
from aitk.models import common
from aitk.models.base import BatchContext, ModelAdapter, ModelLoadError, NoisyBatch, PartConfigs, PromptEmbeds

# Used for the component configs of a single-file checkpoint when no local config folder is given.
DEFAULT_CONFIG_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SINGLE_FILE_SUFFIXES = {".safetensors", ".ckpt"}
#: the DDPM noise schedule SD 1.x and SDXL share (both models' scheduler configs): a model bound
#: without a scheduler config trains with it
DEFAULT_NOISE_SCHEDULE: dict[str, Any] = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
)
#: CLIP's tokens per prompt (a bound model without tokenizer lengths)
CLIP_TOKENS = 77


class SD15Adapter(ModelAdapter):
    trains_ddpm = True
    arch_names = ("sd1", "sd15")
    text_encoder_names = ("text_encoder",)
    text_encoder_lora_prefixes = {"text_encoder": "lora_te"}  # kohya's SD 1.x / 2.x names
    bucket_divisibility = 64
    lora_prefix = "lora_unet"
    base_model_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1/lora"
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"
    #: the model family in load errors
    model_label = "Stable Diffusion"
    default_config_repo = DEFAULT_CONFIG_REPO
    card_tags = ("stable-diffusion", "stable-diffusion-diffusers")
    card_license: Mapping[str, str] = {"license": "creativeml-openrail-m"}
    #: subfolders of a diffusers folder of this model (named in load errors)
    folder_parts: tuple[str, ...] = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        from aitk.models.sd.keys import sd_lora_variant

        return sd_lora_variant(tensors) in cls.arch_names

    # --- loading -------------------------------------------------------------------------
    def load(self) -> None:
        from diffusers import DDPMScheduler, UNet2DConditionModel

        source = self.model_cfg.name_or_path
        path = Path(source).expanduser()
        if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            if not path.is_file():
                raise ModelLoadError(
                    f"model.name_or_path: file {source!r} does not exist; give an existing "
                    ".safetensors / .ckpt checkpoint, a diffusers folder or a hub id (owner/name)"
                )
            scheduler_config = self._load_single_file(path)
        else:
            # a hub id is exactly owner/name; anything else that does not exist is a missing path
            if not common.could_be_hub_id(source) and not path.exists():
                raise ModelLoadError(
                    f"model.name_or_path: {source!r} is neither an existing folder nor a hub id "
                    "(owner/name); give a diffusers folder, a hub id or a .safetensors file"
                )
            if path.exists() and not path.is_dir():
                raise ModelLoadError(
                    f"model.name_or_path: {source!r} is a file but not a .safetensors / .ckpt "
                    "checkpoint; give a diffusers folder, a hub id or a .safetensors file"
                )
            location = str(path) if path.exists() else source
            try:
                self._load_text_parts(location)
                # torch_dtype at load: the host never holds the UNet in a wider dtype than trained
                self.unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", torch_dtype=self.dtype)
                self.vae = self._load_vae(location)
                scheduler_config = DDPMScheduler.load_config(location, subfolder="scheduler")
            except ModelLoadError:
                raise
            # OSError for missing files / hub look-ups; corrupt weights and configs raise others
            except Exception as exc:
                if path.exists():
                    subfolders = [f"{part}/" for part in self.folder_parts]
                    what = (
                        f"give a diffusers folder (model_index.json with {', '.join(subfolders[:-1])} "
                        f"and {subfolders[-1]})"
                    )
                else:
                    what = (
                        "no local folder of that name exists, so it was looked up as a hub id"
                        f"{common.offline_note()}; "
                        "give a diffusers folder, a .safetensors file or a hub id that is cached "
                        "or can be downloaded"
                    )
                raise ModelLoadError(
                    f"model.name_or_path: could not load a {self.model_label} model from {source!r}: "
                    f"{exc} ({what})"
                ) from exc
        self._freeze_and_cast()
        self.bind_loaded(scheduler_config)

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        from diffusers import DDPMScheduler

        super().bind(parts, configs)
        self.noise_scheduler = DDPMScheduler.from_config(dict(configs.scheduler or DEFAULT_NOISE_SCHEDULE))
        if self.model_cfg.is_v_pred:
            self.noise_scheduler.register_to_config(prediction_type="v_prediction")
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)
        self.vae_scale_factor = common.vae_scale_from_config(configs.part("vae"))
        self.text_length = int(configs.tokenizer_lengths.get("tokenizer", CLIP_TOKENS))

    # Hooks the SDXL adapter overrides: which text encoders there are and how they load.
    def _load_text_parts(self, location: str) -> None:
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder", torch_dtype=self.dtype)

    def _text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder]


    def _single_file_pipeline(self, path: Path, config: str) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_single_file(
            str(path), config=config, safety_checker=None, requires_safety_checker=False
        )

    def _take_text_parts(self, pipe: Any) -> None:
        self.tokenizer, self.text_encoder = pipe.tokenizer, pipe.text_encoder

    def _load_vae(self, config_source: str) -> Any:
        """The VAE: model.vae_path when set, else the vae/ of `config_source` (folder or hub id).

        model.vae_path may be a single file (its component config comes from `config_source`'s
        vae/, so it loads offline), a VAE folder, a pipeline folder with vae/, or a hub id.
        """
        from diffusers import AutoencoderKL

        vae_source = self.model_cfg.vae_path
        if not vae_source:
            return AutoencoderKL.from_pretrained(config_source, subfolder="vae")
        vae_path = Path(vae_source).expanduser()
        is_file = vae_path.suffix.lower() in SINGLE_FILE_SUFFIXES
        if (is_file or not common.could_be_hub_id(vae_source)) and not vae_path.exists():
            raise ModelLoadError(
                f"model.vae_path: {vae_source!r} does not exist; give a VAE .safetensors file, "
                "a VAE folder (with config.json) or a hub id, or leave it unset to use the model's VAE"
            )
        try:
            if is_file:
                return AutoencoderKL.from_single_file(str(vae_path), config=config_source, subfolder="vae")
            if vae_path.is_dir():
                if not (vae_path / "config.json").is_file() and (vae_path / "vae" / "config.json").is_file():
                    return AutoencoderKL.from_pretrained(str(vae_path), subfolder="vae")
                return AutoencoderKL.from_pretrained(str(vae_path))
            return AutoencoderKL.from_pretrained(vae_source)
        except Exception as exc:
            raise ModelLoadError(
                f"model.vae_path: could not load a VAE from {vae_source!r}: {exc} (give a VAE "
                ".safetensors file, a VAE folder with config.json, a pipeline folder with vae/ or "
                f"a hub id{common.offline_note()})"
            ) from exc

    def _load_single_file(self, path: Path) -> dict[str, Any]:
        """Load the parts of a single-file checkpoint; returns the scheduler config."""
        config = str(self.model_cfg.model_kwargs.get("config") or self.default_config_repo)
        if Path(config).expanduser().exists():
            config = str(Path(config).expanduser())
        try:
            pipe = self._single_file_pipeline(path, config)
        except Exception as exc:  # diffusers raises several types for unreadable / foreign files
            raise ModelLoadError(
                f"model.name_or_path: {path} could not be read as a {self.model_label} checkpoint "
                f"(component configs from {config!r}; set model.model_kwargs.config to a local "
                f"diffusers folder when offline): {exc}"
            ) from exc
        self._take_text_parts(pipe)
        self.unet = pipe.unet
        self.vae = self._load_vae_override(pipe.vae, config)
        return dict(pipe.scheduler.config)

    def _load_vae_override(self, vae: Any, config_source: str) -> Any:
        return self._load_vae(config_source) if self.model_cfg.vae_path else vae

    def _freeze_and_cast(self) -> None:
        common.freeze((self.unet, self.vae, *self._text_encoders()))
        common.cast(self.unet, self.dtype)
        for encoder in self._text_encoders():
            common.cast(encoder, self.dtype)
        # The VAE stays fp32: fp16 SD VAEs overflow, and it only runs for caching and previews.
        common.cast(self.vae, torch.float32)

    def denoiser(self) -> torch.nn.Module:
        return self.unet

    def offload_blocks(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        if module is self.unet:  # the UNet's stages: diffusers names only its attention blocks
            mid = [module.mid_block] if module.mid_block is not None else []
            return [*module.down_blocks, *mid, *module.up_blocks]
        return super().offload_blocks(module)

    def network_candidates(self, include_conv: bool) -> list[str]:
        from aitk.networks.targets import unet_lora_candidates

        return unet_lora_candidates(self.unet, include_conv)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    # --- encoding ------------------------------------------------------------------------
    # no torch.no_grad() here: with train.train_text_encoder the conditioner encodes with gradients
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return PromptEmbeds(self.text_encoder(ids)[0])

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, std) the latents are normalised with beyond the scaling factor; None for SD 1.x /
        2.x, whose pipelines only scale (SDXL overrides this)."""
        return None

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = common.encode_mode(self.vae, pixels, self.device)
        stats = self._latent_stats(latents)
        if stats is not None:
            latents = latents - stats[0]
            return latents * self.vae.config.scaling_factor / stats[1]
        return latents * self.vae.config.scaling_factor

    def latent_space_id(self) -> str:
        cfg = self.vae.config
        return f"sd-vae:{cfg.latent_channels}:{cfg.scaling_factor}:{self.model_cfg.vae_path or self.model_cfg.name_or_path}"

    # --- training objective --------------------------------------------------------------
    def make_noisy_batch(
        self,
        latents: torch.Tensor,
        train_cfg: TrainConfig,
        generator: torch.Generator | None,
        context: BatchContext | None = None,
    ) -> NoisyBatch:
        from aitk.models.sd.timesteps import draw_timesteps
        from aitk.models.noise import apply_noise_offset, min_snr_weights

        batch = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device)
        noise = apply_noise_offset(noise, train_cfg.noise_offset, generator)
        num_train = self.noise_scheduler.config.num_train_timesteps
        timesteps = draw_timesteps(batch, train_cfg, generator, num_train, self.model_label).to(latents.device)

        latents = latents.to(torch.float32)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        weights = None
        if train_cfg.min_snr_gamma:
            weights = min_snr_weights(
                timesteps, self.alphas_cumprod, train_cfg.min_snr_gamma, self.prediction_type
            )
        return NoisyBatch(noisy.to(self.dtype), timesteps, target, weights)

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        config = self.unet.config
        h, w = size[1] // self.vae_scale_factor, size[0] // self.vae_scale_factor
        latents = torch.randn(batch, config.in_channels, h, w)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (batch,))
        hidden = torch.randn(batch, self.text_length, config.cross_attention_dim, dtype=self.dtype)
        return NoisyBatch(latents.to(self.dtype), timesteps, torch.randn(latents.shape)), PromptEmbeds(hidden)

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        return self.unet(
            batch.noisy_latents, batch.timesteps, encoder_hidden_states=cond.hidden_states.to(self.dtype)
        ).sample

    # --- previews ------------------------------------------------------------------------
    def _pipeline(self, scheduler: Any) -> Any:
        """The model's diffusers pipeline over the live modules (the UNet as the network wraps it)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def preview_sampler_note(self, sampler: str) -> str | None:
        if sampler == "flowmatch":
            return "Euler (EulerDiscreteScheduler): Stable Diffusion is not a flow-matching model"
        return None

    def sample_pipeline(self, sampler: str | None = None) -> Any:
        from aitk.models.samplers import preview_scheduler

        return self._pipeline(preview_scheduler(sampler, self.noise_scheduler.config))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Any]:
        # The VAE decodes in fp32 whatever dtype the denoiser ran in (bf16 latents would not mix,
        # and SDXL's VAE overflows in fp16).
        latents = latents.to(self.device, torch.float32)
        stats = self._latent_stats(latents)
        if stats is not None:
            latents = latents * stats[1] / self.vae.config.scaling_factor + stats[0]
        else:
            latents = latents / self.vae.config.scaling_factor
        pixels = self.vae.decode(latents).sample
        return common.pixels_to_pil(pixels, self.vae_scale_factor)


class SD2Adapter(SD15Adapter):
    """Stable Diffusion 2.x: SD 1's pipeline with an OpenCLIP text encoder; only the LoRA files'
    metadata tells it apart here. The prediction type comes from the model's scheduler config
    (v for the 768 models, epsilon for the 512 base) or `model.is_v_pred`."""

    arch_names = ("sd2",)
    #: the 512 base (epsilon): kohya's ss_base_model_version, the SAI model spec architecture
    base_model_version = "sd_v2"
    modelspec_architecture = "stable-diffusion-v2-512/lora"
    #: the same for the 768 v-prediction model
    v_prediction_names = ("sd_v2_v", "stable-diffusion-v2-768-v/lora")
    card_license = {"license": "openrail++"}

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        cls = type(self)
        v_model = self.prediction_type == "v_prediction"
        names = self.v_prediction_names if v_model else (cls.base_model_version, cls.modelspec_architecture)
        self.base_model_version, self.modelspec_architecture = names
