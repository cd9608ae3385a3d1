"""Qwen-Image (and Qwen-Image-2512): QwenImageTransformer2DModel + the Qwen-Image VAE +
Qwen2.5-VL-7B as a text-only encoder, trained with flow matching as ai-toolkit trains it.

- Text: QwenImagePipeline.encode_prompt, so training sees what previews and other tools see: the
  prompt inside the pipeline's chat template, the last hidden state with the template's tokens
  dropped, padded to the longest prompt with a mask (PromptEmbeds.extra["mask"], 1 = a token).
  Up to model.model_kwargs.max_sequence_length tokens (default 512, the pipeline's). The vision
  tower is not used for text and is dropped after loading, as ai-toolkit does.
- Latents and noise levels: aitk.models.qwen_image.latents (2x2 patch tokens, the VAE's per-channel
  normalisation, resolution-dependent shift with the scheduler's shift_terminal stretch for the
  shift types); x = (1 - s) x0 + s e, target e - x0; the transformer gets timestep s.
  timestep_type "weighted" weights each sample's loss (aitk.models.flow_timestep_types).
- Buckets are multiples of 32 px (ai-toolkit's: 8x VAE x 2x2 patches, doubled).
- Previews: QwenImagePipeline, sample.guidance_scale as its true CFG scale (previews.py).
- Sources (ai-toolkit's rule): a diffusers folder or hub id; or the transformer alone (a
  transformer folder, or a .safetensors file through diffusers' from_single_file: ComfyUI's
  checkpoints use diffusers' names) with the other parts from model.extras_name_or_path (for a
  single file default Qwen/Qwen-Image).

LoRA files (save_format comfyui / kohya): `diffusion_model.<module path>.lora_down.weight`,
`.lora_up.weight` and `.alpha`. ComfyUI's Qwen-Image model has diffusers' module paths and maps
`diffusion_model.<path>` keys; diffusers' QwenImagePipeline.load_lora_weights converts the same
file, alpha included (docs/lora-formats.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aitk.config.schema import TrainConfig
from aitk.models import common
from aitk.models.base import BatchContext, ModelAdapter, ModelLoadError, NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.qwen_image import latents as qlatents
from aitk.models.qwen_image.latents import QwenImageInputError

SINGLE_FILE_SUFFIXES = {".safetensors", ".sft"}
FOLDER_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
#: Qwen-Image's scheduler_config.json: the schedule when a model is bound without one (the plan)
DEFAULT_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
    "max_shift": 0.9, "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}
#: text tokens per prompt (QwenImagePipeline.__call__'s default; it refuses more than 1024)
DEFAULT_MAX_SEQUENCE_LENGTH = 512
#: Linear layers a LoRA wraps by default in each transformer block: both streams' attention
#: projections and MLPs (the AdaLN modulation linears img_mod / txt_mod stay frozen, as for FLUX)
BLOCK_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)
#: module-name pieces only Qwen-Image's dual-stream blocks have (for `aitk lora info`'s guess)
_QWEN_BLOCK_PARTS = (".img_mlp.", ".txt_mlp.", ".img_mod.", ".txt_mod.")


def qwen_image_lora_candidates(transformer: torch.nn.Module) -> list[str]:
    """Default LoRA targets of a QwenImageTransformer2DModel, in model order."""
    from aitk.networks.lora import eligible_modules

    wanted = {f"transformer_blocks.{i}.{t}" for i in range(len(transformer.transformer_blocks)) for t in BLOCK_TARGETS}
    return [name for name in eligible_modules(transformer) if name in wanted]


def _padded(mask: torch.Tensor) -> bool:
    """Whether a text mask marks padding. Unpadded batches go without a mask, as in the pipeline
    (the attention then needs none, so any backend runs it); the plan's fake tensors hold no
    values and trace that common case (one prompt per batch is never padded)."""
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(mask) and not bool(mask.all())


def _remake_meta_rope(transformer: torch.nn.Module) -> None:
    """A transformer built on the meta device (the plan) has RoPE tables without values: diffusers
    keeps them as plain attributes, not buffers (complex buffers would lose their imaginary part
    in casts), so nothing gives them values later. Remade here, in the mode `example_batch` runs
    in (the plan's fake tensors); real tables are left alone."""
    rope = getattr(transformer, "pos_embed", None)
    if rope is None or not getattr(getattr(rope, "pos_freqs", None), "is_meta", False):
        return
    fresh = type(rope)(theta=rope.theta, axes_dim=list(rope.axes_dim), scale_rope=rope.scale_rope)
    rope.pos_freqs, rope.neg_freqs = fresh.pos_freqs, fresh.neg_freqs


class QwenImageAdapter(ModelAdapter):
    arch_names = ("qwen_image",)
    text_encoder_names = ("text_encoder",)
    bucket_divisibility = 32  # ai-toolkit's get_bucket_divisibility for Qwen-Image
    lora_prefix = "diffusion_model."  # ComfyUI's names: diffusion_model.<diffusers module path>
    diffusers_lora_prefix = "transformer"
    denoiser_names = ("transformer",)
    base_model_version = "qwen_image"
    modelspec_architecture = "qwen-image/lora"
    modelspec_implementation = "https://github.com/QwenLM/Qwen-Image"
    default_config_repo = "Qwen/Qwen-Image"
    model_label = "Qwen-Image"
    card_tags = ("qwen-image",)
    card_license = {"license": "apache-2.0"}

    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        return any("transformer_blocks." in k and any(p in k for p in _QWEN_BLOCK_PARTS) for k in tensors)

    # --- loading -------------------------------------------------------------------------
    def load(self) -> None:
        source = self.model_cfg.name_or_path
        path = Path(source).expanduser()
        hint = (
            "give a diffusers folder or hub id (model_index.json, " + ", ".join(f"{p}/" for p in FOLDER_PARTS)
            + "), or a transformer folder or .safetensors file with model.extras_name_or_path for the other parts"
        )
        single = path.suffix.lower() in SINGLE_FILE_SUFFIXES
        if path.exists() and not (path.is_dir() or single):
            raise ModelLoadError(f"model.name_or_path: {source!r} is a file but no .safetensors; {hint}")
        if not path.exists() and (single or not common.could_be_hub_id(source)):
            raise ModelLoadError(f"model.name_or_path: {source!r} is neither an existing path nor a hub id; {hint}")
        extras = self._extras_location(source, path, single)
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

    def _extras_location(self, source: str, path: Path, single: bool) -> str:
        """Where the VAE, text encoder, tokenizer and scheduler come from (ai-toolkit's rule: a
        full local pipeline folder itself, else model.extras_name_or_path, else the model; a
        single file without extras_name_or_path: Qwen/Qwen-Image)."""
        extras = self.model_cfg.extras_name_or_path
        if path.is_dir() and (path / "text_encoder").is_dir():
            return str(path)
        if extras:
            extras_path = Path(extras).expanduser()
            return str(extras_path) if extras_path.exists() else extras
        if single:
            return str(self.model_cfg.model_kwargs.get("config") or self.default_config_repo)
        if path.is_dir() and not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"model.name_or_path: {source!r} has no text_encoder/; set model.extras_name_or_path to the "
                f"model its VAE, text encoder and tokenizer come from (e.g. {self.default_config_repo})"
            )
        return str(path) if path.is_dir() else source

    def _load_transformer(self, source: str, path: Path, single: bool, extras: str) -> Any:
        from diffusers import QwenImageTransformer2DModel

        # torch_dtype at load: the host never holds the 20B transformer in a wider dtype than it trains in
        if single:
            return QwenImageTransformer2DModel.from_single_file(
                str(path), config=extras, subfolder="transformer", torch_dtype=self.dtype
            )
        if path.is_dir() and not (path / "transformer").is_dir() and (path / "config.json").is_file():
            return QwenImageTransformer2DModel.from_pretrained(str(path), torch_dtype=self.dtype)
        location = str(path) if path.is_dir() else source
        return QwenImageTransformer2DModel.from_pretrained(location, subfolder="transformer", torch_dtype=self.dtype)

    def _load_parts(self, location: str) -> dict[str, Any]:
        """The VAE, text encoder and tokenizer; returns the scheduler config."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

        self.tokenizer = Qwen2Tokenizer.from_pretrained(location, subfolder="tokenizer")
        self.text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            location, subfolder="text_encoder", torch_dtype=self.dtype
        )
        # text-only conditioning: the vision tower (about 0.7B parameters) is never run
        self.text_encoder.model.visual = None
        self.vae = self._load_vae(location)
        return dict(FlowMatchEulerDiscreteScheduler.load_config(location, subfolder="scheduler"))

    def _load_vae(self, location: str) -> Any:
        """The model's vae/, or model.vae_path (a VAE folder, a pipeline folder with vae/, a hub id)."""
        from diffusers import AutoencoderKLQwenImage

        vae_source = self.model_cfg.vae_path
        if not vae_source:
            return AutoencoderKLQwenImage.from_pretrained(location, subfolder="vae")
        vae_path = Path(vae_source).expanduser()
        try:
            if vae_path.is_dir() and not (vae_path / "config.json").is_file():
                return AutoencoderKLQwenImage.from_pretrained(str(vae_path), subfolder="vae")
            return AutoencoderKLQwenImage.from_pretrained(str(vae_path) if vae_path.exists() else vae_source)
        except Exception as exc:
            raise ModelLoadError(
                f"model.vae_path: could not load a Qwen-Image VAE from {vae_source!r}: {exc} (give a VAE "
                f"folder with config.json, a pipeline folder with vae/ or a hub id{common.offline_note()})"
            ) from exc

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        wanted = int(self.model_cfg.model_kwargs.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH))
        if not 1 <= wanted <= 1024:
            raise ValueError(
                f"model.model_kwargs.max_sequence_length: {wanted} is out of range; QwenImagePipeline takes "
                "1 to 1024 text tokens (default 512)"
            )
        self.max_sequence_length = wanted
        self.scheduler_config = dict(configs.scheduler or DEFAULT_SCHEDULER)
        self.vae_scale_factor = 2 ** len(configs.part("vae").get("temperal_downsample", (0, 0, 0)))
        self._preview_size: tuple[int, int] | None = None
        self._text_pipe: Any = None

    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def network_candidates(self, include_conv: bool) -> list[str]:
        return qwen_image_lora_candidates(self.transformer)  # no conv layers to add for LoCon

    # --- encoding ------------------------------------------------------------------------
    def _pipeline(self, scheduler: Any | None = None) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        from aitk.models.qwen_image.previews import preview_pipeline_class

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
        if self._text_pipe is None:
            self._text_pipe = self._pipeline()
        hidden, mask = self._text_pipe.encode_prompt(
            prompt=list(prompts), device=self.device, max_sequence_length=self.max_sequence_length
        )
        if mask is None:  # the pipeline gives no mask when no prompt is padded
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        return PromptEmbeds(hidden, {"mask": mask.long()})

    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        return {
            "prompt_embeds": positive.hidden_states, "prompt_embeds_mask": positive.extra["mask"],
            "negative_prompt_embeds": negative.hidden_states, "negative_prompt_embeds_mask": negative.extra["mask"],
        }

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return qlatents.encode_latents(self.vae, pixels, self.device)

    def text_encoder_id(self) -> str:
        # the token limit decides the embeddings: a cache of another limit must not be reused
        return f"{self.modelspec_architecture}|{self.model_cfg.name_or_path}|len:{self.max_sequence_length}"

    def latent_space_id(self) -> str:
        cfg = self.vae.config
        return (
            f"qwen-image-vae:{cfg.z_dim}:{list(cfg.latents_mean)}:{list(cfg.latents_std)}:"
            f"{self.model_cfg.vae_path or self.model_cfg.name_or_path}"
        )

    # --- training objective --------------------------------------------------------------
    def check_train_settings(self, train_cfg: Any) -> None:
        from aitk.models.flow_matching import check_train_config

        check_train_config(train_cfg, self.model_label)
        if train_cfg.bypass_guidance_embedding:
            raise QwenImageInputError(
                "train.bypass_guidance_embedding: Qwen-Image has no guidance embedding to bypass; remove the key "
                "(it is for guidance-distilled FLUX models)"
            )

    def make_noisy_batch(
        self,
        latents: torch.Tensor,
        train_cfg: TrainConfig,
        generator: torch.Generator | None,
        context: BatchContext | None = None,
    ) -> NoisyBatch:
        from aitk.models.flow_matching import noisy_and_target
        from aitk.models.flow_timestep_types import weighted_loss
        from aitk.models.noise import apply_noise_offset

        self.check_train_settings(train_cfg)
        b, _, h, w = latents.shape
        if h % 2 or w % 2:
            raise QwenImageInputError(f"Qwen-Image latents need an even height and width, got {h}x{w}")
        # noise levels first: the same seed then draws the same levels at every image size
        sigma = qlatents.training_sigmas(b, (h, w), train_cfg, self.scheduler_config, generator).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        noise = apply_noise_offset(noise, train_cfg.noise_offset, generator).to(latents.device)
        noisy, target = noisy_and_target(latents, noise, sigma)
        weights = weighted_loss(sigma) if (train_cfg.timestep_type or "").lower() == "weighted" else None
        return NoisyBatch(noisy.to(self.dtype), sigma * 1000.0, target, weights, {})

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        config = self.transformer.config
        _remake_meta_rope(self.transformer)
        channels = config.in_channels // 4  # the transformer sees 2x2 patches of the latent channels
        h, w = size[1] // self.vae_scale_factor, size[0] // self.vae_scale_factor
        latents = torch.randn(batch, channels, h, w)
        noisy = NoisyBatch(latents.to(self.dtype), torch.rand(batch) * 1000.0, torch.randn(latents.shape), None, {})
        # the longest prompt a batch can hold: the plan sizes for it
        length = self.max_sequence_length
        cond = PromptEmbeds(
            torch.randn(batch, length, config.joint_attention_dim, dtype=self.dtype),
            {"mask": torch.ones(batch, length, dtype=torch.long)},
        )
        return noisy, cond

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        x = batch.noisy_latents.to(self.dtype)
        b, _, h, w = x.shape
        hidden = cond.hidden_states.to(self.device, self.dtype)
        mask = cond.extra["mask"].to(self.device)
        out = self.transformer(
            hidden_states=qlatents.pack_latents(x),
            timestep=(batch.timesteps / 1000.0).to(x.device, self.dtype),
            encoder_hidden_states=hidden,
            encoder_hidden_states_mask=mask if _padded(mask) else None,
            img_shapes=qlatents.img_shapes(b, h, w),
            return_dict=False,
        )[0]
        return qlatents.unpack_latents(out, h, w)

    # --- previews ------------------------------------------------------------------------
    def sample_pipeline(self, sampler: str | None = None) -> Any:
        # flow-match Euler with the model's own schedule whatever sample.sampler says
        # (preview_sampler_note says so at start)
        return self._pipeline()

    def preview_sampler_note(self, sampler: str) -> str | None:
        if sampler in ("flowmatch", "euler"):
            return None
        return f"flow-match Euler: {self.model_label} is a flow-matching model, {sampler} does not apply"

    def preview_kwargs(self, request: Any) -> dict[str, Any]:
        # the pipeline floors sizes to 16 px; the packed latents it returns do not carry the size
        self._preview_size = (request.height // 16 * 16, request.width // 16 * 16)
        return {"max_sequence_length": self.max_sequence_length}

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Any]:
        latents = latents.to(self.device, torch.float32)
        if latents.ndim == 3:  # packed tokens from the pipeline
            if self._preview_size is not None:
                height, width = self._preview_size
            else:  # no request seen: a square image
                height = width = int(round(latents.shape[1] ** 0.5)) * 2 * self.vae_scale_factor
            latents = qlatents.unpack_latents(latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        return common.pixels_to_pil(qlatents.decode_latents(self.vae, latents), self.vae_scale_factor * 2)
