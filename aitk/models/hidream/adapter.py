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

from aitk.config.schema import TrainConfig
from aitk.models import common
from aitk.models.base import BatchContext, ModelAdapter, ModelLoadError, NoisyBatch, PartConfigs, PromptEmbeds

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


class HiDreamAdapter(ModelAdapter):
    arch_names = ("hidream",)
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")
    bucket_divisibility = 16  # 8x VAE downscale x 2x2 patches
    lora_prefix = "diffusion_model."  # ComfyUI's HiDream LoRA names: diffusion_model.<module path>
    lora_weight_names = ("lora_A", "lora_B")
    diffusers_lora_prefix = "transformer"
    base_model_version = "hidream_i1"  # ai-toolkit's
    modelspec_architecture = "hidream-i1/lora"
    modelspec_implementation = "https://github.com/HiDream-ai/HiDream-I1"
    model_label = "HiDream"
    denoiser_names = ("transformer",)
    card_tags = ("hidream", "hidream-diffusers")
    card_license = {"license": "mit"}  # HiDream-I1 (its Llama is under Meta's licence)

    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
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
    def load(self) -> None:
        source = self.model_cfg.name_or_path
        path = Path(source).expanduser()
        hint = (
            "give a diffusers folder or hub id (transformer/, vae/, text_encoder/ .. text_encoder_3/, "
            f"tokenizer/ .. tokenizer_3/, scheduler/), e.g. {DEFAULT_REPO}, or a transformer folder with "
            "model.extras_name_or_path for the other parts"
        )
        if path.exists() and not path.is_dir():
            raise ModelLoadError(f"model.name_or_path: {source!r} is a file; {hint}")
        if not path.exists() and not common.could_be_hub_id(source):
            raise ModelLoadError(f"model.name_or_path: {source!r} is neither an existing folder nor a hub id; {hint}")
        extras = self._extras_location(source, path)
        llama = self._llama_location(extras)
        self.parts_source = f"{extras}|{llama[0]}"  # the encoders' and VAE's: part of the caches' keys
        try:
            self.transformer = self._load_transformer(source, path)
            scheduler_config = self._load_parts(extras, llama)
        except ModelLoadError:
            raise
        except Exception as exc:  # OSError for missing parts / hub look-ups, others for bad files
            where = hint if path.exists() else f"looked up as a hub id{common.offline_note()}; {hint}"
            raise ModelLoadError(
                f"model.name_or_path: could not load a {self.model_label} model from {source!r} (other parts "
                f"from {extras!r}, the Llama from {llama[0]!r}, model.model_kwargs.llama_model_path): {exc} ({where})"
            ) from exc
        encoders = [getattr(self, name) for name in self.text_encoder_names]
        common.freeze((self.transformer, self.vae, *encoders))
        for module in (self.transformer, *encoders):
            common.cast(module, self.dtype)
        common.cast(self.vae, torch.float32)  # encodes / decodes in fp32 whatever trains
        self.bind_loaded(scheduler_config)

    def _extras_location(self, source: str, path: Path) -> str:
        """A full local pipeline folder itself, else extras_name_or_path, else the model."""
        extras = getattr(self.model_cfg, "extras_name_or_path", None)
        if path.is_dir() and (path / "text_encoder").is_dir():
            return str(path)
        if extras:
            extras_path = Path(extras).expanduser()
            return str(extras_path) if extras_path.exists() else extras
        if path.is_dir():
            raise ModelLoadError(
                f"model.name_or_path: {source!r} has no text_encoder/; set model.extras_name_or_path to the "
                f"model its VAE, text encoders and tokenizers come from (e.g. {DEFAULT_REPO})"
            )
        return source

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

    def _load_transformer(self, source: str, path: Path) -> Any:
        from diffusers import HiDreamImageTransformer2DModel

        # torch_dtype at load: the host never holds the 17B transformer in a wider dtype than it trains in
        if path.is_dir() and not (path / "transformer").is_dir():
            return HiDreamImageTransformer2DModel.from_pretrained(str(path), torch_dtype=self.dtype)
        location = str(path) if path.is_dir() else source
        return HiDreamImageTransformer2DModel.from_pretrained(location, subfolder="transformer", torch_dtype=self.dtype)

    def _load_parts(self, location: str, llama: tuple[str, str | None]) -> dict[str, Any]:
        """VAE, text encoders and tokenizers; returns the scheduler config."""
        from diffusers import AutoencoderKL, UniPCMultistepScheduler
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
        source, in_pipeline = llama
        sub = {"subfolder": "tokenizer_4"} if in_pipeline is not None else {}
        self.tokenizer_4 = AutoTokenizer.from_pretrained(source, **sub)
        sub = {"subfolder": "text_encoder_4"} if in_pipeline is not None else {}
        self.text_encoder_4 = LlamaForCausalLM.from_pretrained(source, torch_dtype=self.dtype, **sub)
        self.vae = AutoencoderKL.from_pretrained(self.model_cfg.vae_path or location,
                                                 **({} if self.model_cfg.vae_path else {"subfolder": "vae"}))
        try:
            return dict(UniPCMultistepScheduler.load_config(location, subfolder="scheduler"))
        except OSError:
            return dict(DEFAULT_SCHEDULER)

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        config = self.transformer.config
        self.patch_size = int(config.patch_size)
        self.max_seq = int(config.max_resolution[0]) * int(config.max_resolution[1]) // self.patch_size**2
        wanted = int(self.model_cfg.model_kwargs.get("max_sequence_length", DEFAULT_TEXT_LENGTH))
        if wanted < 1:
            raise HiDreamInputError(
                f"model.model_kwargs.max_sequence_length: {wanted} must be at least 1 (default 128)")
        lengths = [configs.tokenizer_lengths.get(name, wanted) for name in ("tokenizer_3", "tokenizer_4")]
        # never more tokens than a tokenizer allows (the tiny test models: 32), nor than CLIP takes
        self.max_sequence_length = min(wanted, CLIP_MAX_LENGTH, *(int(n) for n in lengths))
        self.scheduler_config = dict(configs.scheduler or DEFAULT_SCHEDULER)
        self.vae_scale_factor = common.vae_scale_from_config(configs.part("vae"))
        self.llama_config = configs.part("text_encoder_4")
        self._text_pipe: Any = None

    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def network_candidates(self, include_conv: bool) -> list[str]:
        return hidream_lora_candidates(self.transformer)  # no conv layers to add for LoCon

    # --- encoding ------------------------------------------------------------------------
    def _pipeline(self) -> Any:
        from diffusers import SchedulerMixin
        import diffusers

        name = self.scheduler_config.get("_class_name", DEFAULT_SCHEDULER["_class_name"])
        scheduler_class = getattr(diffusers, name, None)
        if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
            scheduler_class = diffusers.UniPCMultistepScheduler
        pipe = diffusers.HiDreamImagePipeline(
            scheduler=scheduler_class.from_config(self.scheduler_config), vae=self.vae,
            text_encoder=self.text_encoder, tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2, text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3,
            text_encoder_4=self.text_encoder_4, tokenizer_4=self.tokenizer_4, transformer=self.transformer,
        )
        pipe.default_sample_size = preview_area(self.transformer.config)
        return pipe

    def release_text_encoders(self) -> int:
        self._text_pipe = None  # it holds the encoders too
        return super().release_text_encoders()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        # the pipeline's own encoder, so training sees exactly what previews and other tools see
        if self._text_pipe is None:
            self._text_pipe = self._pipeline()
        t5, _, llama, _, pooled, _ = self._text_pipe.encode_prompt(
            prompt=list(prompts), device=self.device, dtype=self.dtype, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        # the Llama's layers come first from the pipeline; PromptEmbeds batch along dim 0
        return PromptEmbeds(t5, {"llama": llama.transpose(0, 1).contiguous(), "pooled": pooled})

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = common.encode_mode(self.vae, pixels, self.device)
        return (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    def text_encoder_id(self) -> str:
        # the token count is part of the embeddings' shape: a cache of another length is not reused
        source = getattr(self, "parts_source", self.model_cfg.name_or_path)
        return f"{self.modelspec_architecture}|{source}|tokens:{self.max_sequence_length}"

    def latent_space_id(self) -> str:
        cfg = self.vae.config
        source = self.model_cfg.vae_path or getattr(self, "parts_source", self.model_cfg.name_or_path)
        return f"flux-vae:{cfg.latent_channels}:{cfg.scaling_factor}:{cfg.shift_factor}:{source}"

    # --- training objective --------------------------------------------------------------
    def check_train_settings(self, train_cfg: Any) -> None:
        from aitk.models.flow_matching import check_train_config

        check_train_config(train_cfg, self.model_label)
        if train_cfg.bypass_guidance_embedding:
            raise HiDreamInputError(
                "train.bypass_guidance_embedding: HiDream has no guidance embedding; remove the key")

    def _check_latent_size(self, height: int, width: int) -> None:
        if height % self.patch_size or width % self.patch_size:
            raise HiDreamInputError(
                f"HiDream latents need a height and width divisible by {self.patch_size}, got {height}x{width} "
                f"(buckets must be multiples of {self.bucket_divisibility} px)"
            )
        tokens = (height // self.patch_size) * (width // self.patch_size)
        if height != width and tokens > self.max_seq:
            raise HiDreamInputError(
                f"HiDream takes non-square images of at most {self.max_seq} patches (its max_resolution); a "
                f"{width * self.vae_scale_factor}x{height * self.vae_scale_factor} px bucket has {tokens}: "
                "lower the dataset's resolution"
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
        from aitk.models.noise import apply_noise_offset

        self.check_train_settings(train_cfg)
        b, _, h, w = latents.shape
        self._check_latent_size(h, w)
        # noise levels first: the same seed then draws the same levels at every image size
        sigma = sample_sigmas(b, train_cfg, generator, shift=TRAIN_SHIFT).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        noise = apply_noise_offset(noise, train_cfg.noise_offset, generator).to(latents.device)
        noisy, target = noisy_and_target(latents, noise, sigma)
        weights = weighted_loss(sigma) if (train_cfg.timestep_type or "").lower() == "weighted" else None
        return NoisyBatch(noisy.to(self.dtype), sigma * 1000.0, target, weights, {})

    def fixed_shape_step(self):
        from aitk.models.hidream.fixed_shapes import even_expert_routing

        return even_expert_routing()

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        config = self.transformer.config
        h, w = size[1] // self.vae_scale_factor, size[0] // self.vae_scale_factor
        latents = torch.randn(batch, config.in_channels, h, w)
        noisy = NoisyBatch(latents.to(self.dtype), torch.rand(batch) * 1000.0, torch.randn(latents.shape), None, {})
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
    def sample_pipeline(self, sampler: str | None = None) -> Any:
        # the model's flow UniPC scheduler whatever sample.sampler says (preview_sampler_note)
        return self._pipeline()

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

    def preview_kwargs(self, request: Any) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Any]:
        latents = latents.to(self.device, torch.float32)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        pixels = self.vae.decode(latents).sample
        return common.pixels_to_pil(pixels, self.vae_scale_factor * self.patch_size)
