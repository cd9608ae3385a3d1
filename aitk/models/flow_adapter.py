"""FlowTransformerAdapter: what the flow-matching transformer families (FLUX.1 and Kontext, SD 3,
Qwen-Image, Z-Image, Lumina 2, Chroma, FLUX.2, HiDream, AuraFlow, CogView4, Krea 2, ERNIE-Image)
share.

- Loading: the parts of a diffusers folder or hub id, or (families with `transformer_class_name`)
  a transformer alone with the other parts from model.extras_name_or_path
  (aitk.models.diffusers_parts); frozen, the VAE in fp32; an assistant LoRA where the family
  takes one (aitk.models.assistant).
- Training: rectified flow (aitk.models.flow_matching): per-sample sigma drawn by
  train.timestep_type with the family's time shift, noise (with train.noise_offset),
  x = (1 - sigma) * x0 + sigma * noise, target noise - x0, NoisyBatch.timesteps = 1000 * sigma,
  and "weighted"'s loss weights (aitk.models.flow_timestep_types).
- Previews: the family's diffusers pipeline over the live modules with its own flow-match Euler
  scheduler, whatever sample.sampler says.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from aitk.config.schema import TrainConfig
from aitk.models import common, diffusers_parts
from aitk.models.base import BatchContext, ModelAdapter, NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.diffusers_parts import (
    decode_scaled_latents,
    encode_scaled_latents,
    folder_hint,
    freeze_loaded,
    load_from_folder,
    load_errors,
    load_transformer,
    load_vae,
    transformer_hint,
    transformer_source,
    vae_space_id,
)


class FlowTransformerAdapter(ModelAdapter):
    """A flow-matching transformer with a VAE and text encoders, loaded from diffusers parts and
    previewed through its diffusers pipeline.

    A subclass provides:
    - its facts: `arch_names`, `model_label`, `pipeline_name` (the diffusers pipeline; its LoRA
      loader also reads an assistant LoRA), `text_encoder_names`, `folder_parts`, `input_error`,
      the LoRA names (`lora_prefix`, `lora_weight_names`) and the model card's;
    - `_load_parts(location)`: load the tokenizers, text encoders and VAE (`_load_vae`) and, unless
      `transformer_class_name` is set (then the transformer may come alone and loads here first),
      the transformer; return the scheduler config (diffusers_parts.scheduler_config);
    - `bind` (super().bind first): `max_sequence_length` and what else its prompts need;
    - `encode_prompts` (through `_text_pipeline()`), `preview_prompt_kwargs`, `network_candidates`,
      `example_batch` (with `_example_latents` / `_example_noisy`) and `predict`;
    - `shift_kwargs(height, width)`: sample_sigmas' time shift (or its own `training_sigmas`);
    - `_unpack_preview` when its pipeline returns packed tokens.
    It may override `_pipeline_class`, `_scheduler` (the preview scheduler), `_batch_extra`,
    `_check_latent_size`, `encode_images` and `_decode_pixels` (another latent normalisation),
    `_vae_scale` and `_scheduler_from`.
    """

    denoiser_names = ("transformer",)
    diffusers_lora_prefix = "transformer"
    bucket_divisibility = 16  # 8x VAE downscale x 2x2 patches
    #: the model's name in messages ("FLUX.1"), and its article there
    model_label: str = ""
    model_article: str = "a"
    #: the diffusers pipeline class (attribute of `diffusers`) previews and assistant LoRAs use
    pipeline_name: str = ""
    #: the subfolders of the model's diffusers folder (named in load errors)
    folder_parts: tuple[str, ...] = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    #: of those, the ones a local folder must have before anything loads
    required_folder_parts: tuple[str, ...] = ()
    #: a hub id the load errors give as an example ("" = none)
    folder_example: str = ""
    #: single files a folder-only family refuses as model.name_or_path (named so in its error)
    checkpoint_suffixes: tuple[str, ...] = diffusers_parts.CHECKPOINT_SUFFIXES
    #: the VAE class (attribute of `diffusers`)
    vae_class_name: str = "AutoencoderKL"
    #: set: model.name_or_path may name the transformer alone (a folder or single file) of this
    #: class, the other parts coming from model.extras_name_or_path or, for a single file,
    #: `single_file_extras`
    transformer_class_name: str = ""
    single_file_extras: str = ""
    #: of those, whether the transformer may be one .safetensors file (diffusers' from_single_file)
    transformer_single_file: bool = True
    #: the latents are (latent - shift_factor) * scaling_factor; False: scaled only (the
    #: pipelines of SD's 4-channel VAE and CogView4's ignore the shift)
    vae_shifted: bool = True
    #: the scheduler config when a model is bound without one (the plan)
    default_scheduler: Mapping[str, Any] = {}
    #: the error class of batches and settings this model cannot train on
    input_error: type[ValueError] = ValueError
    #: latents need a height and width that are multiples of this (the transformer's patch side)
    latent_patch: int = 2
    #: text_encoder_id's name of the token limit; latent_space_id's name of the latent space
    text_length_tag: str = "t5"
    latent_space_name: str = "flux-vae"
    #: model.assistant_lora_path is loaded (list the arch in archs.ASSISTANT_LORA_ARCHS too)
    loads_assistant_lora: bool = False
    #: set: train.bypass_guidance_embedding is refused with this reason (no guidance embedding)
    bypass_guidance_note: str | None = None

    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]

    # --- loading -------------------------------------------------------------------------
    def load(self) -> None:
        scheduler_config = self._load_sources()
        freeze_loaded(self.loaded_parts(), self.dtype, self.auxiliary_names)
        self.bind_loaded(scheduler_config)
        if self.loads_assistant_lora and self.model_cfg.assistant_lora_path:
            self._attach_assistant(self.model_cfg.assistant_lora_path)

    def _what(self) -> str:
        return f"{self.model_article} {self.model_label} model"

    def _load_sources(self) -> dict[str, Any]:
        """Load every part from model.name_or_path (and extras); returns the scheduler config."""
        if self.transformer_class_name:
            return self._load_transformer_and_extras()
        hint = folder_hint(self.folder_parts, self.folder_example)
        return load_from_folder(self.model_cfg.name_or_path, self._what(), self.model_label, hint, self._load_parts,
                                required=self.required_folder_parts, checkpoint_suffixes=self.checkpoint_suffixes)

    def _load_transformer_and_extras(self) -> dict[str, Any]:
        import diffusers

        hint = transformer_hint(self.folder_parts) if self.transformer_single_file else self._folder_only_hint()
        where = transformer_source(self.model_cfg, hint, self._single_file_extras(),
                                   single_files=self.transformer_single_file, folder_extras=self._folder_extras())
        self._locate_extras(where.extras)
        with load_errors(self._what(), where.source, hint, local=where.path.exists(), extras=where.extras):
            self.transformer = load_transformer(getattr(diffusers, self.transformer_class_name), where, self.dtype)
            return self._load_parts(where.extras)

    def _locate_extras(self, extras: str) -> None:
        """Note where the other parts of a transformer loaded alone come from (`parts_source`,
        part of the caches' keys) before anything loads."""
        self.parts_source = extras

    def _single_file_extras(self) -> str:
        """Where a single transformer file's other parts (and its config) come from."""
        return self.single_file_extras

    def _folder_extras(self) -> str | None:
        """Where a transformer folder's other parts come from without model.extras_name_or_path
        (None: it must be set)."""
        return None

    def _folder_only_hint(self) -> str:
        """The load errors' hint of a family whose transformer may come alone as a folder only."""
        listed = ", ".join(f"{p}/" for p in self.folder_parts)
        example = f", e.g. {self.single_file_extras}" if self.single_file_extras else ""
        return (f"give a diffusers folder or hub id (model_index.json, {listed}){example}, or a transformer "
                "folder with model.extras_name_or_path for the other parts")

    def _load_parts(self, location: str) -> dict[str, Any]:
        """Load the parts at `location` (module docstring); returns the scheduler config."""
        raise NotImplementedError(f"{type(self).__name__} must say how its parts load (_load_parts)")

    def _load_folder_parts(self, location: str, encoder_cls: type, tokenizer_cls: type | None = None,
                           transformer_cls: type | None = None) -> None:
        """tokenizer/ (AutoTokenizer unless `tokenizer_cls`), text_encoder/ (an `encoder_cls`, what
        keep_of_text_encoder keeps of it), transformer/ (with `transformer_cls`: for the models
        whose transformer comes from the folder too) and the VAE at `location`."""
        from transformers import AutoTokenizer

        self.tokenizer = (tokenizer_cls or AutoTokenizer).from_pretrained(location, subfolder="tokenizer")
        # torch_dtype at load: the host never holds a part in a wider dtype than it trains in
        encoder = encoder_cls.from_pretrained(location, subfolder="text_encoder", torch_dtype=self.dtype)
        self.text_encoder = self.keep_of_text_encoder("text_encoder", encoder)
        if transformer_cls is not None:
            self.transformer = transformer_cls.from_pretrained(location, subfolder="transformer", torch_dtype=self.dtype)
        self.vae = self._load_vae(location)

    def _load_vae(self, location: str) -> Any:
        """The model's vae/, or model.vae_path (a VAE folder, a pipeline folder with vae/, a hub id)."""
        import diffusers

        return load_vae(getattr(diffusers, self.vae_class_name), location, self.model_cfg.vae_path)

    def _attach_assistant(self, source: str) -> None:
        import diffusers

        from aitk.models.assistant import attach_assistant

        attach_assistant(self.transformer, getattr(diffusers, self.pipeline_name), source, self.model_label)
        self.has_assistant = True

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        self.scheduler_config = self._scheduler_from(configs)
        self.vae_scale_factor = self._vae_scale(configs)
        self._preview_size: tuple[int, int] | None = None
        self._text_pipe: Any = None
        self.has_assistant = False

    def _text_length(self, default: int, tokenizer: str = "tokenizer") -> int:
        """Tokens per prompt: model.model_kwargs.max_sequence_length (else `default`, at least 1),
        never more than `tokenizer` allows (bind first; the tiny test models allow 32)."""
        wanted = int(self.model_cfg.model_kwargs.get("max_sequence_length", default))
        if wanted < 1:
            raise self.input_error(f"model.model_kwargs.max_sequence_length: {wanted} must be at least 1 "
                                   f"(default {default})")
        return min(wanted, int(self.part_configs.tokenizer_lengths.get(tokenizer, wanted)))

    def _scheduler_from(self, configs: PartConfigs) -> dict[str, Any]:
        return dict(configs.scheduler or self.default_scheduler)

    def _vae_scale(self, configs: PartConfigs) -> int:
        return common.vae_scale_from_config(configs.part("vae"))

    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    # --- encoding ------------------------------------------------------------------------
    def _pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_name)

    def _scheduler(self) -> Any:
        """The previews' scheduler: the model's flow-match Euler."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)

    def _pipeline(self, scheduler: Any | None = None) -> Any:
        """The family's pipeline over the live modules, with its preview scheduler."""
        if scheduler is None:
            scheduler = self._scheduler()
        parts: dict[str, Any] = {"transformer": self.transformer, "vae": self.vae}
        for name in self.text_encoder_names:
            tokenizer = name.replace("text_encoder", "tokenizer")
            parts[name], parts[tokenizer] = getattr(self, name, None), getattr(self, tokenizer, None)
        return self._pipeline_class()(scheduler=scheduler, **parts)

    def _text_pipeline(self) -> Any:
        """The pipeline whose own prompt encoding training uses, so training sees exactly what
        previews and other tools see (kept until the text encoders are released)."""
        if self._text_pipe is None:
            self._text_pipe = self._pipeline()
        return self._text_pipe

    def release_text_encoders(self) -> int:
        self._text_pipe = None  # it holds the encoders too
        return super().release_text_encoders()

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_scaled_latents(self.vae, pixels, self.device, self.vae_shifted)

    def _parts_source(self) -> str:
        """Where the text encoders and VAE came from (part of the caches' keys): the extras of a
        transformer loaded alone, else the model."""
        return getattr(self, "parts_source", None) or self.model_cfg.name_or_path

    def text_encoder_id(self) -> str:
        # the token limit is part of the embedding's shape: a cache of another limit must not be reused
        return f"{self.modelspec_architecture}|{self._parts_source()}|{self.text_length_tag}:{self.max_sequence_length}"

    def latent_space_id(self) -> str:
        source = self.model_cfg.vae_path or self._parts_source()
        return vae_space_id(self.latent_space_name, self.vae, source, self.vae_shifted)

    # --- training objective --------------------------------------------------------------
    def check_train_settings(self, train_cfg: Any) -> None:
        from aitk.models.flow_matching import check_train_config

        check_train_config(train_cfg, self.model_label)
        if train_cfg.bypass_guidance_embedding and self.bypass_guidance_note:
            raise self.input_error(f"train.bypass_guidance_embedding: {self.bypass_guidance_note}")

    def shift_kwargs(self, height: int, width: int) -> dict[str, float]:
        """sample_sigmas' time shift (`mu` or `shift`) for latents of height x width."""
        raise NotImplementedError(f"{type(self).__name__} must give its time shift (shift_kwargs)")

    def training_sigmas(
        self, batch: int, height: int, width: int, train_cfg: TrainConfig, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Per-sample noise levels (B,) on the CPU for latents of height x width."""
        from aitk.models.flow_matching import sample_sigmas

        return sample_sigmas(batch, train_cfg, generator, **self.shift_kwargs(height, width))

    def _check_latent_size(self, height: int, width: int) -> None:
        patch = self.latent_patch
        if height % patch or width % patch:
            rule = f"a height and width divisible by the patch size {patch}"
            if patch == 2:
                rule = f"an even height and width (divisible by the patch size {patch})"
            raise self.input_error(
                f"{self.model_label} latents need {rule}, got {height}x{width} (buckets must be multiples of "
                f"{self.bucket_divisibility} px)"
            )

    def _batch_extra(self, latents: torch.Tensor, context: BatchContext | None) -> dict[str, Any]:
        """Model inputs beyond the noisy latents (e.g. Kontext's control latents)."""
        return {}

    def make_noisy_batch(self, latents: torch.Tensor, train_cfg: TrainConfig, generator: torch.Generator | None,
                         context: BatchContext | None = None) -> NoisyBatch:
        from aitk.models.flow_matching import noisy_and_target
        from aitk.models.flow_timestep_types import weighted_loss
        from aitk.models.noise import apply_noise_offset

        self.check_train_settings(train_cfg)
        b, _, h, w = latents.shape
        self._check_latent_size(h, w)
        # noise levels first: the same seed then draws the same levels at every image size
        sigma = self.training_sigmas(b, h, w, train_cfg, generator).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        noise = apply_noise_offset(noise, train_cfg.noise_offset, generator).to(latents.device)
        noisy, target = noisy_and_target(latents, noise, sigma)
        extra = self._batch_extra(latents, context)
        weights = weighted_loss(sigma) if (train_cfg.timestep_type or "").lower() == "weighted" else None
        return NoisyBatch(noisy.to(self.dtype), sigma * 1000.0, target, weights, extra)

    def _example_latents(self, batch: int, size: tuple[int, int], channels: int) -> torch.Tensor:
        """Random latents of `batch` images of `size` (width, height in pixels)."""
        h, w = size[1] // self.vae_scale_factor, size[0] // self.vae_scale_factor
        return torch.randn(batch, channels, h, w)

    def _example_text_to_image(self, batch: int, size: tuple[int, int], text_width: str,
                               mask_dtype: torch.dtype) -> tuple[NoisyBatch, PromptEmbeds]:
        """example_batch of a text-to-image transformer: random latents of its in_channels, prompts
        as wide as its config's `text_width` with `mask_dtype` masks."""
        config = self.transformer.config
        noisy = self._example_noisy(self._example_latents(batch, size, config.in_channels))
        return noisy, self._example_prompts(batch, getattr(config, text_width), mask_dtype)

    def _example_noisy(self, latents: torch.Tensor, extra: dict[str, Any] | None = None) -> NoisyBatch:
        """example_batch's NoisyBatch around `latents`: random timesteps and target."""
        return NoisyBatch(latents.to(self.dtype), torch.rand(latents.shape[0]) * 1000.0, torch.randn(latents.shape),
                          None, extra if extra is not None else {})

    def _example_prompts(self, batch: int, width: int, mask_dtype: torch.dtype) -> PromptEmbeds:
        """example_batch's prompts: the longest a batch can hold (the plan sizes for it), every
        token real ("mask" all ones)."""
        length = self.max_sequence_length
        hidden = torch.randn(batch, length, width, dtype=self.dtype)
        return PromptEmbeds(hidden, {"mask": torch.ones(batch, length, dtype=mask_dtype)})

    # --- previews ------------------------------------------------------------------------
    def sample_pipeline(self, sampler: str | None = None) -> Any:
        # the model's own flow-match Euler scheduler whatever sample.sampler says
        # (preview_sampler_note says so at start)
        return self._pipeline()

    def preview_sampler_note(self, sampler: str) -> str | None:
        if sampler in ("flowmatch", "euler"):
            return None
        return f"flow-match Euler: {self.model_label} is a flow-matching model, {sampler} does not apply"

    def preview_context(self) -> AbstractContextManager[None]:
        if not self.has_assistant:
            return nullcontext()
        from aitk.models.assistant import assistant_off

        return assistant_off(self.transformer)

    def preview_kwargs(self, request: Any) -> dict[str, Any]:
        # The sampler snaps sizes to 8 px and the pipelines floor them to 16: remember the result,
        # because packed latents a pipeline returns do not carry their image size.
        self._preview_size = (max(16, request.height // 16 * 16), max(16, request.width // 16 * 16))
        return {"max_sequence_length": self.max_sequence_length}

    def _preview_pixel_size(self, tokens: int) -> tuple[int, int]:
        """(height, width) in pixels of a preview's `tokens` packed 2x2-patch tokens."""
        if self._preview_size is not None:
            return self._preview_size
        side = int(round(tokens**0.5)) * 2 * self.vae_scale_factor  # no request seen: a square image
        return side, side

    def _unpack_preview(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed tokens (B, N, D) from the pipeline -> latents (B, C, h, w)."""
        raise NotImplementedError(f"{type(self).__name__}'s pipeline returns no packed latents")

    def _decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_scaled_latents(self.vae, latents, self.vae_shifted)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Any]:
        latents = latents.to(self.device, torch.float32)
        if latents.ndim == 3:  # packed tokens from the pipeline
            latents = self._unpack_preview(latents)
        return common.pixels_to_pil(self._decode_pixels(latents), self.vae_scale_factor * self.latent_patch)
