"""Lumina-Image 2.0: Lumina2Transformer2DModel + FLUX's 16-channel VAE + a Gemma-2 text encoder.

Training is rectified flow (aitk.models.flow_matching): x = (1 - sigma) * x0 + sigma * noise,
target = noise - x0; NoisyBatch.timesteps holds 1000 * sigma (the scheduler convention). Lumina's
transformer counts time the other way (t = 0 is noise, t = 1 the image) and predicts the velocity
towards the image, so it gets t = 1 - sigma and its output is negated, as Lumina2Pipeline does
before each scheduler step (ai-toolkit trains it the same way).

timestep_type "lumina2_shift" (and "shift" / "flux_shift", drawn alike as in ai-toolkit) puts
uniform u through the scheduler's time shift: sigma = s*u / (1 + (s - 1)*u) with the model's fixed
shift s (6 in Alpha-VLLM/Lumina-Image-2.0's scheduler config, the value ai-toolkit's Lumina 2
scheduler uses); a scheduler config with use_dynamic_shifting takes FLUX's resolution-dependent
mu instead. "weighted" draws uniform sigmas and weights each sample's loss.

Prompts: the pipeline's own encoder (its system prompt, then " <Prompt Start> " and the caption;
Gemma's second-to-last hidden states, padded to max_sequence_length = 256 tokens as ai-toolkit
encodes them) with the attention mask, which the transformer needs to find each caption's length.

LoRA files: aitk.models.lumina2.keys (ComfyUI's original names; q / k / v of the fused
`attention.qkv`). diffusers layout: `transformer.<module path>` with the config in the header,
which Lumina2Pipeline.load_lora_weights loads exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aitk.config.schema import TrainConfig
from aitk.models import common
from aitk.models.base import BatchContext, ModelAdapter, ModelLoadError, NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.lumina2 import keys

SINGLE_FILE_SUFFIXES = {".safetensors", ".sft", ".ckpt"}
FOLDER_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
#: tokens per prompt: Lumina2Pipeline's default and what ai-toolkit encodes with
DEFAULT_MAX_SEQUENCE_LENGTH = 256
#: the real model's scheduler settings, for a folder without scheduler/ config values
DEFAULT_SCHEDULER = {"shift": 6.0, "use_dynamic_shifting": False}
#: previews: the pipeline needs sizes in multiples of 16 (8x VAE x 2x2 patches)
SIZE_MULTIPLE = 16


class Lumina2InputError(ValueError):
    """A batch or setting this Lumina 2 model cannot train on."""


@functools.cache
def _preview_pipeline_class() -> type:
    """Lumina2Pipeline whose sizes are floored to multiples of 16, as FLUX's pipeline does itself
    (diffusers' Lumina2Pipeline refuses other sizes; the sampler snaps to 8 only)."""
    from diffusers import Lumina2Pipeline

    class Lumina2PreviewPipeline(Lumina2Pipeline):
        def __call__(self, *args: Any, height: int | None = None, width: int | None = None, **kwargs: Any) -> Any:
            if height is not None:
                height = max(SIZE_MULTIPLE, height // SIZE_MULTIPLE * SIZE_MULTIPLE)
            if width is not None:
                width = max(SIZE_MULTIPLE, width // SIZE_MULTIPLE * SIZE_MULTIPLE)
            return super().__call__(*args, height=height, width=width, **kwargs)

    return Lumina2PreviewPipeline


class Lumina2Adapter(ModelAdapter):
    arch_names = ("lumina2",)
    text_encoder_names = ("text_encoder",)
    denoiser_names = ("transformer",)
    bucket_divisibility = 16  # 8x VAE downscale x 2x2 patches
    lora_prefix = keys.PREFIX  # diffusion_model.<original path> (aitk.models.lumina2.keys)
    lora_weight_names = ("lora_A", "lora_B")  # the names of Lumina's own LoRA files
    diffusers_lora_prefix = "transformer"
    #: a module the tools name in their messages as an example of this naming
    lora_example_module = "layers.0.attn.to_out.0"
    base_model_version = "lumina2"  # ai-toolkit's value
    modelspec_architecture = "lumina-image-2/lora"
    modelspec_implementation = "https://github.com/Alpha-VLLM/Lumina-Image-2.0"
    model_label = "Lumina-Image 2.0"
    card_tags = ("lumina2",)
    card_license = {"license": "apache-2.0"}

    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        return keys.is_lumina2_lora(tensors)

    # --- loading -------------------------------------------------------------------------
    def load(self) -> None:
        source = self.model_cfg.name_or_path
        path = Path(source).expanduser()
        hint = f"give a diffusers folder (model_index.json with {', '.join(p + '/' for p in FOLDER_PARTS)}) or a hub id"
        if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(
                f"model.name_or_path: {source!r} is a single file; {self.model_label} loads from a diffusers "
                f"folder or hub id only in this version (Alpha-VLLM/Lumina-Image-2.0); {hint}"
            )
        if not common.could_be_hub_id(source) and not path.exists():
            raise ModelLoadError(f"model.name_or_path: {source!r} is neither an existing folder nor a hub id; {hint}")
        if path.exists() and not path.is_dir():
            raise ModelLoadError(f"model.name_or_path: {source!r} is a file, not a folder; {hint}")
        missing = [part + "/" for part in FOLDER_PARTS if path.is_dir() and not (path / part).is_dir()]
        if missing:
            raise ModelLoadError(f"model.name_or_path: folder {source!r} has no {', '.join(missing)}; {hint}")
        location = str(path) if path.exists() else source
        try:
            scheduler_config = self._load_parts(location)
        except ModelLoadError:
            raise
        except Exception as exc:  # OSError for missing parts / hub look-ups, others for bad files
            where = hint if path.exists() else (
                f"no local folder of that name exists, so it was looked up as a hub id{common.offline_note()}; {hint}"
            )
            raise ModelLoadError(
                f"model.name_or_path: could not load a {self.model_label} model from {source!r}: {exc} ({where})"
            ) from exc
        common.freeze((self.transformer, self.vae, self.text_encoder))
        common.cast(self.transformer, self.dtype)
        common.cast(self.text_encoder, self.dtype)
        common.cast(self.vae, torch.float32)  # encodes / decodes in fp32 whatever trains
        self.bind_loaded(scheduler_config)

    def _load_parts(self, location: str) -> dict[str, Any]:
        """Load every part; returns the scheduler config."""
        from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Transformer2DModel
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(location, subfolder="tokenizer")
        # torch_dtype at load: the host never holds a part in a wider dtype than it trains in
        self.text_encoder = AutoModel.from_pretrained(location, subfolder="text_encoder", torch_dtype=self.dtype)
        self.transformer = Lumina2Transformer2DModel.from_pretrained(
            location, subfolder="transformer", torch_dtype=self.dtype
        )
        self.vae = self._load_vae(location)
        return dict(FlowMatchEulerDiscreteScheduler.load_config(location, subfolder="scheduler"))

    def _load_vae(self, location: str) -> Any:
        """The model's vae/, or model.vae_path (a VAE folder, a pipeline folder with vae/, a hub id)."""
        from diffusers import AutoencoderKL

        source = self.model_cfg.vae_path
        if not source:
            return AutoencoderKL.from_pretrained(location, subfolder="vae")
        vae_path = Path(source).expanduser()
        try:
            subfolder = "vae" if vae_path.is_dir() and not (vae_path / "config.json").is_file() else None
            return AutoencoderKL.from_pretrained(str(vae_path) if vae_path.exists() else source, subfolder=subfolder)
        except Exception as exc:
            raise ModelLoadError(
                f"model.vae_path: could not load a VAE from {source!r}: {exc} (give a VAE folder with config.json, "
                f"a pipeline folder with vae/ or a hub id{common.offline_note()})"
            ) from exc

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        wanted = int(self.model_cfg.model_kwargs.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH))
        self.max_sequence_length = min(wanted, int(configs.tokenizer_lengths.get("tokenizer", wanted)))
        self.scheduler_config = {**DEFAULT_SCHEDULER, **dict(configs.scheduler or {})}
        self.vae_scale_factor = common.vae_scale_from_config(configs.part("vae"))
        self._text_pipe: Any = None

    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def network_candidates(self, include_conv: bool) -> list[str]:
        return keys.lumina2_lora_candidates(self.transformer)  # no conv layers to add for LoCon

    def lora_key_stem(self, module_name: str) -> str:
        return keys.lora_key_stem(module_name)

    def lora_module_for_stem(self, stem: str) -> str | None:
        """Inverse of `lora_key_stem` (aitk.tools read files through it)."""
        return keys.module_for_stem(stem)

    def offload_blocks(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        if module is getattr(self, "transformer", None):  # in the order a forward pass runs them
            return [block for name in keys.BLOCK_LISTS for block in getattr(module, name)]
        return super().offload_blocks(module)

    # --- encoding ------------------------------------------------------------------------
    def _pipeline(self) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return _preview_pipeline_class()(
            transformer=self.transformer,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
        )

    def release_text_encoders(self) -> int:
        self._text_pipe = None  # it holds the encoder too
        return super().release_text_encoders()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        # The pipeline's own encoder (system prompt, Gemma's penultimate layer), so training sees
        # what previews and other tools see.
        if self._text_pipe is None:
            self._text_pipe = self._pipeline()
        hidden, mask, _, _ = self._text_pipe.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, device=self.device,
            max_sequence_length=self.max_sequence_length,
        )
        return PromptEmbeds(hidden, {"mask": mask})

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = common.encode_mode(self.vae, pixels, self.device)
        return (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    def text_encoder_id(self) -> str:
        # the token count is part of the embedding's shape: a cache of another length must not be reused
        return f"{self.modelspec_architecture}|{self.model_cfg.name_or_path}|gemma:{self.max_sequence_length}"

    def latent_space_id(self) -> str:
        cfg = self.vae.config
        return (
            f"flux-vae:{cfg.latent_channels}:{cfg.scaling_factor}:{cfg.shift_factor}:"
            f"{self.model_cfg.vae_path or self.model_cfg.name_or_path}"
        )

    # --- training objective --------------------------------------------------------------
    def check_train_settings(self, train_cfg: Any) -> None:
        from aitk.models.flow_matching import check_train_config

        check_train_config(train_cfg, self.model_label)

    def shift_kwargs(self, height: int, width: int) -> dict[str, float]:
        """sample_sigmas' time shift for latents of height x width: the scheduler's fixed shift,
        or FLUX's mu of the patch count when the scheduler shifts dynamically."""
        if self.scheduler_config.get("use_dynamic_shifting"):
            from aitk.models.flux import image_seq_shift

            return {"mu": image_seq_shift((height // 2) * (width // 2), self.scheduler_config)}
        return {"shift": float(self.scheduler_config.get("shift", 1.0))}

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
        if h % 2 or w % 2:
            raise Lumina2InputError(f"Lumina 2 latents need an even height and width, got {h}x{w}")
        # noise levels first: the same seed then draws the same levels at every image size
        sigma = sample_sigmas(b, train_cfg, generator, **self.shift_kwargs(h, w)).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        noise = apply_noise_offset(noise, train_cfg.noise_offset, generator).to(latents.device)
        noisy, target = noisy_and_target(latents, noise, sigma)
        weights = weighted_loss(sigma) if (train_cfg.timestep_type or "").lower() == "weighted" else None
        return NoisyBatch(noisy.to(self.dtype), sigma * 1000.0, target, weights)

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        config = self.transformer.config
        h, w = size[1] // self.vae_scale_factor, size[0] // self.vae_scale_factor
        latents = torch.randn(batch, config.in_channels, h, w)
        noisy = NoisyBatch(latents.to(self.dtype), torch.rand(batch) * 1000.0, torch.randn(latents.shape))
        cond = PromptEmbeds(
            torch.randn(batch, self.max_sequence_length, config.cap_feat_dim, dtype=self.dtype),
            {"mask": torch.ones(batch, self.max_sequence_length, dtype=torch.int64)},
        )
        return noisy, cond

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        x = batch.noisy_latents.to(self.dtype)
        # Lumina's time runs from noise (0) to image (1): t = 1 - sigma
        t = 1.0 - batch.timesteps.to(x.device, torch.float32) / 1000.0
        out = self.transformer(
            hidden_states=x,
            timestep=t.to(self.dtype),
            encoder_hidden_states=cond.hidden_states.to(x.device, self.dtype),
            encoder_attention_mask=cond.extra["mask"].to(x.device),
            return_dict=False,
        )[0]
        return -out  # its velocity points to the image; the target (noise - x0) the other way

    # --- previews ------------------------------------------------------------------------
    def sample_pipeline(self, sampler: str | None = None) -> Any:
        # Lumina 2 previews with its own flow-match Euler scheduler whatever sample.sampler says
        # (preview_sampler_note says so at start).
        return self._pipeline()

    def preview_sampler_note(self, sampler: str) -> str | None:
        if sampler in ("flowmatch", "euler"):
            return None
        return f"flow-match Euler: {self.model_label} is a flow-matching model, {sampler} does not apply"

    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        return {
            "prompt_embeds": positive.hidden_states,
            "prompt_attention_mask": positive.extra["mask"],
            "negative_prompt_embeds": negative.hidden_states,
            "negative_prompt_attention_mask": negative.extra["mask"],
        }

    def preview_kwargs(self, request: Any) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Any]:
        latents = latents.to(self.device, torch.float32)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        pixels = self.vae.decode(latents).sample
        return common.pixels_to_pil(pixels, self.vae_scale_factor * 2)
