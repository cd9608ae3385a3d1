"""CogView4 (THUDM/CogView4-6B): CogView4Transformer2DModel + a 16-channel AutoencoderKL + GLM-4.

Training is rectified flow (aitk.models.flow_matching), as ai-toolkit trains CogView4:
x = (1 - sigma) * x0 + sigma * noise, target = noise - x0, and the transformer takes the timestep
1000 * sigma as CogView4Pipeline passes the scheduler's timesteps. timestep_type "shift" (and
"flux_shift" / "lumina2_shift", drawn alike) uses CogView4's resolution-dependent linear time
shift, the pipeline's mu = sqrt(image tokens / base_image_seq_len) * max_shift + base_shift as the
factor s of s*u / (1 + (s - 1)*u); "weighted" draws uniform sigmas and weights each sample's loss.

The transformer's size conditioning (original size, target size, crop) is the bucket's pixel size
twice and a (0, 0) crop, what ai-toolkit feeds it and what previews use.

Text: the pipeline's own encode_prompt: GLM's second-to-last hidden states of the prompt,
left-padded with the pad token to a multiple of 16 tokens, no attention mask. Each prompt is
encoded alone (as a preview encodes it), so a cached prompt does not depend on its batch.
PromptEmbeds keeps a bool "mask" of each prompt's own tokens: a batch of prompts of different
lengths (right-padded by PromptEmbeds.cat) runs the transformer once per prompt length, on each
prompt's own tokens, so it predicts exactly what each prompt alone gives (the transformer's own
attention_mask adds the mask to the logits rather than masking, so it is not used).

Loading: a diffusers folder or hub id, or a transformer folder with model.extras_name_or_path
for the VAE, text encoder, tokenizer and scheduler (ai-toolkit's name_or_path_original).

LoRA files (comfyui / kohya): `diffusion_model.<diffusers module path>.lora_A.weight`,
`.lora_B.weight` and `.alpha` (docs/lora-formats.md); save_format diffusers gives the
`transformer.<path>` names CogView4Pipeline.load_lora_weights reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from aitk.models import diffusers_parts
from aitk.models.base import NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.flow_adapter import FlowTransformerAdapter

#: ai-toolkit's CogView4 scheduler (also the preview scheduler when a model ships none)
DEFAULT_SCHEDULER = {
    "num_train_timesteps": 1000, "base_image_seq_len": 256, "base_shift": 0.25, "max_shift": 0.75,
    "shift": 1.0, "time_shift_type": "linear", "use_dynamic_shifting": True,
}
DEFAULT_TEXT_LENGTH = 1024  # CogView4Pipeline's max_sequence_length
PAD_MULTIPLE = 16  # the pipeline left-pads GLM tokens to a multiple of 16
#: a CogView4 file names top-level `transformer_blocks.N.attn1` (its joint attention), in ours /
#: diffusers' / kohya names, and never an `attn2` (PixArt's blocks have the same `attn1` beside
#: their cross-attention `attn2`)
COGVIEW4_PARTS = (".attn1.to_q", "_attn1_to_q")
OTHER_FAMILY_PARTS = (".attn2.", "_attn2_")
COGVIEW4_STARTS = ("diffusion_model.transformer_blocks.", "transformer.transformer_blocks.",
                   "lora_unet_transformer_blocks_")


class CogView4InputError(ValueError):
    """A batch or setting this CogView4 model cannot train on."""


def cogview4_shift(config: Mapping[str, Any], tokens: int) -> float:
    """The pipeline's time-shift factor for an image of `tokens` 2x2 patches."""
    from diffusers.pipelines.cogview4.pipeline_cogview4 import calculate_shift

    return float(calculate_shift(
        tokens, config.get("base_image_seq_len", 256), config.get("base_shift", 0.25), config.get("max_shift", 0.75)
    ))


def prompt_lengths(cond: PromptEmbeds) -> list[int]:
    """Each prompt's own token count (its "mask"); all full length without a mask or with a mask
    of fake tensors (the plan's example batches have no values)."""
    from torch._subclasses.fake_tensor import is_fake

    mask = cond.extra.get("mask")
    if mask is None or is_fake(mask):
        return [cond.hidden_states.shape[1]] * cond.hidden_states.shape[0]
    return [int(n) for n in mask.sum(1).tolist()]


class CogView4Adapter(FlowTransformerAdapter):
    arch_names = ("cogview4",)
    text_encoder_names = ("text_encoder",)
    lora_prefix = "diffusion_model."  # diffusion_model.<module path>, as new families' files
    lora_weight_names = ("lora_A", "lora_B")
    lora_alpha_in_weights = True  # no .alpha in comfyui files: diffusers' loader reads them
    base_model_version = "cogview4"
    modelspec_architecture = "cogview4/lora"
    model_label = "CogView4"
    pipeline_name = "CogView4Pipeline"
    transformer_class_name = "CogView4Transformer2DModel"
    transformer_single_file = False  # a transformer folder or a whole pipeline, no single file
    single_file_extras = "THUDM/CogView4-6B"  # the example the load errors give
    default_scheduler = DEFAULT_SCHEDULER
    input_error = CogView4InputError
    text_length_tag = "glm"
    latent_space_name = "cogview4-vae"
    vae_shifted = False  # the pipeline decodes latents / scaling_factor, no shift
    bypass_guidance_note = "CogView4 has no guidance embedding; remove the key"
    card_tags = ("cogview4",)
    card_license = {"license": "apache-2.0"}  # THUDM/CogView4-6B

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        keys = list(tensors)
        return any(k.startswith(COGVIEW4_STARTS) and any(p in k for p in COGVIEW4_PARTS) for k in keys) and not any(
            p in k for k in keys for p in OTHER_FAMILY_PARTS
        )

    # --- loading -------------------------------------------------------------------------
    def _load_parts(self, location: str) -> dict[str, Any]:
        """The VAE, text encoder and tokenizer; returns the scheduler config."""
        from transformers import GlmModel

        self._load_folder_parts(location, GlmModel)
        return diffusers_parts.scheduler_config(location, DEFAULT_SCHEDULER)

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        self.max_sequence_length = self._text_length(DEFAULT_TEXT_LENGTH)
        self.patch_size = self.latent_patch = int(self.transformer.config.patch_size)

    def offload_blocks(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        if module is self.transformer:  # the class also names its patch embedding, which runs once
            return list(module.transformer_blocks)
        return super().offload_blocks(module)

    # --- encoding ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        # The pipeline's own encoder, one prompt at a time: its padding depends on the batch's longest
        pipe = self._text_pipeline()
        embeds = [
            pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device=self.device,
                               max_sequence_length=self.max_sequence_length)[0]
            for prompt in prompts
        ]
        return PromptEmbeds.cat([PromptEmbeds(e, {"mask": torch.ones(e.shape[:2], dtype=torch.bool)}) for e in embeds])

    # --- training objective --------------------------------------------------------------
    def shift_kwargs(self, height: int, width: int) -> dict[str, float]:
        shift = cogview4_shift(self.scheduler_config, (height // self.patch_size) * (width // self.patch_size))
        return {"mu": math.log(shift)}

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        config = self.transformer.config
        noisy = self._example_noisy(self._example_latents(batch, size, config.in_channels))
        tokens = -(-self.max_sequence_length // PAD_MULTIPLE) * PAD_MULTIPLE  # the longest prompt, padded
        cond = PromptEmbeds(
            torch.randn(batch, tokens, config.text_embed_dim, dtype=self.dtype),
            {"mask": torch.ones(batch, tokens, dtype=torch.bool)},
        )
        return noisy, cond

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        x = batch.noisy_latents.to(self.dtype)
        self._check_latent_size(*x.shape[-2:])
        text = cond.hidden_states.to(x.device, self.dtype)
        timesteps = batch.timesteps.to(x.device, self.dtype).expand(x.shape[0])
        lengths = prompt_lengths(cond)
        if len(set(lengths)) <= 1:
            return self._transformer(x, text[:, : lengths[0]] if lengths else text, timesteps)
        # prompts of different lengths: each group of one length on its own tokens, in batch order
        out = torch.empty_like(x)
        for length in sorted(set(lengths)):
            rows = torch.tensor([i for i, n in enumerate(lengths) if n == length], device=x.device)
            out[rows] = self._transformer(x[rows], text[rows, :length], timesteps[rows])
        return out

    def _transformer(self, x: torch.Tensor, text: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        # size conditioning as previews give it: the image's pixel size as original and target, no crop
        size = torch.tensor([[h * self.vae_scale_factor, w * self.vae_scale_factor]], dtype=text.dtype,
                            device=x.device).repeat(b, 1)
        return self.transformer(
            hidden_states=x,
            encoder_hidden_states=text,
            timestep=timesteps,
            original_size=size,
            target_size=size,
            crop_coords=torch.zeros_like(size),
            return_dict=False,
        )[0]

    # --- previews ------------------------------------------------------------------------
    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        # each prompt's own tokens (the pipeline runs the two passes apart, any lengths)
        return {
            "prompt_embeds": positive.hidden_states[:, : max(prompt_lengths(positive))],
            "negative_prompt_embeds": negative.hidden_states[:, : max(prompt_lengths(negative))],
        }
