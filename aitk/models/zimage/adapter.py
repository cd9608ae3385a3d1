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
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from aitk.config.schema import TrainConfig
from aitk.models import common
from aitk.models.base import BatchContext, ModelAdapter, ModelLoadError, NoisyBatch, PartConfigs, PromptEmbeds

#: ai-toolkit's training (and preview) scheduler for Z-Image: a fixed shift, no dynamic shifting
TRAIN_SHIFT = 3.0
DEFAULT_SCHEDULER = {"num_train_timesteps": 1000, "shift": TRAIN_SHIFT, "use_dynamic_shifting": False}
DEFAULT_TEXT_LENGTH = 512  # ZImagePipeline's max_sequence_length
#: where the VAE, text encoder and tokenizer of a single-file transformer come from (ai-toolkit's choice)
SINGLE_FILE_EXTRAS = "Tongyi-MAI/Z-Image-Turbo"
SINGLE_FILE_SUFFIXES = (".safetensors", ".sft")
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


class ZImageAdapter(ModelAdapter):
    arch_names = ("zimage",)
    text_encoder_names = ("text_encoder",)
    bucket_divisibility = 16  # 8x VAE downscale x 2x2 patches
    lora_prefix = "diffusion_model."  # ComfyUI's Z-Image LoRA names: diffusion_model.<module path>
    lora_weight_names = ("lora_A", "lora_B")
    diffusers_lora_prefix = "transformer"
    base_model_version = "zimage"  # ai-toolkit's
    modelspec_architecture = "z-image/lora"
    model_label = "Z-Image"
    denoiser_names = ("transformer",)
    card_tags = ("z-image",)
    card_license = {"license": "apache-2.0"}  # Z-Image Turbo, Z-Image and De-Turbo

    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        return any(ZIMAGE_ATTENTION_STEM.match(key) for key in tensors)

    # --- loading -------------------------------------------------------------------------
    def load(self) -> None:
        source = self.model_cfg.name_or_path
        path = Path(source).expanduser()
        hint = (
            "give a diffusers folder or hub id (model_index.json, transformer/, vae/, text_encoder/, "
            "tokenizer/, scheduler/), a transformer folder or .safetensors file with "
            "model.extras_name_or_path for the other parts"
        )
        single = path.suffix.lower() in SINGLE_FILE_SUFFIXES
        if path.exists() and not (path.is_dir() or single):
            raise ModelLoadError(f"model.name_or_path: {source!r} is a file but no .safetensors; {hint}")
        if not path.exists() and (single or not common.could_be_hub_id(source)):
            raise ModelLoadError(f"model.name_or_path: {source!r} is neither an existing path nor a hub id; {hint}")
        extras = self._extras_location(source, path, single)
        self.parts_source = extras  # the text encoder's and VAE's: part of the caches' keys
        try:
            self.transformer = self._load_transformer(source, path, single, extras)
            scheduler_config = self._load_parts(extras)
        except ModelLoadError:
            raise
        except Exception as exc:  # OSError for missing parts / hub look-ups, others for bad files
            where = hint if path.exists() else f"looked up as a hub id{common.offline_note()}; {hint}"
            raise ModelLoadError(
                f"model.name_or_path: could not load a {self.model_label} model from {source!r}"
                f"{f' (other parts from {extras!r})' if extras != source else ''}: {exc} ({where})"
            ) from exc
        common.freeze((self.transformer, self.vae, self.text_encoder))
        for module in (self.transformer, self.text_encoder):
            common.cast(module, self.dtype)
        common.cast(self.vae, torch.float32)  # encodes / decodes in fp32 whatever trains
        self.bind_loaded(scheduler_config)
        if self.model_cfg.assistant_lora_path:
            from diffusers import ZImagePipeline

            from aitk.models.assistant import attach_assistant

            attach_assistant(self.transformer, ZImagePipeline, self.model_cfg.assistant_lora_path, self.model_label)
            self.has_assistant = True

    def _extras_location(self, source: str, path: Path, single: bool) -> str:
        """Where the VAE, text encoder, tokenizer and scheduler come from (ai-toolkit's rule: a
        full local pipeline folder itself, else extras_name_or_path, else the model)."""
        extras = getattr(self.model_cfg, "extras_name_or_path", None)
        if path.is_dir() and (path / "text_encoder").is_dir():
            return str(path)
        if extras:
            extras_path = Path(extras).expanduser()
            return str(extras_path) if extras_path.exists() else extras
        if single:
            return SINGLE_FILE_EXTRAS
        if path.is_dir():
            raise ModelLoadError(
                f"model.name_or_path: {source!r} has no text_encoder/; set model.extras_name_or_path to the "
                f"model its VAE, text encoder and tokenizer come from (e.g. {SINGLE_FILE_EXTRAS})"
            )
        return source

    def _load_transformer(self, source: str, path: Path, single: bool, extras: str) -> Any:
        from diffusers import ZImageTransformer2DModel

        # torch_dtype at load: the host never holds the 6B transformer in a wider dtype than it trains in
        if single:
            return ZImageTransformer2DModel.from_single_file(
                str(path), config=extras, subfolder="transformer", torch_dtype=self.dtype
            )
        if path.is_dir():
            if (path / "transformer").is_dir():
                return ZImageTransformer2DModel.from_pretrained(str(path), subfolder="transformer", torch_dtype=self.dtype)
            return ZImageTransformer2DModel.from_pretrained(str(path), torch_dtype=self.dtype)
        return ZImageTransformer2DModel.from_pretrained(source, subfolder="transformer", torch_dtype=self.dtype)

    def _load_parts(self, location: str) -> dict[str, Any]:
        """The VAE, text encoder and tokenizer; returns the scheduler config."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer, Qwen3Model

        self.tokenizer = AutoTokenizer.from_pretrained(location, subfolder="tokenizer")
        self.text_encoder = Qwen3Model.from_pretrained(location, subfolder="text_encoder", torch_dtype=self.dtype)
        self.vae = self._load_vae(location)
        try:
            return dict(FlowMatchEulerDiscreteScheduler.load_config(location, subfolder="scheduler"))
        except OSError:
            return dict(DEFAULT_SCHEDULER)

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
        wanted = int(self.model_cfg.model_kwargs.get("max_sequence_length", DEFAULT_TEXT_LENGTH))
        self.max_sequence_length = min(wanted, int(configs.tokenizer_lengths.get("tokenizer", wanted)))
        self.scheduler_config = dict(configs.scheduler or DEFAULT_SCHEDULER)
        self.vae_scale_factor = common.vae_scale_from_config(configs.part("vae"))
        self._text_pipe: Any = None
        self.has_assistant = False

    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def network_candidates(self, include_conv: bool) -> list[str]:
        return zimage_lora_candidates(self.transformer)  # no conv layers to add for LoCon

    # --- encoding ------------------------------------------------------------------------
    def _pipeline(self, scheduler: Any | None = None) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        if scheduler is None:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        return preview_pipeline_class()(
            scheduler=scheduler, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            transformer=self.transformer,
        )

    def release_text_encoders(self) -> int:
        self._text_pipe = None  # it holds the encoder too
        return super().release_text_encoders()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        # The pipeline's own encoder (chat template, hidden_states[-2], real tokens only), so
        # training sees exactly what previews and other tools see.
        if self._text_pipe is None:
            self._text_pipe = self._pipeline()
        embeds, _ = self._text_pipe.encode_prompt(
            prompt=list(prompts), device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return padded_prompts(embeds, self.max_sequence_length)

    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        return {
            "prompt_embeds": prompt_list(positive, self.device, self.dtype),
            "negative_prompt_embeds": prompt_list(negative, self.device, self.dtype),
        }

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = common.encode_mode(self.vae, pixels, self.device)
        return (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    def text_encoder_id(self) -> str:
        # the token count is part of the embedding's shape: a cache of another length is not reused
        source = getattr(self, "parts_source", self.model_cfg.name_or_path)
        return f"{self.modelspec_architecture}|{source}|qwen3:{self.max_sequence_length}"

    def latent_space_id(self) -> str:
        cfg = self.vae.config
        source = self.model_cfg.vae_path or getattr(self, "parts_source", self.model_cfg.name_or_path)
        return f"flux-vae:{cfg.latent_channels}:{cfg.scaling_factor}:{cfg.shift_factor}:{source}"

    # --- training objective --------------------------------------------------------------
    def check_train_settings(self, train_cfg: Any) -> None:
        from aitk.models.flow_matching import check_train_config

        check_train_config(train_cfg, self.model_label)
        if train_cfg.bypass_guidance_embedding:
            raise ZImageInputError(
                "train.bypass_guidance_embedding: Z-Image has no guidance embedding; remove the key"
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
        if h % PATCH or w % PATCH:
            raise ZImageInputError(f"Z-Image latents need an even height and width, got {h}x{w}")
        # noise levels first: the same seed then draws the same levels at every image size
        sigma = sample_sigmas(b, train_cfg, generator, shift=TRAIN_SHIFT).to(latents.device)
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
        # every position a real token: the longest prompt (prompt_list reads no values off a fake mask)
        cond = PromptEmbeds(
            torch.randn(batch, self.max_sequence_length, config.cap_feat_dim, dtype=self.dtype),
            {"mask": torch.ones(batch, self.max_sequence_length, dtype=torch.bool)},
        )
        return noisy, cond

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

    # --- previews ------------------------------------------------------------------------
    def sample_pipeline(self, sampler: str | None = None) -> Any:
        # the model's flow-match Euler scheduler whatever sample.sampler says (preview_sampler_note)
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
        return {"max_sequence_length": self.max_sequence_length}

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Any]:
        latents = latents.to(self.device, torch.float32)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        pixels = self.vae.decode(latents).sample
        return common.pixels_to_pil(pixels, self.vae_scale_factor * 2)
