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
from typing import Any

import torch

from aitk.models import diffusers_parts
from aitk.models.base import NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.flow_adapter import FlowTransformerAdapter
from aitk.models.qwen_image import latents as qlatents
from aitk.models.qwen_image.latents import QwenImageInputError

SINGLE_FILE_SUFFIXES = set(diffusers_parts.TRANSFORMER_FILE_SUFFIXES)
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


class QwenImageAdapter(qlatents.QwenLatentsMixin, FlowTransformerAdapter):
    arch_names = ("qwen_image",)
    text_encoder_names = ("text_encoder",)
    bucket_divisibility = 32  # ai-toolkit's get_bucket_divisibility for Qwen-Image
    lora_prefix = "diffusion_model."  # ComfyUI's names: diffusion_model.<diffusers module path>
    base_model_version = "qwen_image"
    modelspec_architecture = "qwen-image/lora"
    modelspec_implementation = "https://github.com/QwenLM/Qwen-Image"
    default_config_repo = "Qwen/Qwen-Image"
    model_label = "Qwen-Image"
    pipeline_name = "QwenImagePipeline"
    folder_parts = FOLDER_PARTS
    vae_class_name = "AutoencoderKLQwenImage"
    transformer_class_name = "QwenImageTransformer2DModel"
    default_scheduler = DEFAULT_SCHEDULER
    input_error = QwenImageInputError
    text_length_tag = "len"
    bypass_guidance_note = (
        "Qwen-Image has no guidance embedding to bypass; remove the key (it is for guidance-distilled FLUX models)"
    )
    card_tags = ("qwen-image",)
    card_license = {"license": "apache-2.0"}

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        return any("transformer_blocks." in k and any(p in k for p in _QWEN_BLOCK_PARTS) for k in tensors)

    # --- loading -------------------------------------------------------------------------
    def _single_file_extras(self) -> str:
        # a single file's configs (and other parts): model.model_kwargs.config, else Qwen/Qwen-Image
        return str(self.model_cfg.model_kwargs.get("config") or self.default_config_repo)

    def _load_parts(self, location: str) -> dict[str, Any]:
        """The VAE, text encoder and tokenizer; returns the scheduler config."""
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

        self._load_folder_parts(location, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer)
        return diffusers_parts.scheduler_config(location)

    def keep_of_text_encoder(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        # text-only conditioning: the vision tower (about 0.7B parameters) is never run
        module.model.visual = None
        return module

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        wanted = int(self.model_cfg.model_kwargs.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH))
        if not 1 <= wanted <= 1024:
            raise ValueError(
                f"model.model_kwargs.max_sequence_length: {wanted} is out of range; QwenImagePipeline takes "
                "1 to 1024 text tokens (default 512)"
            )
        self.max_sequence_length = wanted

    def _vae_scale(self, configs: PartConfigs) -> int:
        return 2 ** len(configs.part("vae").get("temperal_downsample", (0, 0, 0)))

    def network_candidates(self, include_conv: bool) -> list[str]:
        return qwen_image_lora_candidates(self.transformer)  # no conv layers to add for LoCon

    # --- encoding ------------------------------------------------------------------------
    def _pipeline_class(self) -> type:
        from aitk.models.qwen_image.previews import preview_pipeline_class

        return preview_pipeline_class()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        hidden, mask = self._text_pipeline().encode_prompt(
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

    def latent_space_id(self) -> str:
        cfg = self.vae.config
        return (
            f"qwen-image-vae:{cfg.z_dim}:{list(cfg.latents_mean)}:{list(cfg.latents_std)}:"
            f"{self.model_cfg.vae_path or self.model_cfg.name_or_path}"
        )

    # --- training objective --------------------------------------------------------------
    def training_sigmas(
        self, batch: int, height: int, width: int, train_cfg: Any, generator: torch.Generator | None
    ) -> torch.Tensor:
        return qlatents.training_sigmas(batch, (height, width), train_cfg, self.scheduler_config, generator)

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        config = self.transformer.config
        _remake_meta_rope(self.transformer)
        # the transformer sees 2x2 patches of the latent channels
        noisy = self._example_noisy(self._example_latents(batch, size, config.in_channels // 4))
        return noisy, self._example_prompts(batch, config.joint_attention_dim, torch.long)

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
