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
from pathlib import Path
from typing import Any

import torch

from aitk.config.schema import TrainConfig
from aitk.models import common
from aitk.models.base import BatchContext, ModelAdapter, ModelLoadError, NoisyBatch, PartConfigs, PromptEmbeds

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


class CogView4Adapter(ModelAdapter):
    arch_names = ("cogview4",)
    text_encoder_names = ("text_encoder",)
    bucket_divisibility = 16  # 8x VAE downscale x 2x2 patches
    lora_prefix = "diffusion_model."  # diffusion_model.<module path>, as new families' files
    lora_weight_names = ("lora_A", "lora_B")
    diffusers_lora_prefix = "transformer"
    base_model_version = "cogview4"
    modelspec_architecture = "cogview4/lora"
    model_label = "CogView4"
    denoiser_names = ("transformer",)
    card_tags = ("cogview4",)
    card_license = {"license": "apache-2.0"}  # THUDM/CogView4-6B

    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        keys = list(tensors)
        return any(k.startswith(COGVIEW4_STARTS) and any(p in k for p in COGVIEW4_PARTS) for k in keys) and not any(
            p in k for k in keys for p in OTHER_FAMILY_PARTS
        )

    # --- loading -------------------------------------------------------------------------
    def load(self) -> None:
        source = self.model_cfg.name_or_path
        path = Path(source).expanduser()
        hint = (
            "give a diffusers folder or hub id (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, "
            "scheduler/), e.g. THUDM/CogView4-6B, or a transformer folder with model.extras_name_or_path"
        )
        if path.exists() and not path.is_dir():
            raise ModelLoadError(f"model.name_or_path: {source!r} is a file; {self.model_label} loads folders; {hint}")
        if not path.exists() and not common.could_be_hub_id(source):
            raise ModelLoadError(f"model.name_or_path: {source!r} is neither an existing folder nor a hub id; {hint}")
        parts = self._parts_location(source, path)
        self.parts_source = parts
        try:
            self.transformer = self._load_transformer(source, path)
            scheduler_config = self._load_parts(parts)
        except Exception as exc:  # OSError for missing parts / hub look-ups, others for bad files
            where = hint if path.exists() else f"looked up as a hub id{common.offline_note()}; {hint}"
            raise ModelLoadError(
                f"model.name_or_path: could not load a {self.model_label} model from {source!r}"
                f"{f' (other parts from {parts!r})' if parts != source else ''}: {exc} ({where})"
            ) from exc
        common.freeze((self.transformer, self.vae, self.text_encoder))
        for module in (self.transformer, self.text_encoder):
            common.cast(module, self.dtype)
        common.cast(self.vae, torch.float32)  # encodes / decodes in fp32 whatever trains
        self.bind_loaded(scheduler_config)

    def _parts_location(self, source: str, path: Path) -> str:
        """Where the VAE, text encoder, tokenizer and scheduler come from: a full folder itself,
        else model.extras_name_or_path, else the model (a hub id)."""
        extras = getattr(self.model_cfg, "extras_name_or_path", None)
        if path.is_dir() and (path / "text_encoder").is_dir():
            return str(path)
        if extras:
            extras_path = Path(extras).expanduser()
            return str(extras_path) if extras_path.exists() else extras
        if path.is_dir():
            raise ModelLoadError(
                f"model.name_or_path: {source!r} has no text_encoder/; set model.extras_name_or_path to the "
                "model its VAE, text encoder and tokenizer come from (e.g. THUDM/CogView4-6B)"
            )
        return source

    def _load_transformer(self, source: str, path: Path) -> Any:
        from diffusers import CogView4Transformer2DModel

        # torch_dtype at load: the host never holds the transformer in a wider dtype than it trains in
        if path.is_dir() and not (path / "transformer").is_dir():
            return CogView4Transformer2DModel.from_pretrained(str(path), torch_dtype=self.dtype)
        location = str(path) if path.is_dir() else source
        return CogView4Transformer2DModel.from_pretrained(location, subfolder="transformer", torch_dtype=self.dtype)

    def _load_parts(self, location: str) -> dict[str, Any]:
        """The VAE, text encoder and tokenizer; returns the scheduler config."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer, GlmModel

        self.tokenizer = AutoTokenizer.from_pretrained(location, subfolder="tokenizer")
        self.text_encoder = GlmModel.from_pretrained(location, subfolder="text_encoder", torch_dtype=self.dtype)
        self.vae = AutoencoderKL.from_pretrained(self.model_cfg.vae_path or location,
                                                 subfolder=None if self.model_cfg.vae_path else "vae")
        try:
            return dict(FlowMatchEulerDiscreteScheduler.load_config(location, subfolder="scheduler"))
        except OSError:
            return dict(DEFAULT_SCHEDULER)

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        wanted = int(self.model_cfg.model_kwargs.get("max_sequence_length", DEFAULT_TEXT_LENGTH))
        self.max_sequence_length = min(wanted, int(configs.tokenizer_lengths.get("tokenizer", wanted)))
        self.scheduler_config = dict(configs.scheduler or DEFAULT_SCHEDULER)
        self.vae_scale_factor = common.vae_scale_from_config(configs.part("vae"))
        self.patch_size = int(self.transformer.config.patch_size)
        self._text_pipe: Any = None

    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def offload_blocks(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        if module is self.transformer:  # the class also names its patch embedding, which runs once
            return list(module.transformer_blocks)
        return super().offload_blocks(module)

    # --- encoding ------------------------------------------------------------------------
    def _pipeline(self) -> Any:
        from diffusers import CogView4Pipeline, FlowMatchEulerDiscreteScheduler

        return CogView4Pipeline(
            tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae, transformer=self.transformer,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
        )

    def release_text_encoders(self) -> int:
        self._text_pipe = None  # it holds the encoder too
        return super().release_text_encoders()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        # The pipeline's own encoder, one prompt at a time: its padding depends on the batch's longest
        if self._text_pipe is None:
            self._text_pipe = self._pipeline()
        embeds = [
            self._text_pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device=self.device,
                                          max_sequence_length=self.max_sequence_length)[0]
            for prompt in prompts
        ]
        return PromptEmbeds.cat([PromptEmbeds(e, {"mask": torch.ones(e.shape[:2], dtype=torch.bool)}) for e in embeds])

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        # the inverse of the pipeline's decode (latents / scaling_factor, no shift)
        return common.encode_mode(self.vae, pixels, self.device) * self.vae.config.scaling_factor

    def text_encoder_id(self) -> str:
        source = getattr(self, "parts_source", self.model_cfg.name_or_path)
        return f"{self.modelspec_architecture}|{source}|glm:{self.max_sequence_length}"

    def latent_space_id(self) -> str:
        cfg = self.vae.config
        source = self.model_cfg.vae_path or getattr(self, "parts_source", self.model_cfg.name_or_path)
        return f"cogview4-vae:{cfg.latent_channels}:{cfg.scaling_factor}:{source}"

    # --- training objective --------------------------------------------------------------
    def check_train_settings(self, train_cfg: Any) -> None:
        from aitk.models.flow_matching import check_train_config

        check_train_config(train_cfg, self.model_label)
        if train_cfg.bypass_guidance_embedding:
            raise CogView4InputError("train.bypass_guidance_embedding: CogView4 has no guidance embedding; remove the key")

    def _check_latent_size(self, height: int, width: int) -> None:
        if height % self.patch_size or width % self.patch_size:
            raise CogView4InputError(
                f"{self.model_label} latents need a height and width divisible by {self.patch_size}, got "
                f"{height}x{width} (buckets must be multiples of {self.bucket_divisibility} px)"
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
        shift = cogview4_shift(self.scheduler_config, (h // self.patch_size) * (w // self.patch_size))
        # noise levels first: the same seed then draws the same levels at every image size
        sigma = sample_sigmas(b, train_cfg, generator, mu=math.log(shift)).to(latents.device)
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
    def sample_pipeline(self, sampler: str | None = None) -> Any:
        # CogView4's flow-match Euler scheduler whatever sample.sampler says (preview_sampler_note)
        return self._pipeline()

    def preview_sampler_note(self, sampler: str) -> str | None:
        if sampler in ("flowmatch", "euler"):
            return None
        return f"flow-match Euler: {self.model_label} is a flow-matching model, {sampler} does not apply"

    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        # each prompt's own tokens (the pipeline runs the two passes apart, any lengths)
        return {
            "prompt_embeds": positive.hidden_states[:, : max(prompt_lengths(positive))],
            "negative_prompt_embeds": negative.hidden_states[:, : max(prompt_lengths(negative))],
        }

    def preview_kwargs(self, request: Any) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Any]:
        latents = latents.to(self.device, torch.float32) / self.vae.config.scaling_factor
        pixels = self.vae.decode(latents).sample
        return common.pixels_to_pil(pixels, self.vae_scale_factor * self.patch_size)
