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
from pathlib import Path
from typing import Any

import torch

from aitk.config.schema import TrainConfig
from aitk.models import common
from aitk.models.base import BatchContext, ModelAdapter, ModelLoadError, NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.flux2 import latents as f2
from aitk.models.flux2.keys import FUSED_QKV, flux2_lora_candidates, is_flux2_lora, lora_key_stem, module_for_stem

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".sft")
#: FLUX.2's scheduler_config.json: the schedule when a model is bound without one (the plan)
DEFAULT_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
    "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
}
DEFAULT_TEXT_LENGTH = 512  # the pipelines' max_sequence_length


class Flux2InputError(ValueError):
    """A batch or setting this FLUX.2 model cannot train on."""


class Flux2Adapter(ModelAdapter):
    arch_names = ("flux2",)
    text_encoder_names = ("text_encoder",)
    bucket_divisibility = 16  # 8x VAE downscale x 2x2 patches
    lora_prefix = "diffusion_model."  # ai-toolkit's and ComfyUI's: diffusion_model.<original path>
    lora_weight_names = ("lora_A", "lora_B")  # ai-toolkit's FLUX.2 names, with `.alpha` beside them
    lora_fused_weights = FUSED_QKV  # one LoRA on each fused img_attn / txt_attn qkv in comfyui-layout files
    diffusers_lora_prefix = "transformer"
    denoiser_names = ("transformer",)
    base_model_version = "flux2"  # ai-toolkit's
    modelspec_architecture = "flux-2-dev/lora"
    modelspec_implementation = "https://github.com/black-forest-labs/flux2"
    default_config_repo = "black-forest-labs/FLUX.2-dev"
    model_label = "FLUX.2 dev"
    card_tags = ("flux2", "flux")
    card_license = {
        "license": "other",
        "license_name": "flux-dev-non-commercial-license",
        "license_link": "https://huggingface.co/black-forest-labs/FLUX.2-dev",
    }
    #: guidance-distilled: previews take guidance_scale as the embedded guidance, no negative prompt
    distilled = True

    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        return is_flux2_lora(tensors)

    # --- loading -------------------------------------------------------------------------
    def load(self) -> None:
        source = self.model_cfg.name_or_path
        path = Path(source).expanduser()
        hint = (
            "give a diffusers folder or hub id (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, "
            "scheduler/), or a transformer folder or .safetensors file with model.extras_name_or_path for the rest"
        )
        single = path.suffix.lower() in SINGLE_FILE_SUFFIXES
        if path.exists() and not (path.is_dir() or single):
            raise ModelLoadError(f"model.name_or_path: {source!r} is a file but no .safetensors; {hint}")
        if not path.exists() and (single or not common.could_be_hub_id(source)):
            raise ModelLoadError(f"model.name_or_path: {source!r} is neither an existing path nor a hub id; {hint}")
        extras = self._extras_location(path, single)
        self.parts_source = extras  # the text encoder's and VAE's: part of the caches' keys
        try:
            self.transformer = self._load_transformer(source, path, single, extras)
            scheduler = self._load_parts(extras)
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
        text_tokenizer = getattr(self.tokenizer, "tokenizer", self.tokenizer)  # a processor's own tokenizer
        parts = self.loaded_parts()
        self.bind(parts, PartConfigs.of_loaded(parts, {"tokenizer": text_tokenizer}, scheduler))

    def _extras_location(self, path: Path, single: bool) -> str:
        """Where the VAE, text encoder, tokenizer and scheduler come from: a full local pipeline
        folder itself, else model.extras_name_or_path, else the model (a transformer alone: the
        family's hub repo)."""
        if path.is_dir() and (path / "text_encoder").is_dir():
            return str(path)
        extras = self.model_cfg.extras_name_or_path
        if extras:
            extras_path = Path(extras).expanduser()
            return str(extras_path) if extras_path.exists() else extras
        if single or (path.is_dir() and not (path / "model_index.json").is_file()):
            return str(self.model_cfg.model_kwargs.get("config") or self.default_config_repo)
        return str(path) if path.is_dir() else self.model_cfg.name_or_path

    def _load_transformer(self, source: str, path: Path, single: bool, extras: str) -> Any:
        from diffusers import Flux2Transformer2DModel

        # torch_dtype at load: the host never holds the transformer in a wider dtype than it trains in
        if single:
            return Flux2Transformer2DModel.from_single_file(
                str(path), config=extras, subfolder="transformer", torch_dtype=self.dtype
            )
        if path.is_dir() and not (path / "transformer").is_dir() and (path / "config.json").is_file():
            return Flux2Transformer2DModel.from_pretrained(str(path), torch_dtype=self.dtype)
        location = str(path) if path.is_dir() else source
        return Flux2Transformer2DModel.from_pretrained(location, subfolder="transformer", torch_dtype=self.dtype)

    def _load_parts(self, location: str) -> dict[str, Any]:
        """The VAE, text encoder and tokenizer; returns the scheduler config."""
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler

        self.tokenizer = self._load_tokenizer(location)
        self.text_encoder = self._load_text_encoder(location)
        vae_source = self.model_cfg.vae_path
        if vae_source:
            vae_path = Path(vae_source).expanduser()
            try:
                sub = {"subfolder": "vae"} if vae_path.is_dir() and not (vae_path / "config.json").is_file() else {}
                self.vae = AutoencoderKLFlux2.from_pretrained(str(vae_path) if vae_path.exists() else vae_source, **sub)
            except Exception as exc:
                raise ModelLoadError(
                    f"model.vae_path: could not load a FLUX.2 VAE from {vae_source!r}: {exc} (give a VAE folder "
                    f"with config.json, a pipeline folder with vae/ or a hub id{common.offline_note()})"
                ) from exc
        else:
            self.vae = AutoencoderKLFlux2.from_pretrained(location, subfolder="vae")
        try:
            return dict(FlowMatchEulerDiscreteScheduler.load_config(location, subfolder="scheduler"))
        except OSError:
            return dict(DEFAULT_SCHEDULER)

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
        # text-only conditioning: the vision tower and its projector are never run
        encoder.model.vision_tower = None
        encoder.model.multi_modal_projector = None
        return encoder

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        wanted = int(self.model_cfg.model_kwargs.get("max_sequence_length", DEFAULT_TEXT_LENGTH))
        if wanted < 1:
            raise ValueError(f"model.model_kwargs.max_sequence_length: {wanted} must be at least 1 (default 512)")
        self.max_sequence_length = min(wanted, int(configs.tokenizer_lengths.get("tokenizer", wanted)))
        self.scheduler_config = dict(configs.scheduler or DEFAULT_SCHEDULER)
        self.vae_scale_factor = common.vae_scale_from_config(configs.part("vae"))
        self.has_guidance = bool(configs.part("transformer").get("guidance_embeds", self.distilled))
        self.train_guidance = float(self.model_cfg.model_kwargs.get("guidance", 1.0))
        self._preview_size: tuple[int, int] | None = None
        self._text_pipe: Any = None

    def denoiser(self) -> torch.nn.Module:
        return self.transformer

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

    def _pipeline(self) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return self._pipeline_class()(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config), vae=self.vae,
            text_encoder=self.text_encoder, tokenizer=self.tokenizer, transformer=self.transformer,
        )

    def release_text_encoders(self) -> int:
        self._text_pipe = None  # it holds the encoder too
        return super().release_text_encoders()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        # the pipeline's own encoder, so training sees exactly what previews and other tools see
        if self._text_pipe is None:
            self._text_pipe = self._pipeline()
        hidden, _ = self._text_pipe.encode_prompt(
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

    def text_encoder_id(self) -> str:
        # the token count is part of the embedding's shape: a cache of another length is not reused
        source = getattr(self, "parts_source", self.model_cfg.name_or_path)
        return f"{self.modelspec_architecture}|{source}|len:{self.max_sequence_length}"

    def latent_space_id(self) -> str:
        cfg = self.vae.config
        source = self.model_cfg.vae_path or getattr(self, "parts_source", self.model_cfg.name_or_path)
        return f"flux2-vae:{cfg.latent_channels}:{source}"

    # --- training objective --------------------------------------------------------------
    def check_train_settings(self, train_cfg: Any) -> None:
        from aitk.models.flow_matching import check_train_config

        check_train_config(train_cfg, self.model_label)
        if train_cfg.bypass_guidance_embedding:
            raise Flux2InputError(
                f"train.bypass_guidance_embedding: not supported for {self.model_label} in this version; remove the key"
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
        from aitk.models.flux.latents import image_seq_shift
        from aitk.models.noise import apply_noise_offset

        self.check_train_settings(train_cfg)
        b, _, h, w = latents.shape
        # noise levels first: the same seed then draws the same levels at every image size
        sigma = sample_sigmas(b, train_cfg, generator, mu=image_seq_shift(h * w, self.scheduler_config))
        sigma = sigma.to(latents.device)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        noise = apply_noise_offset(noise, train_cfg.noise_offset, generator).to(latents.device)
        noisy, target = noisy_and_target(latents, noise, sigma)
        weights = weighted_loss(sigma) if (train_cfg.timestep_type or "").lower() == "weighted" else None
        return NoisyBatch(noisy.to(self.dtype), sigma * 1000.0, target, weights, {})

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        config = self.transformer.config
        step = self.vae_scale_factor * 2  # one token per 2x2 patch of latents
        latents = torch.randn(batch, config.in_channels, size[1] // step, size[0] // step)
        noisy = NoisyBatch(latents.to(self.dtype), torch.rand(batch) * 1000.0, torch.randn(latents.shape), None, {})
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
    def sample_pipeline(self, sampler: str | None = None) -> Any:
        # flow-match Euler with the model's own schedule whatever sample.sampler says
        return self._pipeline()

    def preview_sampler_note(self, sampler: str) -> str | None:
        if sampler in ("flowmatch", "euler"):
            return None
        return f"flow-match Euler: {self.model_label} is a flow-matching model, {sampler} does not apply"

    def preview_kwargs(self, request: Any) -> dict[str, Any]:
        # the pipelines floor sizes to 16 px; dev's packed latents do not carry their image size
        self._preview_size = (max(16, request.height // 16 * 16), max(16, request.width // 16 * 16))
        return {"max_sequence_length": self.max_sequence_length}

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Any]:
        if latents.ndim == 3:  # packed tokens (Flux2Pipeline's output_type="latent")
            height, width = self._preview_size or (int(round(latents.shape[1] ** 0.5)) * 16,) * 2
            latents = f2.unpack(latents, height // 16, width // 16)
        return common.pixels_to_pil(f2.decode_latents(self.vae, latents), self.vae_scale_factor * 2)


class Flux2KleinAdapter(Flux2Adapter):
    """FLUX.2 Klein base: no guidance embedding, Qwen3 text encoder, classifier-free guidance in
    previews (Flux2KleinPipeline)."""

    distilled = False
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
    card_license = {"license": "apache-2.0"}


class Flux2Klein9BAdapter(Flux2KleinAdapter):
    arch_names = ("flux2_klein_9b",)
    base_model_version = "flux2_klein_9b"
    modelspec_architecture = "flux-2-klein-9b/lora"
    default_config_repo = "black-forest-labs/FLUX.2-klein-base-9B"
    model_label = "FLUX.2 Klein 9B"
    card_license = {
        "license": "other",
        "license_name": "flux-non-commercial-license",
        "license_link": "https://huggingface.co/black-forest-labs/FLUX.2-klein-base-9B",
    }
