"""WAN 2.2 TI2V 5B (`wan22_5b`): text-to-video and image-to-video in one flow-matching transformer.

Parts (diffusers layout, Wan-AI/Wan2.2-TI2V-5B-Diffusers): umT5 text encoder + tokenizer, the
high-compression AutoencoderKLWan (48 latent channels; 2x2 patchify then 8x: 16x spatial, 4x
temporal: F frames -> (F - 1) / 4 + 1 latent frames), one WanTransformer3DModel with 48 input and
output channels and 1x2x2 patches, and a WanPipeline with `expand_timesteps` (a timestep per token).
Buckets are multiples of 32 px (16x VAE x 2x2 patches); clips have 4k+1 frames.

Image-to-video, as the model was trained and as diffusers' WanImageToVideoPipeline runs it with
expand_timesteps: the first frame's VAE latent replaces the first latent frame of the noisy clip,
whose tokens get timestep 0 while the others get the step's timestep. Training does the same on
clips of datasets with do_i2v (BatchContext.first_frames): the conditioned frame is kept out of the
loss (its prediction is the target) and the rest is reweighted to a mean over the trained frames,
as ai-toolkit does. Without first frames (T2V datasets, stills) it trains text-to-video.

Previews: text-to-video, or image-to-video from sample.ctrl_img when a preview names one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aitk.config.schema import TrainConfig
from aitk.models.base import BatchContext, ModelLoadError, NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.wan.adapter import Wan21Adapter
from aitk.models.wan.previews import MAIN, _i2v_preview_pipeline_class

#: the 5B's training / preview flow shift (its scheduler's flow_shift; ai-toolkit trains with 5 too)
TI2V_FLOW_SHIFT = 5.0
LATENT_CHANNELS = 48
#: per-channel statistics of the 48-channel WAN 2.2 VAE (its config's latents_mean / latents_std)
TI2V_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
TI2V_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
#: NoisyBatch.extra key of the first-frame mask (B, 1, F', h, w): 0 on the conditioned frame
FIRST_FRAME_MASK = "first_frame_mask"


class TI2VPreviewPipeline:
    """WanPipeline for text-to-video previews and WanImageToVideoPipeline (expand_timesteps) for
    previews with a first frame (`image=`), over the same modules: one object for the trainer."""

    def __init__(self, parts: dict[str, Any]) -> None:
        from diffusers import WanPipeline

        self.text_to_video = WanPipeline(**parts, expand_timesteps=True)
        self.image_to_video = _i2v_preview_pipeline_class()(**parts, expand_timesteps=True)

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self.text_to_video.set_progress_bar_config(**kwargs)
        self.image_to_video.set_progress_bar_config(**kwargs)

    def __call__(self, *args: Any, image: Any = None, **kwargs: Any) -> Any:
        if image is None:
            return self.text_to_video(*args, **kwargs)
        return self.image_to_video(*args, image=image, **kwargs)

    def __getattr__(self, name: str) -> Any:  # transformer, scheduler, config ... of the pipelines
        return getattr(self.text_to_video, name)


class Wan22TI2VAdapter(Wan21Adapter):
    arch_names = ("wan22_5b",)
    bucket_divisibility = 32  # 16x VAE x 2x2 patches
    frame_rule = "4k+1"
    base_model_version = "wan_2.2_5b"
    modelspec_architecture = "wan-2.2-ti2v-5b/lora"
    card_pipeline_tag = "text-to-video"
    denoiser_names = ("transformer",)
    #: a preview's ctrl_img is its first frame; in training, first frames come from the clips (do_i2v)
    optional_first_frame = True
    step_auxiliary_names = ("vae",)  # encodes the first frames (do_i2v)
    latent_channels = LATENT_CHANNELS

    # --- loading -------------------------------------------------------------------------
    def _check_transformer(self, index: Mapping[str, Any]) -> None:
        config = self.transformer.config
        z_dim = self.vae.config.z_dim
        if (config.in_channels, config.out_channels, z_dim) != (LATENT_CHANNELS,) * 3:
            hint = ""
            if config.in_channels in (16, 36):
                hint = " (it looks like a WAN 2.1 / 2.2 14B model: model.arch wan21, wan21_i2v, wan22_14b or wan22_14b_i2v)"
            raise ModelLoadError(
                f"model.arch 'wan22_5b' needs WAN 2.2 TI2V 5B's 48-channel transformer and VAE, but "
                f"{self.model_cfg.name_or_path!r} has a transformer of {config.in_channels} input channels and a "
                f"VAE of {z_dim}{hint}"
            )

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        import diffusers

        super().bind(parts, configs)
        if not configs.scheduler:  # the 5B's own scheduler: UniPC over flow sigmas, shift 5
            self.scheduler = diffusers.UniPCMultistepScheduler(
                prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=TI2V_FLOW_SHIFT
            )
        self.vae_scale_factor = int(configs.part("vae").get("scale_factor_spatial", 16))
        self.patch_size = tuple(configs.part("transformer").get("patch_size", (1, 2, 2)))

    # --- image-to-video conditioning -----------------------------------------------------
    @torch.no_grad()
    def first_frame_latents(self, first_frames: torch.Tensor) -> torch.Tensor:
        """(B, 48, 1, h, w): the normalised latent of each first frame (B, 3, H, W) in [-1, 1],
        encoded alone, as WanImageToVideoPipeline.prepare_latents does with expand_timesteps."""
        return self.encode_images(first_frames.to(self.device, torch.float32))

    def first_frame_mask(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 1, F', h, w): 0 on the first latent frame (conditioned, clean), 1 elsewhere."""
        b, _, frames, h, w = latents.shape
        mask = torch.ones(b, 1, frames, h, w, device=latents.device, dtype=torch.float32)
        mask[:, :, 0] = 0.0
        return mask

    def token_timesteps(self, timesteps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, tokens): each patch token's timestep, 0 on the conditioned frame, as the pipelines'
        expand_timesteps (the mask read at every patch's first latent pixel)."""
        pt, ph, pw = self.patch_size
        per_token = mask[:, 0, ::pt, ::ph, ::pw].flatten(1)
        return per_token * timesteps.to(per_token.device, per_token.dtype).view(-1, 1)

    # --- training objective --------------------------------------------------------------
    def make_noisy_batch(
        self,
        latents: torch.Tensor,
        train_cfg: TrainConfig,
        generator: torch.Generator | None,
        context: BatchContext | None = None,
    ) -> NoisyBatch:
        """The flow-matching batch of WAN; clips with first frames (do_i2v) get the first frame's
        latent in place of their first noisy latent frame, and NoisyBatch.extra[FIRST_FRAME_MASK]
        (what `predict` reads for the per-token timesteps and keeps out of the loss)."""
        batch = super().make_noisy_batch(latents, train_cfg, generator, context)
        first = context.first_frames if context is not None else None
        noisy = batch.noisy_latents
        if first is None or noisy.shape[2] < 2:  # stills (one latent frame) train text-to-image
            return batch
        condition = self.first_frame_latents(first)
        if condition.shape[0] != noisy.shape[0] or condition.shape[-2:] != noisy.shape[-2:]:
            raise ValueError(
                f"first frames {tuple(first.shape)} do not match the clips' latents {tuple(noisy.shape)}"
            )
        noisy = noisy.clone()
        noisy[:, :, :1] = condition.to(noisy.dtype)
        mask = self.first_frame_mask(noisy)
        # the conditioned frame adds nothing to the loss; the other frames' mean is the loss,
        # as ai-toolkit's masked mean (loss * mask / mask.mean())
        kept = noisy.shape[2] / (noisy.shape[2] - 1)
        weights = torch.full((noisy.shape[0],), kept, device=noisy.device)
        if batch.loss_weights is not None:
            weights = weights * batch.loss_weights.to(weights.device)
        extra = {**batch.extra, FIRST_FRAME_MASK: mask}
        return NoisyBatch(noisy, batch.timesteps, batch.target, weights, extra)

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        """The trainer's shapes; clips are planned as image-to-video (per-token timesteps, the
        larger case; ai-toolkit's default do_i2v)."""
        noisy, cond = super().example_batch(batch, size, frames, expert=expert, with_controls=False)
        if noisy.noisy_latents.shape[2] > 1:
            noisy.extra[FIRST_FRAME_MASK] = self.first_frame_mask(noisy.noisy_latents)
            noisy.loss_weights = torch.ones(batch)
        return noisy, cond

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        """The transformer's velocity; with a first-frame mask the timesteps are per token and the
        conditioned frame's prediction is the target (no loss, no gradient there)."""
        mask = batch.extra.get(FIRST_FRAME_MASK)
        timestep = batch.timesteps if mask is None else self.token_timesteps(batch.timesteps, mask)
        out = self.transformer(
            hidden_states=batch.noisy_latents.to(self.dtype),
            timestep=timestep,
            encoder_hidden_states=cond.hidden_states.to(self.dtype),
            return_dict=False,
        )[0]
        if mask is None:
            return out
        target = batch.target.to(out.device, torch.float32)
        return torch.where(mask.to(out.device).bool(), out.float(), target)

    # --- previews ------------------------------------------------------------------------
    def sample_pipeline(self, sampler: str | None = None) -> Any:
        parts = dict(
            tokenizer=self.tokenizer,
            text_encoder=self.text_encoder,
            vae=self.vae,
            scheduler=self.preview_scheduler(sampler),
            transformer=self.experts()[MAIN],
        )
        return TI2VPreviewPipeline(parts)

    def preview_kwargs(self, request: Any) -> dict[str, Any]:
        """Frames and text length; with sample.ctrl_img (or --ctrl_img) the first frame's image."""
        kwargs = super().preview_kwargs(request)
        if request.ctrl_img:
            from PIL import Image

            path = Path(request.ctrl_img).expanduser()
            if not path.is_file():
                raise ValueError(
                    f"sample.ctrl_img of preview {request.prompt!r}: {request.ctrl_img!r} is not an image file"
                )
            with Image.open(path) as image:
                kwargs["image"] = image.convert("RGB")
        return kwargs
