"""HunyuanVideo 1.5 (T2V and I2V): a flow-matching video DiT with Qwen2.5-VL prompts and a ByT5
glyph encoder.

Parts (diffusers layout, e.g. hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v):
HunyuanVideo15Transformer3DModel (54 double blocks, patch 1), AutoencoderKLHunyuanVideo15 (32
latent channels, 16x spatial / 4x temporal: F frames -> (F - 1) / 4 + 1 latent frames, so clips
are 4k+1 frames and buckets multiples of 16 px), Qwen2_5_VLTextModel + Qwen2Tokenizer (text only:
no vision tower, no torchvision), T5EncoderModel + ByT5Tokenizer (glyphs: quoted text of the
prompt), and for I2V a SigLIP vision tower and its image processor.

Text: the pipeline's own encode_prompt (training and previews read prompts alike): Qwen2.5-VL's
third-to-last hidden states of the chat-templated prompt past the template, padded to
max_sequence_length (model.model_kwargs, default the pipeline's 1000) with a mask, and the byT5
states of the prompt's quoted text (zeros and an empty mask without quotes). PromptEmbeds:
hidden_states + extra "mask", "glyph", "glyph_mask".

Objective (rectified flow, aitk.models.flow_matching): x = (1 - sigma) * x0 + sigma * noise,
target = noise - x0, timestep = 1000 * sigma (the pipeline's scheduler timesteps); "shift" draws
with the model scheduler's flow shift. The transformer reads [noisy latents, condition latents,
condition mask] along channels, as the pipelines build them: T2V zeros; I2V the VAE latent of the
clip's first frame in the first latent frame (zeros after it) and a mask of ones there, plus the
SigLIP tokens of that frame (T2V: 729 zero tokens, which the model masks out).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from aitk.config.schema import TrainConfig
from aitk.models import common, diffusers_parts
from aitk.models.base import BatchContext, ModelLoadError, NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.flow_adapter import FlowTransformerAdapter
from aitk.models.hunyuan_video_1_5 import keys
from aitk.models.hunyuan_video_1_5.previews import decode_video, preview_pipeline_class, to_pil

#: the 480p models' scheduler config: the schedule when a model is bound without one (the plan)
DEFAULT_SCHEDULER = {"num_train_timesteps": 1000, "shift": 5.0}
DEFAULT_TEXT_LENGTH = 1000  # HunyuanVideo15Pipeline.tokenizer_max_length
GLYPH_LENGTH = 256  # tokenizer_2_max_length
#: image tokens the T2V pipeline gives (zeros: SigLIP's 27 x 27 patches)
T2V_IMAGE_TOKENS = 729


class HunyuanVideo15InputError(ValueError):
    """A batch or setting this HunyuanVideo 1.5 model cannot train on."""


class HunyuanVideo15Adapter(FlowTransformerAdapter):
    arch_names = ("hunyuan_video_1_5",)
    text_encoder_names = ("text_encoder", "text_encoder_2")
    bucket_divisibility = 16  # 16x VAE, patch 1
    frame_rule = "4k+1"
    #: the real VAE's latent channels (the loaded VAE's config decides)
    latent_channels = 32
    lora_prefix = keys.PREFIX  # ComfyUI's: diffusion_model.<its weight path>
    lora_fused_weights = keys.FUSED_QKV  # one LoRA on each fused qkv in comfyui-layout files
    base_model_version = "hunyuan_video_1.5"
    modelspec_architecture = "hunyuan-video-1.5-t2v/lora"
    modelspec_implementation = "https://github.com/Tencent-Hunyuan/HunyuanVideo-1.5"
    model_label = "HunyuanVideo 1.5"
    pipeline_name = "HunyuanVideo15Pipeline"
    folder_parts = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
    folder_example = "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v"
    vae_class_name = "AutoencoderKLHunyuanVideo15"
    default_scheduler = DEFAULT_SCHEDULER
    input_error = HunyuanVideo15InputError
    latent_patch = 1
    text_length_tag = "qwen2.5-vl"
    latent_space_name = "hunyuan-video-1.5-vae"
    bypass_guidance_note = "HunyuanVideo 1.5 has no guidance embedding; remove the key"
    card_pipeline_tag = "text-to-video"
    card_tags = ("hunyuan-video", "hunyuan-video-1.5")
    card_license = {
        "license": "other",
        "license_name": "tencent-hunyuan-community",
        "license_link": "https://huggingface.co/tencent/HunyuanVideo-1.5/blob/main/LICENSE",
    }
    #: image-to-video: the first frame's latent and SigLIP tokens condition the transformer
    i2v = False

    text_encoder_2: Any
    tokenizer_2: Any
    image_encoder: Any = None
    feature_extractor: Any = None

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        return keys.is_hunyuan_video_15_lora(tensors)

    # --- loading -------------------------------------------------------------------------
    def _load_parts(self, location: str) -> dict[str, Any]:
        from diffusers import HunyuanVideo15Transformer3DModel
        from transformers import AutoTokenizer, Qwen2_5_VLTextModel, T5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(location, subfolder="tokenizer")
        self.text_encoder = Qwen2_5_VLTextModel.from_pretrained(location, subfolder="text_encoder",
                                                                torch_dtype=self.dtype)
        self.tokenizer_2 = AutoTokenizer.from_pretrained(location, subfolder="tokenizer_2")
        self.text_encoder_2 = T5EncoderModel.from_pretrained(location, subfolder="text_encoder_2",
                                                             torch_dtype=self.dtype)
        self.vae = self._load_vae(location)
        self.transformer = HunyuanVideo15Transformer3DModel.from_pretrained(
            location, subfolder="transformer", torch_dtype=self.dtype)
        self._check_task(self.transformer.config)
        if self.i2v:
            from transformers import AutoImageProcessor, SiglipVisionModel

            self.image_encoder = SiglipVisionModel.from_pretrained(location, subfolder="image_encoder",
                                                                   torch_dtype=self.dtype)
            self.feature_extractor = AutoImageProcessor.from_pretrained(location, subfolder="feature_extractor")
        return diffusers_parts.scheduler_config(location, DEFAULT_SCHEDULER)

    def _check_task(self, config: Mapping[str, Any]) -> None:
        """Refuse a transformer trained for the other task before anything trains on it."""
        task = config.get("task_type")
        wanted = "i2v" if self.i2v else "t2v"
        if task in ("t2v", "i2v") and task != wanted:
            other = "hunyuan_video_1_5_i2v" if task == "i2v" else "hunyuan_video_1_5"
            raise ModelLoadError(
                f"model.arch {self.arch_names[0]!r} trains the {wanted.upper()} model, but "
                f"{self.model_cfg.name_or_path!r} holds a {task.upper()} transformer (task_type {task!r}); "
                f"set model.arch: {other}"
            )

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        super().bind(parts, configs)
        self.max_sequence_length = self._text_length(DEFAULT_TEXT_LENGTH)
        vae = configs.part("vae")
        self.vae_scale_factor_temporal = int(vae.get("temporal_compression_ratio", 4))

    def _vae_scale(self, configs: PartConfigs) -> int:
        return int(configs.part("vae").get("spatial_compression_ratio", 16))

    def offload_blocks(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        if module is getattr(self, "transformer", None):
            return list(module.transformer_blocks)  # the repeated ones (the embedders run once)
        return super().offload_blocks(module)

    def network_candidates(self, include_conv: bool) -> list[str]:
        return keys.lora_candidates(self.transformer)  # no conv layers in the blocks for LoCon

    def lora_key_stem(self, module_name: str) -> str:
        return keys.lora_key_stem(module_name)

    def lora_module_for_stem(self, stem: str) -> str | None:
        """The module of a key stem (aitk's tools read files back through it)."""
        return keys.module_for_stem(stem)

    # --- encoding ------------------------------------------------------------------------
    def _pipeline_class(self) -> type:
        return preview_pipeline_class(self.i2v)

    def _pipeline(self, scheduler: Any | None = None) -> Any:
        from diffusers import ClassifierFreeGuidance

        parts: dict[str, Any] = dict(
            transformer=self.transformer, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
            scheduler=scheduler if scheduler is not None else self._scheduler(),
            guider=ClassifierFreeGuidance(guidance_scale=1.0),
        )
        if self.i2v:
            parts.update(image_encoder=self.image_encoder, feature_extractor=self.feature_extractor)
        pipe = self._pipeline_class()(**parts)
        pipe.tokenizer_max_length = self.max_sequence_length  # model_kwargs.max_sequence_length
        return pipe

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        embeds, mask, glyph, glyph_mask = self._text_pipeline().encode_prompt(
            prompt=list(prompts), device=self.device, dtype=self.dtype, batch_size=len(prompts))
        return PromptEmbeds(embeds, {"mask": mask, "glyph": glyph, "glyph_mask": glyph_mask})

    def preview_prompt_kwargs(self, positive: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Any]:
        pos, neg = positive.to(self.device, self.dtype), negative.to(self.device, self.dtype)
        return {
            "prompt_embeds": pos.hidden_states, "prompt_embeds_mask": pos.extra["mask"],
            "prompt_embeds_2": pos.extra["glyph"], "prompt_embeds_mask_2": pos.extra["glyph_mask"],
            "negative_prompt_embeds": neg.hidden_states, "negative_prompt_embeds_mask": neg.extra["mask"],
            "negative_prompt_embeds_2": neg.extra["glyph"], "negative_prompt_embeds_mask_2": neg.extra["glyph_mask"],
        }

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, F', H/16, W/16), F' = (F - 1) / 4 + 1, scaled as the pipelines scale them.

        pixels in [-1, 1]: (B, 3, H, W) (a still = one frame), (B, 3, F, H, W), or frames-first
        (B, F, 3, H, W); F must be 4k+1. The distribution's mode, one sample at a time (diffusers
        0.42's VAE attention fails on batches above 1)."""
        if pixels.ndim == 4:
            pixels = pixels.unsqueeze(2)
        elif pixels.ndim == 5 and pixels.shape[1] != 3 and pixels.shape[2] == 3:
            pixels = pixels.transpose(1, 2)
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise self.input_error(f"pixels must be (B, 3, H, W) or (B, 3, F, H, W), got {tuple(pixels.shape)}")
        if (pixels.shape[2] - 1) % self.vae_scale_factor_temporal:
            raise self.input_error(f"HunyuanVideo 1.5 encodes 4k+1 frames (1, 5, 9, ...), got {pixels.shape[2]}")
        latents = torch.cat([common.encode_mode(self.vae, one, self.device) for one in pixels.split(1)])
        return latents * self.vae.config.scaling_factor

    def latent_space_id(self) -> str:
        cfg = self.vae.config
        source = self.model_cfg.vae_path or self._parts_source()
        return f"{self.latent_space_name}:{cfg.latent_channels}:{cfg.scaling_factor}:{source}"

    # --- image-to-video conditioning -----------------------------------------------------
    @torch.no_grad()
    def condition(self, latents: torch.Tensor, first_frames: torch.Tensor | None) -> torch.Tensor:
        """The channels the transformer reads after the noisy latents: (B, C + 1, F', h, w) =
        [condition latents, mask], as the pipelines' prepare_cond_latents_and_mask build them.

        T2V: zeros. I2V: the VAE latent of each clip's first frame (first_frames (B, 3, H, W) in
        [-1, 1], BatchContext.first_frames) in latent frame 0, zeros after it, mask 1 on frame 0.
        Without first frames, a one-frame clip (an image) is its own first frame; a longer clip
        raises (the trainer's data gives first frames for every video of an I2V arch)."""
        b, c, frames, h, w = latents.shape
        cond = latents.new_zeros(b, c, frames, h, w, dtype=torch.float32)
        mask = latents.new_zeros(b, 1, frames, h, w, dtype=torch.float32)
        if not self.i2v:
            return torch.cat([cond, mask], dim=1)
        if first_frames is None:
            if frames != 1:
                raise self.input_error(
                    f"{self.arch_names[0]} trains image-to-video: clips of {frames} latent frames need their "
                    "first frames (BatchContext.first_frames), which the trainer's data gives for every video "
                    "dataset of an I2V arch"
                )
            first = latents[:, :, :1].float()
        else:
            first = self.encode_images(first_frames.to(self.device, torch.float32))
            if first.shape[-2:] != (h, w):
                raise self.input_error(
                    f"first frames {tuple(first_frames.shape)} do not match latents {tuple(latents.shape)}")
        cond[:, :, :1] = first.to(cond.device)
        mask[:, :, 0] = 1.0
        return torch.cat([cond, mask], dim=1)

    @torch.no_grad()
    def image_embeds(self, first_frames: torch.Tensor) -> torch.Tensor:
        """SigLIP's last hidden states of the frames (B, 3, H, W) in [-1, 1], through the model's
        image processor as the I2V pipeline's encode_image reads its (already resized) image."""
        inputs = self.feature_extractor.preprocess(images=to_pil(first_frames), do_resize=True,
                                                   return_tensors="pt", do_convert_rgb=True)
        pixel_values = inputs["pixel_values"].to(self.device, next(self.image_encoder.parameters()).dtype)
        return self.image_encoder(pixel_values=pixel_values).last_hidden_state

    def _no_image_embeds(self, batch: int) -> torch.Tensor:
        dim = int(self.transformer.config.image_embed_dim)
        return torch.zeros(batch, T2V_IMAGE_TOKENS, dim, dtype=self.dtype, device=self.device)

    # --- training objective --------------------------------------------------------------
    def shift_kwargs(self, height: int, width: int) -> dict[str, float]:
        return {"shift": float(self.scheduler_config.get("shift", DEFAULT_SCHEDULER["shift"]))}

    def make_noisy_batch(self, latents: torch.Tensor, train_cfg: TrainConfig, generator: torch.Generator | None,
                         context: BatchContext | None = None) -> NoisyBatch:
        from aitk.models.flow_matching import noisy_and_target
        from aitk.models.flow_timestep_types import weighted_loss
        from aitk.models.noise import apply_noise_offset

        self.check_train_settings(train_cfg)
        if latents.ndim == 4:  # image latents cached without a frame axis
            latents = latents.unsqueeze(2)
        latents = latents.to(self.device, torch.float32)
        b, _, _, h, w = latents.shape
        # noise levels first: the same seed then draws the same levels at every clip size
        sigma = self.training_sigmas(b, h, w, train_cfg, generator).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        noise = apply_noise_offset(noise, train_cfg.noise_offset, generator).to(latents.device)
        noisy, target = noisy_and_target(latents, noise, sigma)
        first = context.first_frames if context is not None else None
        extra: dict[str, Any] = {"condition": self.condition(latents, first).to(self.dtype)}
        if self.i2v:
            if first is None:  # a still is its own first frame; its pixels come back from the latents
                first = self._decode_pixels(latents[:, :, :1])[:, :, 0]
            extra["image_embeds"] = self.image_embeds(first).to(self.dtype)
        weights = weighted_loss(sigma) if (train_cfg.timestep_type or "").lower() == "weighted" else None
        return NoisyBatch(noisy.to(self.dtype), sigma * 1000.0, target, weights, extra)

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        config = self.transformer.config
        h, w = size[1] // self.vae_scale_factor, size[0] // self.vae_scale_factor
        latent_frames = (max(frames, 1) - 1) // self.vae_scale_factor_temporal + 1
        channels = int(config.out_channels)
        latents = torch.randn(batch, channels, latent_frames, h, w)
        extra: dict[str, Any] = {
            "condition": torch.randn(batch, config.in_channels - channels, latent_frames, h, w, dtype=self.dtype)}
        if self.i2v:  # SigLIP tokens: one per patch
            vision = self.part_configs.part("image_encoder")
            tokens = (vision.get("image_size", 384) // vision.get("patch_size", 14)) ** 2
            extra["image_embeds"] = torch.randn(batch, tokens, config.image_embed_dim, dtype=self.dtype)
        noisy = self._example_noisy(latents, extra)
        length = self.max_sequence_length
        cond = PromptEmbeds(torch.randn(batch, length, config.text_embed_dim, dtype=self.dtype), {
            "mask": torch.ones(batch, length, dtype=self.dtype),
            "glyph": torch.randn(batch, GLYPH_LENGTH, config.text_embed_2_dim, dtype=self.dtype),
            "glyph_mask": torch.ones(batch, GLYPH_LENGTH, dtype=self.dtype),
        })
        return noisy, cond

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        x = batch.noisy_latents.to(self.dtype)
        hidden = torch.cat([x, batch.extra["condition"].to(x.device, self.dtype)], dim=1)
        image_embeds = batch.extra.get("image_embeds")
        if image_embeds is None:
            image_embeds = self._no_image_embeds(x.shape[0]).to(x.device)
        return self.transformer(
            hidden_states=hidden,
            timestep=batch.timesteps.to(x.device, self.dtype),  # the pipeline's: in the latents' dtype
            encoder_hidden_states=cond.hidden_states.to(x.device, self.dtype),
            encoder_attention_mask=cond.extra["mask"].to(x.device, self.dtype),
            encoder_hidden_states_2=cond.extra["glyph"].to(x.device, self.dtype),
            encoder_attention_mask_2=cond.extra["glyph_mask"].to(x.device, self.dtype),
            image_embeds=image_embeds.to(self.dtype),
            return_dict=False,
        )[0]

    # --- previews ------------------------------------------------------------------------
    def preview_kwargs(self, request: Any) -> dict[str, Any]:
        from aitk.data.video import snap_frame_count

        kwargs: dict[str, Any] = {"num_frames": max(1, snap_frame_count(int(request.num_frames or 1), self.frame_rule))}
        if self.i2v:
            kwargs["image"] = _start_image(request, self.arch_names[0])
        return kwargs

    @torch.no_grad()
    def _decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim == 4:
            latents = latents.unsqueeze(2)
        return decode_video(self.vae, latents.to(self.device))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Any]:
        """Per sample, the video's frames as PIL images (the VAE decodes in fp32)."""
        from diffusers.video_processor import VideoProcessor

        video = self._decode_pixels(latents)
        processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor)
        return processor.postprocess_video(video, output_type="pil")


def _start_image(request: Any, arch: str) -> Any:
    """The I2V preview's start image (sample ctrl_img), or ValueError naming the key to set."""
    from pathlib import Path

    from PIL import Image

    if not request.ctrl_img:
        raise ValueError(
            f"{arch} previews start from an image: set sample.ctrl_img, ctrl_img of the sample entry or "
            "--ctrl_img <image> in the prompt to the first frame's image file"
        )
    path = Path(request.ctrl_img).expanduser()
    if not path.is_file():
        raise ValueError(f"sample.ctrl_img of preview {request.prompt!r}: {request.ctrl_img!r} is not an image file")
    with Image.open(path) as image:
        return image.convert("RGB")


class HunyuanVideo15I2VAdapter(HunyuanVideo15Adapter):
    arch_names = ("hunyuan_video_1_5_i2v",)
    modelspec_architecture = "hunyuan-video-1.5-i2v/lora"
    pipeline_name = "HunyuanVideo15ImageToVideoPipeline"
    folder_parts = (*HunyuanVideo15Adapter.folder_parts, "image_encoder", "feature_extractor")
    folder_example = "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_i2v"
    card_pipeline_tag = "image-to-video"
    lora_keys_shared_with = "hunyuan_video_1_5"  # the same transformer layout, the same LoRA keys
    i2v = True
    auxiliary_names = ("vae", "image_encoder")
    processor_names = ("feature_extractor",)
    step_auxiliary_names = ("vae", "image_encoder")  # first frames: condition latent, SigLIP tokens

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        return False  # the T2V keys: `aitk lora info` guesses that family and names this one too
