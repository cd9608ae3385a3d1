"""AuraFlow (fal/AuraFlow v0.1 - v0.3): AuraFlowTransformer2DModel (MMDiT joint blocks, then single
blocks), SDXL's 4-channel VAE, a UMT5 text encoder (Pile-T5 XL).

Training is rectified flow (aitk.models.flow_matching), as ai-toolkit trains AuraFlow:
x = (1 - sigma) * x0 + sigma * noise, target = noise - x0. The transformer takes sigma itself as its
timestep (t = 1 noise, t = 0 image: AuraFlowPipeline passes the scheduler's timestep / 1000) and
predicts the velocity the scheduler steps with. NoisyBatch.timesteps holds 1000 * sigma (the
scheduler convention). timestep_type "shift" (and "flux_shift" / "lumina2_shift", drawn alike) uses
the scheduler's fixed shift (1.73 for v0.3); "weighted" draws uniform sigmas and weights each
sample's loss (aitk.models.flow_timestep_types).

Text: the pipeline's own encode_prompt: UMT5's last hidden states of 256 tokens
(model.model_kwargs.max_sequence_length), the padding zeroed (the transformer takes no mask).

LoRA targets: in each joint block the attention projections of both streams and both feed-forward
networks; in each single block its attention and feed-forward. The AdaLN modulation linears stay
frozen, as for SD 3 and FLUX. Saved files (comfyui / kohya) name each module
`transformer.<diffusers module path>` with `.lora_A.weight`, `.lora_B.weight` and `.alpha`:
ComfyUI's AuraFlow key map (comfy/lora.py model_lora_keys_unet for model_base.AuraFlow, through
comfy/utils.py auraflow_to_diffusers) maps these names, and AuraFlowPipeline.load_lora_weights
reads them (docs/lora-formats.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from aitk.config.schema import TrainConfig
from aitk.models import common
from aitk.models.base import BatchContext, ModelAdapter, ModelLoadError, NoisyBatch, PartConfigs, PromptEmbeds

SINGLE_FILE_SUFFIXES = {".safetensors", ".sft", ".ckpt", ".pth"}
FOLDER_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
DEFAULT_SHIFT = 1.73  # fal/AuraFlow-v0.3's scheduler (a model bound without a scheduler config)
#: UMT5 tokens per prompt: AuraFlowPipeline's default, and what ai-toolkit encodes
DEFAULT_MAX_SEQUENCE_LENGTH = 256
#: Linear layers a LoRA wraps by default, relative to each joint / single block
JOINT_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.linear_1", "ff.linear_2", "ff.out_projection",
    "ff_context.linear_1", "ff_context.linear_2", "ff_context.out_projection",
)
SINGLE_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.linear_1", "ff.linear_2", "ff.out_projection")
#: key parts only AuraFlow files have (its joint blocks' name, its feed-forward's output layer)
AURAFLOW_KEY_PARTS = ("joint_transformer_blocks", "ff.out_projection", "ff_out_projection")


class AuraFlowInputError(ValueError):
    """A batch or setting this AuraFlow model cannot train on."""


def is_auraflow_lora(keys: Iterable[str]) -> bool:
    """Whether a network file's keys name AuraFlow blocks."""
    return any(part in key for key in keys for part in AURAFLOW_KEY_PARTS)


def auraflow_lora_candidates(transformer: torch.nn.Module) -> list[str]:
    """Default LoRA targets of an AuraFlowTransformer2DModel that exist in it, in model order."""
    from aitk.networks.lora import eligible_modules

    wanted = {f"joint_transformer_blocks.{i}.{t}" for i in range(len(transformer.joint_transformer_blocks))
              for t in JOINT_TARGETS}
    wanted |= {f"single_transformer_blocks.{i}.{t}" for i in range(len(transformer.single_transformer_blocks))
               for t in SINGLE_TARGETS}
    return [name for name in eligible_modules(transformer) if name in wanted]


class AuraFlowAdapter(ModelAdapter):
    arch_names = ("auraflow",)
    text_encoder_names = ("text_encoder",)
    bucket_divisibility = 16  # 8x VAE downscale x 2x2 patches
    lora_prefix = "transformer."  # ComfyUI's AuraFlow names: transformer.<diffusers module path>
    lora_weight_names = ("lora_A", "lora_B")
    diffusers_lora_prefix = "transformer"
    base_model_version = "auraflow"  # ai-toolkit's
    modelspec_architecture = "auraflow/lora"
    modelspec_implementation = "https://huggingface.co/fal/AuraFlow-v0.3"
    model_label = "AuraFlow"
    denoiser_names = ("transformer",)
    card_tags = ("auraflow",)
    card_license = {"license": "apache-2.0"}  # AuraFlow v0.1 - v0.3

    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        return is_auraflow_lora(tensors)

    # --- loading -------------------------------------------------------------------------
    def load(self) -> None:
        source = self.model_cfg.name_or_path
        path = Path(source).expanduser()
        hint = (
            "give a diffusers folder (model_index.json with " + ", ".join(f"{p}/" for p in FOLDER_PARTS)
            + ") or a hub id (owner/name), e.g. fal/AuraFlow-v0.3"
        )
        if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(
                f"model.name_or_path: {source!r} is a single file; AuraFlow loads from a diffusers folder or "
                f"hub id only in this version; {hint}"
            )
        if not common.could_be_hub_id(source) and not path.exists():
            raise ModelLoadError(f"model.name_or_path: {source!r} is neither an existing folder nor a hub id; {hint}")
        if path.exists() and not path.is_dir():
            raise ModelLoadError(f"model.name_or_path: {source!r} is a file, not a folder; {hint}")
        location = str(path) if path.exists() else source
        try:
            scheduler_config = self._load_parts(location)
        except Exception as exc:  # OSError for missing parts / hub look-ups, others for bad files
            where = hint if path.exists() else f"looked up as a hub id{common.offline_note()}; {hint}"
            raise ModelLoadError(
                f"model.name_or_path: could not load an AuraFlow model from {source!r}: {exc} ({where})"
            ) from exc
        common.freeze((self.transformer, self.vae, self.text_encoder))
        for module in (self.transformer, self.text_encoder):
            common.cast(module, self.dtype)
        common.cast(self.vae, torch.float32)  # encodes / decodes in fp32 whatever trains
        self.bind_loaded(scheduler_config)

    def _load_parts(self, location: str) -> dict[str, Any]:
        """Load every part; returns the scheduler config."""
        from diffusers import AuraFlowTransformer2DModel, AutoencoderKL, FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer, UMT5EncoderModel

        # torch_dtype at load: the host never holds a part in a wider dtype than it trains in
        self.tokenizer = AutoTokenizer.from_pretrained(location, subfolder="tokenizer")
        self.text_encoder = UMT5EncoderModel.from_pretrained(location, subfolder="text_encoder", torch_dtype=self.dtype)
        self.transformer = AuraFlowTransformer2DModel.from_pretrained(
            location, subfolder="transformer", torch_dtype=self.dtype
        )
        self.vae = AutoencoderKL.from_pretrained(self.model_cfg.vae_path or location,
                                                 subfolder=None if self.model_cfg.vae_path else "vae")
        return dict(FlowMatchEulerDiscreteScheduler.load_config(location, subfolder="scheduler"))

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        wanted = int(self.model_cfg.model_kwargs.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH))
        if wanted < 1:
            raise AuraFlowInputError(f"model.model_kwargs.max_sequence_length: {wanted} must be at least 1")
        # never more tokens than the tokenizer allows (the tiny test model: 32)
        self.max_sequence_length = min(wanted, int(configs.tokenizer_lengths.get("tokenizer", wanted)))
        self.scheduler_config = dict(configs.scheduler or {"num_train_timesteps": 1000, "shift": DEFAULT_SHIFT})
        self.vae_scale_factor = common.vae_scale_from_config(configs.part("vae"))
        self.patch_size = int(self.transformer.config.patch_size)
        self._text_pipe: Any = None

    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def offload_blocks(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        if module is self.transformer:  # diffusers' _no_split_modules names the patch embedding too
            return [*module.joint_transformer_blocks, *module.single_transformer_blocks]
        return super().offload_blocks(module)

    def network_candidates(self, include_conv: bool) -> list[str]:
        return auraflow_lora_candidates(self.transformer)  # no conv layers to add for LoCon

    # --- encoding ------------------------------------------------------------------------
    def _pipeline(self) -> Any:
        from diffusers import AuraFlowPipeline, FlowMatchEulerDiscreteScheduler

        return AuraFlowPipeline(
            tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae, transformer=self.transformer,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
        )

    def release_text_encoders(self) -> int:
        self._text_pipe = None  # it holds the encoder too
        return super().release_text_encoders()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        # The pipeline's own encoder, so training sees exactly what previews and other tools see.
        if self._text_pipe is None:
            self._text_pipe = self._pipeline()
        hidden, mask, _, _ = self._text_pipe.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, device=self.device,
            max_sequence_length=self.max_sequence_length,
        )
        # the pipeline's mask runs over every embedding value; one per token is what it means
        tokens = mask.reshape(hidden.shape)[..., 0].to(torch.long)
        return PromptEmbeds(hidden, {"mask": tokens})

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return common.encode_mode(self.vae, pixels, self.device) * self.vae.config.scaling_factor

    def text_encoder_id(self) -> str:
        # the token count is part of the embedding's shape: a cache of another length is not reused
        return f"{self.modelspec_architecture}|{self.model_cfg.name_or_path}|umt5:{self.max_sequence_length}"

    def latent_space_id(self) -> str:
        cfg = self.vae.config
        return f"sd-vae:{cfg.latent_channels}:{cfg.scaling_factor}:{self.model_cfg.vae_path or self.model_cfg.name_or_path}"

    # --- training objective --------------------------------------------------------------
    def check_train_settings(self, train_cfg: Any) -> None:
        from aitk.models.flow_matching import check_train_config

        check_train_config(train_cfg, self.model_label)

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
        if h % self.patch_size or w % self.patch_size:
            raise AuraFlowInputError(
                f"AuraFlow latents need a height and width divisible by the patch size {self.patch_size}, got "
                f"{h}x{w} (buckets must be multiples of {self.bucket_divisibility} px)"
            )
        # noise levels first: the same seed then draws the same levels at every image size
        shift = float(self.scheduler_config.get("shift", DEFAULT_SHIFT))
        sigma = sample_sigmas(b, train_cfg, generator, shift=shift).to(latents.device)
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
        cond = PromptEmbeds(
            torch.randn(batch, self.max_sequence_length, config.joint_attention_dim, dtype=self.dtype),
            {"mask": torch.ones(batch, self.max_sequence_length, dtype=torch.long)},
        )
        return noisy, cond

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        x = batch.noisy_latents.to(self.dtype)
        return self.transformer(
            x,
            encoder_hidden_states=cond.hidden_states.to(x.device, self.dtype),
            timestep=(batch.timesteps.to(x.device, torch.float32) / 1000.0).to(self.dtype),  # sigma
            return_dict=False,
        )[0]

    # --- previews ------------------------------------------------------------------------
    def sample_pipeline(self, sampler: str | None = None) -> Any:
        # AuraFlow's own flow-match Euler scheduler whatever sample.sampler says (preview_sampler_note)
        return self._pipeline()

    def preview_sampler_note(self, sampler: str) -> str | None:
        if sampler in ("flowmatch", "euler"):
            return None
        return f"flow-match Euler: AuraFlow is a flow-matching model, {sampler} does not apply"

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
        latents = latents.to(self.device, torch.float32) / self.vae.config.scaling_factor
        pixels = self.vae.decode(latents).sample
        return common.pixels_to_pil(pixels, self.vae_scale_factor * self.patch_size)
