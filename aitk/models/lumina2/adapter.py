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
from typing import Any

import torch

from aitk.models import diffusers_parts
from aitk.models.base import NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.flow_adapter import FlowTransformerAdapter
from aitk.models.lumina2 import keys

SINGLE_FILE_SUFFIXES = set(diffusers_parts.CHECKPOINT_SUFFIXES)
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


class Lumina2Adapter(FlowTransformerAdapter):
    arch_names = ("lumina2",)
    text_encoder_names = ("text_encoder",)
    lora_prefix = keys.PREFIX  # diffusion_model.<original path> (aitk.models.lumina2.keys)
    lora_weight_names = ("lora_A", "lora_B")  # the names of Lumina's own LoRA files
    lora_fused_weights = keys.FUSED_QKV  # one LoRA on each fused attention.qkv in comfyui-layout files
    #: a module the tools name in their messages as an example of this naming
    lora_example_module = "layers.0.attn.to_out.0"
    base_model_version = "lumina2"  # ai-toolkit's value
    modelspec_architecture = "lumina-image-2/lora"
    modelspec_implementation = "https://github.com/Alpha-VLLM/Lumina-Image-2.0"
    model_label = "Lumina-Image 2.0"
    pipeline_name = "Lumina2Pipeline"
    folder_parts = required_folder_parts = FOLDER_PARTS
    folder_example = "Alpha-VLLM/Lumina-Image-2.0"
    input_error = Lumina2InputError
    text_length_tag = "gemma"
    card_tags = ("lumina2",)
    card_license = {"license": "apache-2.0"}

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        return keys.is_lumina2_lora(tensors)

    # --- loading -------------------------------------------------------------------------
    def _load_parts(self, location: str) -> dict[str, Any]:
        """Load every part; returns the scheduler config."""
        from diffusers import Lumina2Transformer2DModel
        from transformers import AutoModel

        self._load_folder_parts(location, AutoModel, transformer_cls=Lumina2Transformer2DModel)
        return diffusers_parts.scheduler_config(location)

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        self.max_sequence_length = self._text_length(DEFAULT_MAX_SEQUENCE_LENGTH)

    def _scheduler_from(self, configs: PartConfigs) -> dict[str, Any]:
        return {**DEFAULT_SCHEDULER, **dict(configs.scheduler or {})}

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
    def _pipeline_class(self) -> type:
        return _preview_pipeline_class()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        # the pipeline's own encoder (system prompt, Gemma's penultimate layer)
        hidden, mask, _, _ = self._text_pipeline().encode_prompt(
            list(prompts), do_classifier_free_guidance=False, device=self.device,
            max_sequence_length=self.max_sequence_length,
        )
        return PromptEmbeds(hidden, {"mask": mask})

    # --- training objective --------------------------------------------------------------
    def shift_kwargs(self, height: int, width: int) -> dict[str, float]:
        """sample_sigmas' time shift for latents of height x width: the scheduler's fixed shift,
        or FLUX's mu of the patch count when the scheduler shifts dynamically."""
        if self.scheduler_config.get("use_dynamic_shifting"):
            from aitk.models.flux import image_seq_shift

            return {"mu": image_seq_shift((height // 2) * (width // 2), self.scheduler_config)}
        return {"shift": float(self.scheduler_config.get("shift", 1.0))}

    def fixed_shape_step(self):
        from aitk.models.lumina2.fixed_shapes import full_length_prompts

        return full_length_prompts()

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        return self._example_text_to_image(batch, size, "cap_feat_dim", torch.int64)

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
    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        return {
            "prompt_embeds": positive.hidden_states,
            "prompt_attention_mask": positive.extra["mask"],
            "negative_prompt_embeds": negative.hidden_states,
            "negative_prompt_attention_mask": negative.extra["mask"],
        }
