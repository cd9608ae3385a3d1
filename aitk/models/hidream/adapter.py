"""HiDream-I1 (Full; Dev and Fast are distilled): HiDreamImageTransformer2DModel + FLUX.1's VAE +
CLIP-L, CLIP-G, T5 and Llama 3.1 8B Instruct.

Training is rectified flow (aitk.models.flow_matching): x = (1 - sigma) * x0 + sigma * noise,
target = noise - x0, NoisyBatch.timesteps = 1000 * sigma, the timestep the transformer takes.
HiDreamImagePipeline negates the transformer's output before stepping, so `predict` returns it
negated too. timestep_type "shift" (and "flux_shift" / "lumina2_shift", drawn alike) uses
ai-toolkit's fixed HiDream shift of 3 (its training scheduler), "weighted" uniform sigmas with
per-sample loss weights (aitk.models.flow_timestep_types).

Text (the pipeline's own encode_prompt, max_sequence_length tokens, default 128 as ai-toolkit and
the pipeline): T5's last hidden states (PromptEmbeds.hidden_states), every Llama layer's hidden
states (embeddings left out) as extra "llama" (B, layers, tokens, width): each transformer block
reads the layer its config's `llama_layers` names through its own caption projection; both CLIPs'
pooled projections joined as extra "pooled".

Mixture of experts: each block's image feed-forward (`ff_i`) is a shared expert plus routed
experts (`ff_i.experts.N`), a gate (`ff_i.gate`, a weight, no Linear) choosing two per token. In
training mode diffusers runs the differentiable routing path and computes the gate's
load-balancing loss but adds it nowhere; ai-toolkit adds none either, so neither does this
version. LoRA targets are every Linear of the double- and single-stream blocks (ai-toolkit's
block list for HiDream); upstream's example and UI preset leave the routed experts and the gate
out with network_kwargs.ignore_if_contains ["ff_i.experts", "ff_i.gate"].

Loading: `name_or_path` a diffusers folder or hub id (HiDream-ai/HiDream-I1-Full) or a folder with
config.json of the transformer alone; VAE, CLIPs, T5, tokenizers and scheduler from a full local
pipeline folder itself, else model.extras_name_or_path, else the model. The Llama comes from
model.model_kwargs.llama_model_path (a Llama folder or hub id, or a pipeline folder with
text_encoder_4/ and tokenizer_4/); unset: the parts folder's text_encoder_4/ when it has one, else
unsloth/Meta-Llama-3.1-8B-Instruct (ai-toolkit's default; meta-llama's is gated).

Previews: HiDreamImagePipeline with the model's UniPC flow scheduler (ai-toolkit previews with
flow UniPC, shift 3). The pipeline renders every preview at the area of the transformer's
`max_resolution` (1024 x 1024 px on the real model) with the aspect ratio asked for, as
ai-toolkit's previews of HiDream do.

LoRA files (comfyui / kohya): `diffusion_model.<module path>.lora_A.weight`, `.lora_B.weight` and
`.alpha`: ComfyUI's HiDream names (its module paths are diffusers'), docs/lora-formats.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aitk.models import diffusers_parts
from aitk.models.base import ModelLoadError, NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.flow_adapter import FlowTransformerAdapter

#: ai-toolkit's training scheduler for HiDream: flow matching with a fixed shift of 3
TRAIN_SHIFT = 3.0
#: T5 / Llama (and CLIP) tokens per prompt: ai-toolkit's and the pipeline's default
DEFAULT_TEXT_LENGTH = 128
#: ai-toolkit's default Llama (an ungated copy of meta-llama/Meta-Llama-3.1-8B-Instruct)
DEFAULT_LLAMA = "unsloth/Meta-Llama-3.1-8B-Instruct"
#: the pipeline's CLIP token cap
CLIP_MAX_LENGTH = 218
#: HiDream-I1-Full's scheduler when the model has none (previews)
DEFAULT_SCHEDULER = {
    "_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000, "prediction_type": "flow_prediction",
    "use_flow_sigmas": True, "flow_shift": TRAIN_SHIFT,
}
#: where the VAE, CLIPs, T5 and scheduler of the real model come from when nothing else says
DEFAULT_REPO = "HiDream-ai/HiDream-I1-Full"
#: the blocks ai-toolkit puts LoRA in (its get_transformer_block_names for HiDream)
BLOCK_LISTS = ("double_stream_blocks.", "single_stream_blocks.")


class HiDreamInputError(ValueError):
    """A batch or setting this HiDream model cannot train on."""


def hidream_lora_candidates(transformer: torch.nn.Module) -> list[str]:
    """Default LoRA targets: every Linear of the double- and single-stream blocks (attention,
    AdaLN modulation, the text and image feed-forwards, routed experts included)."""
    from aitk.networks.lora import eligible_modules

    return [name for name in eligible_modules(transformer) if name.startswith(BLOCK_LISTS)]


def is_hidream_lora(keys: Any) -> bool:
    """Whether a network file's keys name HiDream's blocks (ours / ComfyUI's or diffusers' names)."""
    keys = list(keys)
    return any(k.startswith(("diffusion_model.", "transformer.")) and ".ff_i." in k for k in keys) or any(
        k.startswith(("diffusion_model.double_stream_blocks.", "transformer.double_stream_blocks.")) for k in keys
    )


def preview_area(transformer_config: Any) -> int:
    """The pipeline's `default_sample_size` (latent side of the area every preview renders at) for
    this transformer: its max_resolution, 128 on the real model as the stock pipeline's fixed value."""
    rows, cols = transformer_config.max_resolution
    return math.isqrt(int(rows) * int(cols))


def unpatchify_training_output(out: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """The transformer's training-mode output (B, C, tokens, patch * patch), tokens in row-major
    patch order and padded to max_seq for non-square latents, as latents (B, C, height, width)."""
    b, c = out.shape[:2]
    rows, cols = height // patch, width // patch
    grid = out[:, :, : rows * cols].reshape(b, c, rows, cols, patch, patch)
    return grid.permute(0, 1, 2, 4, 3, 5).reshape(b, c, height, width)


class HiDreamAdapter(FlowTransformerAdapter):
    arch_names = ("hidream",)
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")
    lora_prefix = "diffusion_model."  # ComfyUI's HiDream LoRA names: diffusion_model.<module path>
    lora_weight_names = ("lora_A", "lora_B")
    lora_alpha_in_weights = True  # no .alpha in comfyui files: diffusers' loader reads them
    base_model_version = "hidream_i1"  # ai-toolkit's
    modelspec_architecture = "hidream-i1/lora"
    modelspec_implementation = "https://github.com/HiDream-ai/HiDream-I1"
    model_label = "HiDream"
    pipeline_name = "HiDreamImagePipeline"
    folder_parts = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                    "tokenizer_2", "tokenizer_3", "scheduler")
    transformer_class_name = "HiDreamImageTransformer2DModel"
    transformer_single_file = False  # a transformer folder or a whole pipeline, no single file
    single_file_extras = DEFAULT_REPO  # the example the load errors give
    default_scheduler = DEFAULT_SCHEDULER
    input_error = HiDreamInputError
    text_length_tag = "tokens"
    bypass_guidance_note = "HiDream has no guidance embedding; remove the key"
    card_tags = ("hidream", "hidream-diffusers")
    card_license = {"license": "mit"}  # HiDream-I1 (its Llama is under Meta's licence)

    text_encoder_2: Any
    tokenizer_2: Any
    text_encoder_3: Any
    tokenizer_3: Any
    text_encoder_4: Any
    tokenizer_4: Any

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        return is_hidream_lora(tensors)

    # --- loading -------------------------------------------------------------------------
    def _locate_extras(self, extras: str) -> None:
        self.llama_source = self._llama_location(extras)
        self.parts_source = f"{extras}|{self.llama_source[0]}"  # the encoders' and VAE's: part of the caches' keys

    def _what(self) -> str:
        llama = getattr(self, "llama_source", None)
        where = f" (the Llama from {llama[0]!r}, model.model_kwargs.llama_model_path)" if llama else ""
        return super()._what() + where

    def _llama_location(self, extras: str) -> tuple[str, str | None]:
        """(where the Llama comes from, its subfolder prefix: "" or None for a plain Llama)."""
        wanted = self.model_cfg.model_kwargs.get("llama_model_path")
        source = str(wanted) if wanted else None
        if source is None:
            local = Path(extras).expanduser()
            source = extras if (local / "text_encoder_4").is_dir() else DEFAULT_LLAMA
        local = Path(source).expanduser()
        if local.exists() and not local.is_dir():
            raise ModelLoadError(
                f"model.model_kwargs.llama_model_path: {source!r} is a file; give a Llama 3.1 folder or hub id "
                f"(e.g. {DEFAULT_LLAMA}) or a pipeline folder with text_encoder_4/ and tokenizer_4/"
            )
        if local.is_dir():
            return str(local), "" if (local / "text_encoder_4").is_dir() else None
        return source, None

    def _load_parts(self, location: str) -> dict[str, Any]:
        """VAE, text encoders and tokenizers; returns the scheduler config."""
        from transformers import (
            AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, LlamaForCausalLM, T5EncoderModel, T5Tokenizer,
        )

        for suffix in ("", "_2"):
            setattr(self, f"tokenizer{suffix}", CLIPTokenizer.from_pretrained(location, subfolder=f"tokenizer{suffix}"))
            setattr(self, f"text_encoder{suffix}", CLIPTextModelWithProjection.from_pretrained(
                location, subfolder=f"text_encoder{suffix}", torch_dtype=self.dtype))
        self.tokenizer_3 = T5Tokenizer.from_pretrained(location, subfolder="tokenizer_3")
        self.text_encoder_3 = T5EncoderModel.from_pretrained(
            location, subfolder="text_encoder_3", torch_dtype=self.dtype)
        source, in_pipeline = self.llama_source
        sub = {"subfolder": "tokenizer_4"} if in_pipeline is not None else {}
        self.tokenizer_4 = AutoTokenizer.from_pretrained(source, **sub)
        sub = {"subfolder": "text_encoder_4"} if in_pipeline is not None else {}
        self.text_encoder_4 = LlamaForCausalLM.from_pretrained(source, torch_dtype=self.dtype, **sub)
        self.vae = self._load_vae(location)
        return diffusers_parts.scheduler_config(location, DEFAULT_SCHEDULER)

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        config = self.transformer.config
        self.patch_size = self.latent_patch = int(config.patch_size)
        self.max_seq = int(config.max_resolution[0]) * int(config.max_resolution[1]) // self.patch_size**2
        # never more tokens than T5's or the Llama's tokenizer allows, nor than CLIP takes
        self.max_sequence_length = min(self._text_length(DEFAULT_TEXT_LENGTH, "tokenizer_3"),
                                       self._text_length(DEFAULT_TEXT_LENGTH, "tokenizer_4"), CLIP_MAX_LENGTH)
        self.llama_config = configs.part("text_encoder_4")

    def network_candidates(self, include_conv: bool) -> list[str]:
        return hidream_lora_candidates(self.transformer)  # no conv layers to add for LoCon

    # --- encoding ------------------------------------------------------------------------
    def _scheduler(self) -> Any:
        """The model's own scheduler class (flow UniPC on the released models)."""
        import diffusers
        from diffusers import SchedulerMixin

        name = self.scheduler_config.get("_class_name", DEFAULT_SCHEDULER["_class_name"])
        scheduler_class = getattr(diffusers, name, None)
        if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
            scheduler_class = diffusers.UniPCMultistepScheduler
        return scheduler_class.from_config(self.scheduler_config)

    def _pipeline(self, scheduler: Any | None = None) -> Any:
        pipe = super()._pipeline(scheduler)
        pipe.default_sample_size = preview_area(self.transformer.config)
        return pipe

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        t5, _, llama, _, pooled, _ = self._text_pipeline().encode_prompt(
            prompt=list(prompts), device=self.device, dtype=self.dtype, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        # the Llama's layers come first from the pipeline; PromptEmbeds batch along dim 0
        return PromptEmbeds(t5, {"llama": llama.transpose(0, 1).contiguous(), "pooled": pooled})

    # --- training objective --------------------------------------------------------------
    def shift_kwargs(self, height: int, width: int) -> dict[str, float]:
        return {"shift": TRAIN_SHIFT}  # ai-toolkit's fixed HiDream shift

    def _check_latent_size(self, height: int, width: int) -> None:
        super()._check_latent_size(height, width)
        tokens = (height // self.patch_size) * (width // self.patch_size)
        if height != width and tokens > self.max_seq:
            raise HiDreamInputError(
                f"HiDream takes non-square images of at most {self.max_seq} patches (its max_resolution); a "
                f"{width * self.vae_scale_factor}x{height * self.vae_scale_factor} px bucket has {tokens}: "
                "lower the dataset's resolution"
            )

    def fixed_shape_step(self):
        from aitk.models.hidream.fixed_shapes import even_expert_routing

        return even_expert_routing()

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        config = self.transformer.config
        noisy = self._example_noisy(self._example_latents(batch, size, config.in_channels))
        t5_width, llama_width = config.caption_channels
        layers = int(self.llama_config.get("num_hidden_layers", max(config.llama_layers) + 1))
        tokens = self.max_sequence_length
        cond = PromptEmbeds(
            torch.randn(batch, tokens, t5_width, dtype=self.dtype),
            {"llama": torch.randn(batch, layers, tokens, llama_width, dtype=self.dtype),
             "pooled": torch.randn(batch, config.text_emb_dim, dtype=self.dtype)},
        )
        return noisy, cond

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        x = batch.noisy_latents.to(self.dtype)
        h, w = x.shape[-2:]
        self._check_latent_size(h, w)
        out = self.transformer(
            hidden_states=x,
            timesteps=batch.timesteps.to(x.device, self.dtype),
            encoder_hidden_states_t5=cond.hidden_states.to(x.device, self.dtype),
            encoder_hidden_states_llama3=cond.extra["llama"].to(x.device, self.dtype).transpose(0, 1),
            pooled_embeds=cond.extra["pooled"].to(x.device, self.dtype),
            return_dict=False,
        )[0]
        # in training mode (the MoE's differentiable routing) diffusers returns the patches unfolded
        if self.transformer.training and not self.transformer.config.force_inference_output:
            out = unpatchify_training_output(out, h, w, self.patch_size)
        return -out

    # --- previews ------------------------------------------------------------------------
    def preview_sampler_note(self, sampler: str) -> str | None:
        if sampler in ("flowmatch", "unipc"):
            return None
        return f"flow UniPC: {self.model_label} previews with its own scheduler, {sampler} does not apply"

    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        return {
            "prompt_embeds_t5": positive.hidden_states,
            "prompt_embeds_llama3": positive.extra["llama"].transpose(0, 1),
            "pooled_prompt_embeds": positive.extra["pooled"],
            "negative_prompt_embeds_t5": negative.hidden_states,
            "negative_prompt_embeds_llama3": negative.extra["llama"].transpose(0, 1),
            "negative_pooled_prompt_embeds": negative.extra["pooled"],
        }
