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
from typing import Any

import torch

from aitk.models import diffusers_parts
from aitk.models.base import NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.flow_adapter import FlowTransformerAdapter

#: files refused as model.name_or_path (AuraFlow loads diffusers folders and hub ids only)
SINGLE_FILE_SUFFIXES = (*diffusers_parts.CHECKPOINT_SUFFIXES, ".pth")
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


class AuraFlowAdapter(FlowTransformerAdapter):
    arch_names = ("auraflow",)
    text_encoder_names = ("text_encoder",)
    lora_prefix = "transformer."  # ComfyUI's AuraFlow names: transformer.<diffusers module path>
    lora_weight_names = ("lora_A", "lora_B")
    lora_alpha_in_weights = True  # no .alpha in comfyui files: diffusers' loader reads them
    base_model_version = "auraflow"  # ai-toolkit's
    modelspec_architecture = "auraflow/lora"
    modelspec_implementation = "https://huggingface.co/fal/AuraFlow-v0.3"
    model_label = "AuraFlow"
    model_article = "an"
    pipeline_name = "AuraFlowPipeline"
    folder_example = "fal/AuraFlow-v0.3"
    checkpoint_suffixes = SINGLE_FILE_SUFFIXES
    default_scheduler = {"num_train_timesteps": 1000, "shift": DEFAULT_SHIFT}
    input_error = AuraFlowInputError
    text_length_tag = "umt5"
    latent_space_name = "sd-vae"
    vae_shifted = False  # SDXL's VAE: the pipeline only scales
    card_tags = ("auraflow",)
    card_license = {"license": "apache-2.0"}  # AuraFlow v0.1 - v0.3

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        return is_auraflow_lora(tensors)

    # --- loading -------------------------------------------------------------------------
    def _load_parts(self, location: str) -> dict[str, Any]:
        """Load every part; returns the scheduler config."""
        from diffusers import AuraFlowTransformer2DModel
        from transformers import UMT5EncoderModel

        self._load_folder_parts(location, UMT5EncoderModel, transformer_cls=AuraFlowTransformer2DModel)
        return diffusers_parts.scheduler_config(location)

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        self.max_sequence_length = self._text_length(DEFAULT_MAX_SEQUENCE_LENGTH)
        self.patch_size = self.latent_patch = int(self.transformer.config.patch_size)

    def offload_blocks(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        if module is self.transformer:  # diffusers' _no_split_modules names the patch embedding too
            return [*module.joint_transformer_blocks, *module.single_transformer_blocks]
        return super().offload_blocks(module)

    def network_candidates(self, include_conv: bool) -> list[str]:
        return auraflow_lora_candidates(self.transformer)  # no conv layers to add for LoCon

    # --- encoding ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        hidden, mask, _, _ = self._text_pipeline().encode_prompt(
            list(prompts), do_classifier_free_guidance=False, device=self.device,
            max_sequence_length=self.max_sequence_length,
        )
        # the pipeline's mask runs over every embedding value; one per token is what it means
        tokens = mask.reshape(hidden.shape)[..., 0].to(torch.long)
        return PromptEmbeds(hidden, {"mask": tokens})

    # --- training objective --------------------------------------------------------------
    def shift_kwargs(self, height: int, width: int) -> dict[str, float]:
        return {"shift": float(self.scheduler_config.get("shift", DEFAULT_SHIFT))}  # the scheduler's fixed shift

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        return self._example_text_to_image(batch, size, "joint_attention_dim", torch.long)

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        x = batch.noisy_latents.to(self.dtype)
        return self.transformer(
            x,
            encoder_hidden_states=cond.hidden_states.to(x.device, self.dtype),
            timestep=(batch.timesteps.to(x.device, torch.float32) / 1000.0).to(self.dtype),  # sigma
            return_dict=False,
        )[0]

    # --- previews ------------------------------------------------------------------------
    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        return {
            "prompt_embeds": positive.hidden_states,
            "prompt_attention_mask": positive.extra["mask"],
            "negative_prompt_embeds": negative.hidden_states,
            "negative_prompt_attention_mask": negative.extra["mask"],
        }
