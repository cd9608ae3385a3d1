"""Krea 2 (raw and turbo): Krea2Transformer2DModel + the Qwen-Image VAE + Qwen3-VL-4B as a
text-only encoder, trained with flow matching as ai-toolkit trains it.

- Text: Krea2Pipeline.encode_prompt, so training sees what previews and other tools see: the
  prompt inside Qwen-Image's chat template, padded to max_sequence_length in the middle
  ([prompt | pad | assistant suffix], positions counting real tokens only), a stack of the hidden
  states of the tapped layers (the pipeline's `text_encoder_select_layers`: 12 of Qwen3-VL's 36),
  the template's prefix dropped. PromptEmbeds keeps only each prompt's real tokens (hidden
  (B, L, layers, width), right-padded in a batch with a bool "mask"): the transformer places every
  text token at rotary position 0 and masks padding as attention keys, so this predicts exactly
  what the pipeline's padded form does, and cached prompts stay small. Up to
  model.model_kwargs.max_sequence_length (or upstream's max_text_length) tokens, default 512. The
  vision tower is not used for text and is dropped after loading, as ai-toolkit does.
- Latents: the Qwen-Image VAE's normalised latents and 2x2-patch tokens (aitk.models.qwen_image.
  latents); x = (1 - s) x0 + s e, target e - x0, the transformer gets t = s (1 = noise), as
  ai-toolkit's Krea 2 (no time flip). timestep_type "shift" (and "flux_shift" / "lumina2_shift")
  uses Krea 2's resolution-dependent exponential shift, mu from 0.5 at 256 image tokens to 1.15 at
  6400 (the scheduler config); "weighted" weights each sample's loss.
- Previews: Krea2Pipeline with ai-toolkit's guidance convention (sample guidance_scale g is
  classifier-free guidance of scale g, 1 = none; the pipeline's own scale is g - 1). A turbo
  (distilled) model's model_index.json sets `is_distilled`: its previews use the fixed shift 1.15.
- Sources: a diffusers folder or hub id, or the transformer alone (a folder, or a .safetensors file
  in diffusers' or the original layout through from_single_file) with the other parts from
  model.extras_name_or_path. model.assistant_lora_path: the turbo training adapter (on while
  training, off for previews; aitk.models.assistant).
- Not supported: the edit variants (model_kwargs.edit: reference images through Qwen3-VL's image
  processor and clean reference latents in the sequence).

LoRA files (comfyui / kohya): `diffusion_model.<original path>.lora_A.weight`, `.lora_B.weight` and
`.alpha` (aitk.models.krea2.keys), every Linear of the transformer as ai-toolkit trains it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from aitk.models import diffusers_parts
from aitk.models.base import NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.flow_adapter import FlowTransformerAdapter
from aitk.models.krea2.keys import is_krea2_lora, lora_key_stem, module_for_stem
from aitk.models.qwen_image import latents as qlatents

#: Krea 2's scheduler (ai-toolkit's and the pipeline's): the schedule when a model has none
DEFAULT_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
    "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 6400, "time_shift_type": "exponential",
}
DEFAULT_TEXT_LENGTH = 512  # Krea2Pipeline's max_sequence_length and ai-toolkit's max_text_length
#: the pipeline settings model_index.json holds (besides its parts)
PIPELINE_OPTIONS = ("text_encoder_select_layers", "is_distilled")
#: where a single transformer file's config and other parts come from (diffusers' choice for Krea 2)
SINGLE_FILE_EXTRAS = "krea/Krea-2-Raw"
PATCH = 2


class Krea2InputError(ValueError):
    """A batch or setting this Krea 2 model cannot train on."""


@functools.cache
def preview_pipeline_class() -> type:
    """Krea2Pipeline with ai-toolkit's preview conventions: guidance_scale g means classifier-free
    guidance of scale g (1 = none), and sizes are floored to the 16 px the pipeline requires."""
    from diffusers import Krea2Pipeline

    class Krea2PreviewPipeline(Krea2Pipeline):
        def __call__(self, *args: Any, guidance_scale: float = 1.0, height: int = 1024, width: int = 1024,
                     **kwargs: Any) -> Any:
            step = self.vae_scale_factor * self.patch_size
            return super().__call__(*args, guidance_scale=max(0.0, float(guidance_scale) - 1.0),
                                    height=max(step, height // step * step), width=max(step, width // step * step),
                                    **kwargs)

    return Krea2PreviewPipeline


def real_tokens(hidden: torch.Tensor, mask: torch.Tensor) -> PromptEmbeds:
    """The pipeline's padded prompts (B, L, layers, width) with their mask -> each prompt's real
    tokens in order, right-padded with zeros to the longest, with a bool "mask" of them."""
    mask = mask.bool()
    rows = [hidden[i][mask[i]] for i in range(hidden.shape[0])]
    longest = max(r.shape[0] for r in rows)
    out = hidden.new_zeros(hidden.shape[0], longest, *hidden.shape[2:])
    keep = torch.zeros(hidden.shape[0], longest, dtype=torch.bool, device=hidden.device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]], keep[i, : r.shape[0]] = r, True
    return PromptEmbeds(out, {"mask": keep})


class Krea2Adapter(qlatents.QwenLatentsMixin, FlowTransformerAdapter):
    arch_names = ("krea2",)
    text_encoder_names = ("text_encoder",)
    keeps_fp32_modules = True  # loaded with torch_dtype: diffusers keeps Krea 2's RMSNorm scales fp32
    lora_prefix = "diffusion_model."  # ai-toolkit's and ComfyUI's names: diffusion_model.<original path>
    lora_weight_names = ("lora_A", "lora_B")
    lora_alpha_in_weights = True  # no .alpha in comfyui files: diffusers' loader reads them
    base_model_version = "krea2"  # ai-toolkit's
    modelspec_architecture = "krea2/lora"
    model_label = "Krea 2"
    pipeline_name = "Krea2Pipeline"
    vae_class_name = "AutoencoderKLQwenImage"
    transformer_class_name = "Krea2Transformer2DModel"
    single_file_extras = SINGLE_FILE_EXTRAS
    default_scheduler = DEFAULT_SCHEDULER
    input_error = Krea2InputError
    latent_patch = PATCH
    text_length_tag = "qwen3vl"
    loads_assistant_lora = True
    bypass_guidance_note = "Krea 2 has no guidance embedding; remove the key"
    card_tags = ("krea2",)

    text_encoder: Any
    tokenizer: Any

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        return is_krea2_lora(tensors)

    def lora_key_stem(self, module_name: str) -> str:
        return lora_key_stem(module_name)

    def lora_module_for_stem(self, stem: str) -> str | None:
        """Inverse of `lora_key_stem` (the tools read files back through it)."""
        return module_for_stem(stem)

    # --- loading -------------------------------------------------------------------------
    def load(self) -> None:
        if self.model_cfg.model_kwargs.get("edit"):
            raise Krea2InputError(
                "model.model_kwargs.edit: Krea 2's edit training (reference images through Qwen3-VL's image "
                "processor and as clean latents in the sequence) is not supported in this version; remove the key "
                "to train the text-to-image model"
            )
        super().load()

    def keep_of_text_encoder(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        module.visual = None  # text-only conditioning: the vision tower is never run
        return module

    def _load_parts(self, location: str) -> dict[str, Any]:
        """The VAE, text encoder and tokenizer, and the pipeline's settings; returns the scheduler
        config (Krea 2's where the source has none)."""
        from diffusers import DiffusionPipeline
        from transformers import Qwen3VLModel

        self._load_folder_parts(location, Qwen3VLModel)
        try:
            index = DiffusionPipeline.load_config(location)
        except OSError:  # no model_index.json: the pipeline's defaults (the real model's taps)
            index = {}
        self.pipeline_options = {k: index[k] for k in PIPELINE_OPTIONS if index.get(k) is not None}
        return diffusers_parts.scheduler_config(location, DEFAULT_SCHEDULER)

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        wanted = self.model_cfg.model_kwargs.get("max_text_length", DEFAULT_TEXT_LENGTH)  # ai-toolkit's key
        self.max_sequence_length = self._text_length(int(wanted))
        if not hasattr(self, "pipeline_options"):
            self.pipeline_options = {}

    def _vae_scale(self, configs: PartConfigs) -> int:
        return 2 ** len(configs.part("vae").get("temperal_downsample", (0, 0, 0)))

    # --- encoding ------------------------------------------------------------------------
    def _pipeline(self, scheduler: Any | None = None) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        pipe = preview_pipeline_class()(
            scheduler=scheduler or FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
            vae=self.vae, text_encoder=getattr(self, "text_encoder", None), tokenizer=getattr(self, "tokenizer", None),
            transformer=self.transformer, **self.pipeline_options,
        )
        taps = pipe.text_encoder_select_layers
        if len(taps) != self.transformer.config.num_text_layers:
            raise Krea2InputError(
                f"{self.model_label}: the pipeline taps {len(taps)} text-encoder layers {list(taps)} but the "
                f"transformer takes {self.transformer.config.num_text_layers}; set text_encoder_select_layers in "
                "the model's model_index.json"
            )
        return pipe

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        hidden, mask = self._text_pipeline().encode_prompt(
            list(prompts), device=self.device, max_sequence_length=self.max_sequence_length
        )
        return real_tokens(hidden, mask)

    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        # one length for both: the pipeline places the text of both passes by the prompt's length
        both = PromptEmbeds.cat([positive, negative])
        rows, n = list(range(both.hidden_states.shape[0])), positive.hidden_states.shape[0]
        pos, neg = both.select(rows[:n]), both.select(rows[n:])
        return {
            "prompt_embeds": pos.hidden_states, "prompt_embeds_mask": pos.extra["mask"],
            "negative_prompt_embeds": neg.hidden_states, "negative_prompt_embeds_mask": neg.extra["mask"],
        }

    def text_encoder_id(self) -> str:
        taps = self.pipeline_options.get("text_encoder_select_layers", "default")
        return f"{super().text_encoder_id()}|taps:{taps}"

    def latent_space_id(self) -> str:
        cfg = self.vae.config
        return (f"qwen-image-vae:{cfg.z_dim}:{list(cfg.latents_mean)}:{list(cfg.latents_std)}:"
                f"{self.model_cfg.vae_path or self._parts_source()}")

    # --- training objective --------------------------------------------------------------
    def shift_kwargs(self, height: int, width: int) -> dict[str, float]:
        from aitk.models.flow_matching import resolution_shift

        return {"mu": resolution_shift((height // PATCH) * (width // PATCH), self.scheduler_config)}

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        config = self.transformer.config
        noisy = self._example_noisy(self._example_latents(batch, size, config.in_channels // (PATCH * PATCH)))
        length = self.max_sequence_length  # the longest prompt a batch can hold
        hidden = torch.randn(batch, length, config.num_text_layers, config.text_hidden_dim, dtype=self.dtype)
        return noisy, PromptEmbeds(hidden, {"mask": torch.ones(batch, length, dtype=torch.bool)})

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        from torch._subclasses.fake_tensor import is_fake

        x = batch.noisy_latents.to(self.dtype)
        b, _, h, w = x.shape
        self._check_latent_size(h, w)
        text = cond.hidden_states.to(x.device, self.dtype)
        mask = cond.extra["mask"].to(x.device).bool()
        # text tokens at the origin, image tokens at their (0, row, column) on the patch grid
        positions = torch.zeros(text.shape[1] + (h // PATCH) * (w // PATCH), 3, device=x.device)
        grid = torch.stack(torch.meshgrid(torch.arange(h // PATCH), torch.arange(w // PATCH), indexing="ij"), -1)
        positions[text.shape[1]:, 1:] = grid.reshape(-1, 2).to(positions)
        out = self.transformer(
            hidden_states=qlatents.pack_latents(x),
            encoder_hidden_states=text,
            timestep=(batch.timesteps / 1000.0).to(x.device, self.dtype).expand(b),
            position_ids=positions,
            # no padding, no mask (any attention kernel runs it); the plan's fake mask has no values
            encoder_attention_mask=None if is_fake(mask) or bool(mask.all()) else mask,
            return_dict=False,
        )[0]
        return qlatents.unpack_latents(out, h, w)
