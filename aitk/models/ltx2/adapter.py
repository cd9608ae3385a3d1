"""LTX-2 (`ltx2`): LTX2VideoTransformer3DModel, an audio-video transformer, with its video VAE
(32x spatial / 8x temporal compression: 8k+1 frames, 32 px buckets), audio VAE, vocoder, Gemma 3
text encoder and the text connectors; trained with flow matching as ai-toolkit does.

- Video branch trained, audio branch frozen: the default LoRA targets are the video blocks'
  self-attention, text cross-attention and feed-forward (attn1, attn2, ff); every audio module and
  the cross-modal attentions stay frozen. Each step the audio stream gets noise latents for the
  clip's duration at the video's noise level (as ai-toolkit does for clips without sound); its
  prediction is discarded.
- Text: the pipeline's own encode_prompt (Gemma 3, every hidden state side by side, prompts
  left-padded to model.model_kwargs.max_sequence_length, default 1024). PromptEmbeds keep only
  the real tokens (front-aligned with a "mask"), so cached prompts stay small; `predict` pads them
  back on the left with zeros, and the connectors (which mask the padding) turn them into the
  video and audio text streams exactly as the pipeline does.
- Objective (aitk.models.flow_matching): x = (1 - s) x0 + s e, target e - x0, timestep 1000 s.
  The shift types draw with the scheduler's resolution-dependent mu over the clip's latent
  tokens (base / max shift 0.95 / 2.05 over 1024 .. 4096 tokens).
- Image-to-video (dataset do_i2v): the clip's first frame, encoded alone, replaces the first
  latent frame, which gets timestep 0 as LTX2ImageToVideoPipeline gives it; the prediction there
  is replaced by the target (no loss, no gradient) and each sample's loss is rescaled to the mean
  over the other frames (ai-toolkit's masked mean).
- RoPE time positions at model.model_kwargs.frame_rate frames per second (default 24, the
  pipeline's and ai-toolkit's UI default).

LoRA files (comfyui / kohya): `diffusion_model.<module path>.lora_A.weight`, `.lora_B.weight` and
`.alpha`: the transformer blocks' original names equal diffusers' (attn1.to_q ...), which ComfyUI
maps for LTX-2 and LTX2Pipeline.load_lora_weights converts (docs/lora-formats.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aitk.config.schema import TrainConfig
from aitk.models import diffusers_parts
from aitk.models.base import BatchContext, ModelLoadError, NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.flow_adapter import FlowTransformerAdapter
from aitk.models.ltx2 import prompts as ltx_prompts
from aitk.models.ltx2.previews import LTX2Previews

#: LTX-2's scheduler (ai-toolkit trains with the same): the schedule when a model has none
DEFAULT_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.95,
    "max_shift": 2.05, "base_image_seq_len": 1024, "max_image_seq_len": 4096, "shift_terminal": 0.1,
    "time_shift_type": "exponential",
}
DEFAULT_TEXT_LENGTH = 1024  # LTX2Pipeline's max_sequence_length (the connectors want it)
DEFAULT_FRAME_RATE = 24.0
#: the video branch's layers inside a block: what LoRA trains by default
VIDEO_BLOCK_LAYERS = re.compile(r"^transformer_blocks\.\d+\.(attn1|attn2|ff)\.")
#: an LTX-2 LoRA key: a transformer block's layer under ComfyUI's / ai-toolkit's, diffusers' or kohya's name
LTX2_KEY = re.compile(
    r"^(?:diffusion_model\.|transformer\.|lora_unet_)transformer_blocks[._]\d+[._]"
    r"(attn1|attn2|ff|audio_attn1|audio_attn2|audio_ff|audio_to_video_attn|video_to_audio_attn)[._]"
)


class LTX2InputError(ValueError):
    """A batch or setting this LTX-2 model cannot train on."""


def ltx2_lora_candidates(transformer: torch.nn.Module) -> list[str]:
    """Default LoRA targets: the Linear layers of the video blocks' attn1 / attn2 / ff."""
    from aitk.networks.lora import eligible_modules

    return [name for name in eligible_modules(transformer) if VIDEO_BLOCK_LAYERS.match(name)]


class LTX2Adapter(LTX2Previews, FlowTransformerAdapter):
    arch_names = ("ltx2",)
    optional_first_frame = True  # a preview's ctrl_img is its first frame (image to video)
    text_encoder_names = ("text_encoder",)
    #: frozen parts: the video VAE (latents, first frames), the connectors (run every step on the
    #: cached prompts), the audio VAE and vocoder (previews' pipeline needs them)
    auxiliary_names = ("vae", "connectors", "audio_vae", "vocoder")
    step_auxiliary_names = ("connectors", "vae")  # prompts through the connectors; I2V first frames
    bucket_divisibility = 32  # the VAE's 32x spatial compression (1x1 patches)
    frame_rule = "8k+1"  # the VAE's 8x temporal compression (causal first frame)
    latent_patch = 1
    lora_prefix = "diffusion_model."  # ComfyUI's and ai-toolkit's LTX-2 names: diffusion_model.<module path>
    lora_weight_names = ("lora_A", "lora_B")
    lora_alpha_in_weights = True  # diffusers' LTX-2 loader refuses `.alpha` keys; ComfyUI reads scale 1
    base_model_version = "ltx2"  # ai-toolkit's
    modelspec_architecture = "ltx-2/lora"
    model_label = "LTX-2"
    pipeline_name = "LTX2Pipeline"
    folder_parts = ("transformer", "vae", "audio_vae", "vocoder", "connectors", "text_encoder", "tokenizer", "scheduler")
    required_folder_parts = ("transformer", "vae", "connectors", "text_encoder", "tokenizer")
    folder_example = "Lightricks/LTX-2"
    vae_class_name = "AutoencoderKLLTX2Video"
    default_scheduler = DEFAULT_SCHEDULER
    input_error = LTX2InputError
    text_length_tag = "gemma3"
    latent_space_name = "ltx2-vae"
    bypass_guidance_note = "LTX-2 has no guidance embedding; remove the key"
    card_pipeline_tag = "text-to-video"
    card_tags = ("ltx-video", "ltx-2")
    card_license = {
        "license": "other",
        "license_name": "ltx-2-community-license",
        "license_link": "https://huggingface.co/Lightricks/LTX-2/blob/main/LICENSE",
    }

    connectors: Any
    audio_vae: Any
    vocoder: Any

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        layers = {m.group(1) for key in tensors if (m := LTX2_KEY.match(key))}
        # the video branch alone is named like other DiTs' blocks (SD 3 has `attn` and `ff_context`,
        # CogView4 no `attn2`; PixArt's names are the same); the audio branch is LTX-2's own
        if layers & {"audio_attn1", "audio_attn2", "audio_ff", "audio_to_video_attn", "video_to_audio_attn"}:
            return True
        other = any(".attn." in key or "ff_context" in key for key in tensors)
        return "attn2" in layers and not other

    # --- loading -------------------------------------------------------------------------
    def load(self) -> None:
        source = self.model_cfg.name_or_path
        if Path(source).suffix.lower() in diffusers_parts.CHECKPOINT_SUFFIXES:
            raise ModelLoadError(
                f"model.name_or_path: {source!r} is a single file; LTX-2 loads from a diffusers folder or hub id "
                "(e.g. Lightricks/LTX-2) with transformer/, vae/, audio_vae/, vocoder/, connectors/, text_encoder/ "
                "and tokenizer/"
            )
        scheduler_config = self._load_sources()
        # the VAEs and vocoder in fp32 (encode / decode only); the connectors in the training dtype,
        # the text encoder's, whose hidden states they read
        diffusers_parts.freeze_loaded(self.loaded_parts(), self.dtype, ("vae", "audio_vae", "vocoder"))
        self.bind_loaded(scheduler_config)

    def _load_parts(self, location: str) -> dict[str, Any]:
        import diffusers
        from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
        from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

        self.tokenizer = AutoTokenizer.from_pretrained(location, subfolder="tokenizer")
        self.text_encoder = Gemma3ForConditionalGeneration.from_pretrained(
            location, subfolder="text_encoder", torch_dtype=self.dtype
        )
        self.text_encoder.model.vision_tower = None  # prompts are text only (ai-toolkit drops it too)
        self.connectors = LTX2TextConnectors.from_pretrained(location, subfolder="connectors", torch_dtype=self.dtype)
        self.transformer = diffusers.LTX2VideoTransformer3DModel.from_pretrained(
            location, subfolder="transformer", torch_dtype=self.dtype
        )
        self.vae = self._load_vae(location)
        self.audio_vae = diffusers.AutoencoderKLLTX2Audio.from_pretrained(location, subfolder="audio_vae")
        self.vocoder = _vocoder_class(location).from_pretrained(location, subfolder="vocoder")
        return diffusers_parts.scheduler_config(location, DEFAULT_SCHEDULER)

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        self.max_sequence_length = self._text_length(DEFAULT_TEXT_LENGTH)
        registers = configs.part("connectors").get("video_connector_num_learnable_registers") or 1
        if self.max_sequence_length % int(registers):
            raise LTX2InputError(
                f"model.model_kwargs.max_sequence_length: {self.max_sequence_length} tokens; LTX-2's text "
                f"connectors need a multiple of {registers} (use {DEFAULT_TEXT_LENGTH}, the pipeline's)"
            )
        vae = configs.part("vae")
        self.vae_scale_factor = int(vae.get("spatial_compression_ratio") or 32)
        self.vae_scale_factor_temporal = int(vae.get("temporal_compression_ratio") or 8)
        self.frame_rate = float(self.model_cfg.model_kwargs.get("frame_rate", DEFAULT_FRAME_RATE))

    def _vae_scale(self, configs: PartConfigs) -> int:
        return int(configs.part("vae").get("spatial_compression_ratio") or 32)

    def network_candidates(self, include_conv: bool) -> list[str]:
        return ltx2_lora_candidates(self.transformer)  # no conv layers in the transformer

    # --- encoding ------------------------------------------------------------------------
    def _pipeline(self, scheduler: Any | None = None) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        from aitk.models.ltx2.previews import preview_pipeline_class

        if scheduler is None:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        return preview_pipeline_class()(
            scheduler=scheduler, vae=self.vae, audio_vae=getattr(self, "audio_vae", None),
            text_encoder=getattr(self, "text_encoder", None), tokenizer=getattr(self, "tokenizer", None),
            connectors=self.connectors, transformer=self.transformer, vocoder=getattr(self, "vocoder", None),
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        embeds, mask, _, _ = self._text_pipeline().encode_prompt(
            prompt=list(prompts), do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            device=self.device, dtype=self.dtype,
        )
        return ltx_prompts.real_tokens(embeds, mask)

    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        pos, pos_mask = ltx_prompts.left_padded(positive, self.max_sequence_length, self.device, self.dtype)
        neg, neg_mask = ltx_prompts.left_padded(negative, self.max_sequence_length, self.device, self.dtype)
        return {"prompt_embeds": pos, "prompt_attention_mask": pos_mask,
                "negative_prompt_embeds": neg, "negative_prompt_attention_mask": neg_mask}

    def _latent_stats(self, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)
        mean = self.vae.latents_mean.view(shape).to(ref.device, torch.float32)
        std = self.vae.latents_std.view(shape).to(ref.device, torch.float32)
        return mean, std

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, F', H/32, W/32), F' = (F - 1) / 8 + 1, of pixels in [-1, 1]:
        (B, 3, H, W) (a still is one frame), (B, 3, F, H, W) or frames-first (B, F, 3, H, W); F must
        be 8k+1. The distribution's mode, normalised as LTX2ImageToVideoPipeline does its image."""
        if pixels.ndim == 4:
            pixels = pixels.unsqueeze(2)
        elif pixels.ndim == 5 and pixels.shape[1] != 3 and pixels.shape[2] == 3:
            pixels = pixels.transpose(1, 2)
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise LTX2InputError(f"pixels must be (B, 3, H, W) or (B, 3, F, H, W), got {tuple(pixels.shape)}")
        frames = pixels.shape[2]
        if (frames - 1) % self.vae_scale_factor_temporal:
            raise LTX2InputError(f"LTX-2 encodes 8k+1 frames (1, 9, 17, ...), got {frames}")
        latents = self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist.mode()
        mean, std = self._latent_stats(latents)
        return (latents - mean) * self.vae.config.scaling_factor / std

    def latent_space_id(self) -> str:
        cfg = self.vae.config
        source = self.model_cfg.vae_path or self._parts_source()
        return f"{self.latent_space_name}:{cfg.latent_channels}:{self.vae_scale_factor}:{source}"

    # --- training objective --------------------------------------------------------------
    def shift_kwargs(self, height: int, width: int) -> dict[str, float]:
        """mu for `height` x `width` latent tokens (frames folded into height by the caller)."""
        from diffusers.pipelines.ltx2.pipeline_ltx2 import calculate_shift

        config = self.scheduler_config
        mu = calculate_shift(
            height * width, config.get("base_image_seq_len", 1024), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.95), config.get("max_shift", 2.05),
        )
        return {"mu": float(mu)}

    def make_noisy_batch(self, latents: torch.Tensor, train_cfg: TrainConfig, generator: torch.Generator | None,
                         context: BatchContext | None = None) -> NoisyBatch:
        from aitk.models.flow_matching import noisy_and_target
        from aitk.models.flow_timestep_types import weighted_loss
        from aitk.models.noise import apply_noise_offset

        self.check_train_settings(train_cfg)
        if latents.ndim == 4:  # a still cached without its frame axis
            latents = latents.unsqueeze(2)
        latents = latents.to(self.device, torch.float32)
        b, _, frames, h, w = latents.shape
        # noise levels first: the same seed then draws the same levels at every clip size
        sigma = self.training_sigmas(b, frames * h, w, train_cfg, generator).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        noise = apply_noise_offset(noise, train_cfg.noise_offset, generator).to(latents.device)
        audio_noise = torch.randn(b, *self._audio_shape(frames), generator=generator, dtype=torch.float32)
        noisy, target = noisy_and_target(latents, noise, sigma)
        weights = weighted_loss(sigma) if (train_cfg.timestep_type or "").lower() == "weighted" else None
        extra: dict[str, Any] = {"audio": audio_noise.to(latents.device)}
        first = context.first_frames if context is not None else None
        if first is not None and frames > 1:
            condition = self.encode_images(first.to(self.device, torch.float32))
            if condition.shape[-2:] != (h, w):
                raise LTX2InputError(f"first frames {tuple(first.shape)} do not match latents {tuple(latents.shape)}")
            noisy[:, :, :1] = condition
            extra["first_frame_target"] = target[:, :, :1]
            # the loss is a mean over every frame, the first one giving 0: rescale to the others' mean
            kept = torch.full((b,), frames / (frames - 1), device=latents.device)
            weights = kept if weights is None else weights.to(latents.device) * kept
        return NoisyBatch(noisy.to(self.dtype), sigma * 1000.0, target, weights, extra)

    def _audio_shape(self, latent_frames: int) -> tuple[int, int]:
        """(tokens, channels) of the audio stream for a clip of `latent_frames` latent frames,
        as the pipeline sizes it for the clip's duration."""
        config = self.transformer.config
        frames = (latent_frames - 1) * self.vae_scale_factor_temporal + 1
        audio = self.part_configs.part("audio_vae")
        per_second = float(config.audio_sampling_rate) / float(config.audio_hop_length) / float(
            audio.get("temporal_compression_ratio", config.audio_scale_factor)
        )
        return max(1, round(frames / self.frame_rate * per_second)), int(config.audio_in_channels)

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        config = self.transformer.config
        h, w = size[1] // self.vae_scale_factor, size[0] // self.vae_scale_factor
        latent_frames = (max(frames, 1) - 1) // self.vae_scale_factor_temporal + 1
        latents = torch.randn(batch, config.in_channels, latent_frames, h, w)
        noisy = self._example_noisy(latents, {"audio": torch.randn(batch, *self._audio_shape(latent_frames))})
        # the prompts are every hidden state of the Gemma text encoder (embeddings and each layer's)
        # stacked; its config says how many, where the plan's sources carry no connectors config
        text = self.part_configs.part("text_encoder")
        text = text.get("text_config", text)
        connectors = self.part_configs.part("connectors")
        width = int(connectors.get("caption_channels", text.get("hidden_size", config.caption_channels)))
        layers = int(connectors.get("text_proj_in_factor", int(text.get("num_hidden_layers", 48)) + 1))
        return noisy, self._example_prompts(batch, width * layers, torch.bool)

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        x = batch.noisy_latents.to(self.dtype)
        b, _, frames, h, w = x.shape
        device = x.device
        t = batch.timesteps.to(device, torch.float32)
        with torch.no_grad():  # the frozen connectors: the text streams the pipeline builds
            hidden, mask = ltx_prompts.left_padded(cond, self.max_sequence_length, device, self.connectors.dtype)
            video_text, audio_text, text_mask = self.connectors(hidden, mask, padding_side="left")
        audio = batch.extra["audio"].to(device, self.dtype)
        video_t: torch.Tensor = t
        first_target = batch.extra.get("first_frame_target")
        if first_target is not None:  # I2V: the first latent frame is clean (timestep 0)
            conditioned = torch.zeros(b, frames * h * w, device=device)
            conditioned[:, : h * w] = 1.0
            video_t = t.unsqueeze(-1) * (1.0 - conditioned)
        transformer = self.transformer
        out = transformer(
            hidden_states=x.flatten(2).transpose(1, 2),  # 1x1x1 patches: (B, F*h*w, C) in the pipeline's order
            audio_hidden_states=audio,
            encoder_hidden_states=video_text.to(self.dtype),
            audio_encoder_hidden_states=audio_text.to(self.dtype),
            timestep=video_t,
            audio_timestep=t,
            sigma=t,
            encoder_attention_mask=text_mask,
            audio_encoder_attention_mask=text_mask,
            num_frames=frames,
            height=h,
            width=w,
            fps=self.frame_rate,
            audio_num_frames=audio.shape[1],
            use_cross_timestep=False,  # LTX-2.0's cross-modal modulation
            return_dict=False,
        )[0]
        video = out.transpose(1, 2).reshape(b, -1, frames, h, w)
        if first_target is not None:  # no loss and no gradient on the conditioned frame
            video = torch.cat([first_target.to(video.dtype), video[:, :, 1:]], dim=2)
        return video


def _vocoder_class(location: str) -> type:
    """The vocoder class the folder's model_index.json names (LTX-2: LTX2Vocoder)."""
    from diffusers import DiffusionPipeline
    from diffusers.pipelines.ltx2 import vocoder

    try:
        name = DiffusionPipeline.load_config(location).get("vocoder", [None, "LTX2Vocoder"])[1]
    except Exception:  # no readable index: the LTX-2 class
        name = "LTX2Vocoder"
    return getattr(vocoder, name, vocoder.LTX2Vocoder)
