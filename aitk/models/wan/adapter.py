"""WAN 2.1 (T2V, I2V) and WAN 2.2 14B (T2V, I2V; two experts): flow-matching video transformers.

Parts (diffusers layout): umT5 text encoder + tokenizer, AutoencoderKLWan (16 latent channels,
8x spatial / 4x temporal compression: F frames -> (F - 1) / 4 + 1 latent frames), one
WanTransformer3DModel (2.1) or two (2.2: `transformer` = high-noise expert, `transformer_2` =
low-noise expert, switched at `boundary_ratio` * 1000), and for 2.1 I2V a CLIP vision encoder.

Objective (rectified flow, as WAN was trained; aitk.models.flow_matching's, shared with FLUX):
noisy = (1 - sigma) * latents + sigma * noise, target = noise - latents, timestep = sigma * 1000.
The draws (aitk.models.wan.flow) have FLUX's shapes but can be confined exactly to one expert's
range; WAN's default timestep_type is "shift" with the model's flow shift.

model.model_kwargs:
    boundary_ratio (2.2: 0.875 T2V / 0.9 I2V, else the pipeline's model_index.json),
    train_high_noise / train_low_noise (2.2; default both true),
    flow_shift (training sigma shift; default: the model scheduler's flow_shift, else 3.0),
    max_sequence_length (umT5 tokens, WAN's 512 by default).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aitk.config.schema import ModelConfig, TrainConfig
from aitk.models import common
from aitk.models.base import BatchContext, ModelAdapter, ModelLoadError, NoisyBatch, PartConfigs, PromptEmbeds
from aitk.models.flow_matching import SIGMA_MIN, FlowMatchingConfigError, noisy_and_target
from aitk.models.flow_timestep_types import weighted_loss
from aitk.models.wan.flow import DEFAULT_FLOW_SHIFT, NUM_TRAIN_TIMESTEPS, FlowTimesteps
from aitk.models.wan.keys import is_block_target, lora_file_kind, lora_key_stem
from aitk.models.wan.previews import HIGH_NOISE, LOW_NOISE, MAIN, WanPreviews, to_pil

DEFAULT_TEXT_LENGTH = 512  # WAN's umT5 context length (WanPipeline's max_sequence_length)
DEFAULT_SCHEDULER_CLASS = "UniPCMultistepScheduler"


def exact_cpu_patch_embedding(conv: torch.nn.Conv3d) -> None:
    """Runs the patch embedding without oneDNN for bf16 / fp16 inputs on the CPU: there, oneDNN's
    Conv3d (torch 2.13) returns wrong numbers, sometimes NaN, when the latent is one patch wide
    (e.g. a 2-column latent under 2x2 patches). GPUs and fp32 are not affected."""

    def before(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            module.__dict__["_mkldnn_was_enabled"] = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = False

    def after(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        was = module.__dict__.pop("_mkldnn_was_enabled", None)
        if was is not None:
            torch.backends.mkldnn.enabled = was

    conv.register_forward_pre_hook(before)
    conv.register_forward_hook(after)


class Wan21Adapter(WanPreviews, ModelAdapter):
    arch_names = ("wan21",)
    text_encoder_names = ("text_encoder",)
    bucket_divisibility = 16  # 8x VAE x 2x2 patches
    lora_prefix = "diffusion_model."
    diffusers_lora_prefix = "transformer"
    frame_rule = "4k+1"
    base_model_version = "wan_2.1"
    modelspec_architecture = "wan-2.1-t2v/lora"
    denoiser_names = ("transformer", "transformer_2")
    keeps_fp32_modules = True  # loaded with torch_dtype: diffusers keeps WAN's norms / time embedding fp32
    card_pipeline_tag = "text-to-video"
    card_tags = ("wan",)
    card_license = {"license": "apache-2.0"}

    #: the transformer takes first-frame conditioning channels (I2V)
    i2v: bool = False
    #: a CLIP vision encoder feeds the image attention (2.1 I2V only)
    uses_image_encoder: bool = False
    #: two experts (2.2 14B) and the default boundary between them
    two_experts: bool = False
    default_boundary_ratio: float | None = None

    transformer: Any
    transformer_2: Any = None
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    image_encoder: Any = None
    image_processor: Any = None

    @classmethod
    def matches_lora_keys(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        # 2.1 I2V's files name its image attention; the other WAN models' files share one naming
        kind = lora_file_kind(tensors)
        return kind is not None and (kind == "image_attention") == cls.uses_image_encoder

    def __init__(self, model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(model_cfg, device, dtype)
        kwargs = model_cfg.model_kwargs
        self.max_sequence_length = int(kwargs.get("max_sequence_length", DEFAULT_TEXT_LENGTH))
        self._flow_shift_kwarg = kwargs.get("flow_shift")
        self.boundary_ratio: float | None = None
        if self.two_experts:
            ratio = kwargs.get("boundary_ratio")
            if ratio is not None and not (isinstance(ratio, (int, float)) and 0.0 < float(ratio) < 1.0):
                raise ValueError(f"model.model_kwargs.boundary_ratio: {ratio!r} must be a number between 0 and 1")
            self.boundary_ratio = float(ratio) if ratio is not None else None
        flags = {name: kwargs.get(f"train_{name}", True) for name in (HIGH_NOISE, LOW_NOISE)}
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise ValueError(f"model.model_kwargs.train_{name}: {value!r} must be true or false")
        if self.two_experts and not any(flags.values()):
            raise ValueError(
                "model.model_kwargs: train_high_noise and train_low_noise are both false; train at least one expert"
            )
        self._train_flags = flags

    # --- loading -------------------------------------------------------------------------
    def _location(self) -> str:
        source = self.model_cfg.name_or_path
        path = Path(source).expanduser()
        if path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".gguf"):
            raise ModelLoadError(
                f"model.name_or_path: {source!r} is a single file; WAN loads from a diffusers folder or "
                "hub id (e.g. Wan-AI/Wan2.1-T2V-14B-Diffusers) with transformer/, vae/, text_encoder/, "
                "tokenizer/ and scheduler/"
            )
        if not path.exists() and not common.could_be_hub_id(source):
            raise ModelLoadError(
                f"model.name_or_path: {source!r} is neither an existing folder nor a hub id (owner/name)"
            )
        return str(path) if path.exists() else source

    def load(self) -> None:
        import diffusers
        from diffusers import DiffusionPipeline, WanTransformer3DModel
        from transformers import AutoTokenizer, UMT5EncoderModel

        location = self._location()
        try:
            index = DiffusionPipeline.load_config(location)
        except Exception as exc:
            raise ModelLoadError(
                f"model.name_or_path: {self.model_cfg.name_or_path!r} has no readable model_index.json: "
                f"{exc} (give a diffusers WAN folder or hub id{common.offline_note()})"
            ) from exc
        self._check_components(index)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(location, subfolder="tokenizer")
            # torch_dtype at load: a 14B transformer never exists in fp32; the modules diffusers
            # keeps in fp32 (norms, time embedding) stay so
            self.text_encoder = UMT5EncoderModel.from_pretrained(
                location, subfolder="text_encoder", torch_dtype=self.dtype
            )
            self.vae = self._load_vae(location)
            self.transformer = WanTransformer3DModel.from_pretrained(
                location, subfolder="transformer", torch_dtype=self.dtype
            )
            if self.two_experts:
                self.transformer_2 = WanTransformer3DModel.from_pretrained(
                    location, subfolder="transformer_2", torch_dtype=self.dtype
                )
            # the scheduler class the pipeline names (UniPC over flow sigmas in WAN's own folders)
            scheduler_class = index.get("scheduler", [None, DEFAULT_SCHEDULER_CLASS])[1]
            scheduler_config = {
                **getattr(diffusers, scheduler_class).load_config(location, subfolder="scheduler"),
                "_class_name": scheduler_class,
            }
            if self.uses_image_encoder:
                from transformers import AutoImageProcessor, CLIPVisionModel

                self.image_encoder = CLIPVisionModel.from_pretrained(
                    location, subfolder="image_encoder", torch_dtype=self.dtype
                )
                self.image_processor = AutoImageProcessor.from_pretrained(location, subfolder="image_processor")
        except Exception as exc:  # missing files, hub look-ups, foreign configs raise many types
            raise ModelLoadError(
                f"model.name_or_path: could not load a {self.modelspec_architecture.split('/')[0]} model "
                f"from {self.model_cfg.name_or_path!r}: {exc} (give a diffusers WAN folder or hub id"
                f"{common.offline_note()})"
            ) from exc
        self._check_transformer(index)
        for expert in self.experts().values():
            exact_cpu_patch_embedding(expert.patch_embedding)
        common.freeze(self._modules())  # dtypes were set at load (the VAE stays fp32); placed by the trainer
        ratio = index.get("boundary_ratio")
        self.bind_loaded(scheduler_config, float(ratio) if ratio else None)

    def bind(self, parts: Any, configs: PartConfigs) -> None:
        import diffusers

        super().bind(parts, configs)
        if configs.scheduler:
            scheduler_cls = getattr(diffusers, configs.scheduler.get("_class_name") or DEFAULT_SCHEDULER_CLASS)
            self.scheduler = scheduler_cls.from_config(dict(configs.scheduler))
        else:  # WAN's own: UniPC over flow sigmas with the default shift
            self.scheduler = diffusers.UniPCMultistepScheduler(
                prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=DEFAULT_FLOW_SHIFT
            )
        if self.two_experts and self.boundary_ratio is None:  # model_kwargs.boundary_ratio wins
            self.boundary_ratio = float(configs.boundary_ratio or self.default_boundary_ratio)
        vae = configs.part("vae")
        self.vae_scale_factor = int(vae.get("scale_factor_spatial", 8))
        self.vae_scale_factor_temporal = int(vae.get("scale_factor_temporal", 4))

    def _check_components(self, index: dict[str, Any]) -> None:
        """Refuse a folder of another WAN variant before loading gigabytes of it."""
        present = {k for k, v in index.items() if isinstance(v, (list, tuple)) and len(v) == 2 and v[1]}
        required = ["tokenizer", "text_encoder", "vae", "transformer", "scheduler"]
        if self.two_experts:
            required.append("transformer_2")
        if self.uses_image_encoder:
            required += ["image_encoder", "image_processor"]
        missing = [c for c in required if c not in present]
        if not missing:
            return
        if "transformer_2" in present:
            hint = "wan22_14b_i2v" if index.get("_class_name") == "WanImageToVideoPipeline" else "wan22_14b"
        elif "image_encoder" in present:
            hint = "wan21_i2v"
        else:
            hint = "wan21_i2v" if index.get("_class_name") == "WanImageToVideoPipeline" else "wan21"
        raise ModelLoadError(
            f"model.arch {self.arch_names[0]!r} needs {', '.join(missing)} in the model folder, but "
            f"{self.model_cfg.name_or_path!r} has none (it looks like model.arch {hint!r})"
        )

    def _check_transformer(self, index: Mapping[str, Any]) -> None:
        """Refuse a transformer of another WAN variant (input channels tell them apart)."""
        channels = self.transformer.config.in_channels
        if channels != (36 if self.i2v else 16):
            kind = "image-to-video (36 input channels)" if self.i2v else "text-to-video (16 input channels)"
            hint = " (it looks like model.arch 'wan22_5b')" if channels == 48 else ""
            raise ModelLoadError(
                f"model.arch {self.arch_names[0]!r} needs a {kind} transformer, but "
                f"{self.model_cfg.name_or_path!r} has {channels}{hint}"
            )

    def _load_vae(self, location: str) -> Any:
        """model.vae_path (a VAE folder, a pipeline folder with vae/, or a hub id) or the model's
        vae/. Always fp32: it only encodes for caching / conditioning and decodes previews."""
        from diffusers import AutoencoderKLWan

        source = self.model_cfg.vae_path
        if not source:
            return AutoencoderKLWan.from_pretrained(location, subfolder="vae", torch_dtype=torch.float32)
        path = Path(source).expanduser()
        if path.is_dir() and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            return AutoencoderKLWan.from_pretrained(str(path), subfolder="vae", torch_dtype=torch.float32)
        return AutoencoderKLWan.from_pretrained(str(path) if path.exists() else source, torch_dtype=torch.float32)

    def _modules(self) -> list[torch.nn.Module]:
        parts = [self.text_encoder, self.vae, self.transformer, self.transformer_2, self.image_encoder]
        return [m for m in parts if m is not None]

    @property
    def flow_shift(self) -> float:
        if self._flow_shift_kwarg is not None:
            return float(self._flow_shift_kwarg)
        return float(getattr(self.scheduler.config, "flow_shift", None) or DEFAULT_FLOW_SHIFT)

    # --- experts -------------------------------------------------------------------------
    def experts(self) -> dict[str, torch.nn.Module]:
        if self.two_experts:
            return {HIGH_NOISE: self.transformer, LOW_NOISE: self.transformer_2}
        return {MAIN: self.transformer}

    def trained_experts(self) -> list[str]:
        """The experts this job trains (model_kwargs.train_high_noise / train_low_noise for 2.2)."""
        if not self.two_experts:
            return [MAIN]
        return [name for name in (HIGH_NOISE, LOW_NOISE) if self._train_flags[name]]

    def denoiser(self) -> torch.nn.Module:
        return self.experts()[self.trained_experts()[0]]

    @property
    def boundary_timestep(self) -> float | None:
        return None if self.boundary_ratio is None else self.boundary_ratio * NUM_TRAIN_TIMESTEPS

    def expert_timestep_range(self, name: str) -> tuple[float, float]:
        """(low, high) timesteps of an expert: high-noise owns [boundary, 1000], low-noise
        [0, boundary) (boundary excluded), as diffusers' pipelines switch (t >= boundary)."""
        experts = self.experts()
        if name not in experts:
            raise ValueError(f"unknown expert {name!r}; this model has {', '.join(experts)}")
        if name == HIGH_NOISE:
            return (self.boundary_timestep, float(NUM_TRAIN_TIMESTEPS))
        if name == LOW_NOISE:
            return (0.0, self.boundary_timestep)
        return (0.0, float(NUM_TRAIN_TIMESTEPS))

    def expert_for_timesteps(self, timesteps: torch.Tensor) -> str:
        """The expert of a batch's timesteps; they must all fall on the same side of the boundary."""
        if not self.two_experts:
            return MAIN
        high = timesteps >= self.boundary_timestep
        if bool(high.all()):
            return HIGH_NOISE
        if not bool(high.any()):
            return LOW_NOISE
        raise ValueError(
            f"timesteps {timesteps.tolist()} straddle the expert boundary {self.boundary_timestep}; "
            "one batch trains one expert"
        )

    # --- networks ------------------------------------------------------------------------
    def network_candidates(self, include_conv: bool) -> list[str]:
        from aitk.networks.lora import eligible_modules

        # Attention and FFN linears of the blocks: what WAN LoRAs train and ComfyUI maps. The only
        # convolution (patch_embedding) is 3-D, so LoCon adds nothing.
        return [n for n in eligible_modules(self.denoiser()) if is_block_target(n)]

    def lora_key_stem(self, module_name: str) -> str:
        return lora_key_stem(module_name)

    # --- encoding ------------------------------------------------------------------------
    def _text_pipeline(self) -> Any:
        from diffusers import WanPipeline

        # WanPipeline's own prompt encoding (cleaning, padding to max_sequence_length, zeroing
        # past each prompt's tokens), so training embeddings equal what previews feed the model
        return WanPipeline(
            tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae, scheduler=self.scheduler
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        embeds, _ = self._text_pipeline().encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
            dtype=self.dtype,
        )
        return PromptEmbeds(embeds)

    def _latent_stats(self, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=ref.device).view(shape)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=ref.device).view(shape)
        return mean, std

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, 16, F', H/8, W/8), F' = (F - 1) / 4 + 1.

        pixels in [-1, 1]: (B, 3, H, W) (a still = one frame), (B, 3, F, H, W), or frames-first
        (B, F, 3, H, W); F must be 4k+1. The distribution's mode, as diffusers' WAN pipelines use.
        """
        if pixels.ndim == 4:
            pixels = pixels.unsqueeze(2)
        elif pixels.ndim == 5 and pixels.shape[1] != 3 and pixels.shape[2] == 3:
            pixels = pixels.transpose(1, 2)
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (B, 3, H, W) or (B, 3, F, H, W), got {tuple(pixels.shape)}")
        frames = pixels.shape[2]
        if (frames - 1) % self.vae.config.scale_factor_temporal:
            raise ValueError(f"WAN encodes 4k+1 frames (1, 5, 9, ...), got {frames}")
        latents = common.encode_mode(self.vae, pixels, self.device)
        mean, std = self._latent_stats(latents)
        return (latents - mean) / std

    def latent_space_id(self) -> str:
        cfg = self.vae.config
        source = self.model_cfg.vae_path or self.model_cfg.name_or_path
        return f"wan-vae:{cfg.z_dim}:{list(cfg.latents_mean)[:2]}:{list(cfg.latents_std)[:2]}:{source}"

    @torch.no_grad()
    def _decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._latent_stats(latents)
        latents = latents.to(self.device, torch.float32) * std + mean
        return self.vae.decode(latents).sample  # (B, 3, F, H, W) in about [-1, 1]

    # --- image-to-video conditioning -----------------------------------------------------
    @torch.no_grad()
    def i2v_condition(self, latents: torch.Tensor, first_frames: torch.Tensor | None) -> torch.Tensor:
        """The channels WAN I2V concatenates to the noisy latents: (B, 4 + 16, F', h, w).

        = [frame mask (4: the first latent frame known), VAE latents of the clip's first frame
        followed by zero frames], as diffusers' WanImageToVideoPipeline.prepare_latents builds.
        first_frames (B, 3, H, W) in [-1, 1] (BatchContext.first_frames). When None, a one-frame
        clip (an image dataset) is its own first frame and its latents are the condition; a longer
        clip without first frames raises ValueError (the trainer's data gives them for every video
        dataset of an I2V arch: aitk.models.archs.FIRST_FRAME_ARCHS).
        """
        b, _, lat_frames, h, w = latents.shape
        if first_frames is None:
            if lat_frames != 1:
                raise ValueError(
                    f"{self.arch_names[0]} trains image-to-video: clips of {lat_frames} latent frames need "
                    "their first frames (BatchContext.first_frames), which the trainer's data gives for every "
                    "video dataset of an I2V arch (do_i2v is implied)"
                )
            cond = latents.float()
        else:
            frames = (lat_frames - 1) * self.vae.config.scale_factor_temporal + 1
            first = first_frames.to(self.device, torch.float32).unsqueeze(2)
            rest = first.new_zeros(b, 3, frames - 1, *first.shape[-2:])
            cond = self.encode_images(torch.cat([first, rest], dim=2))
            if cond.shape[-2:] != (h, w):
                raise ValueError(f"first frames {tuple(first_frames.shape)} do not match latents {tuple(latents.shape)}")
        mask = torch.zeros(b, self.vae.config.scale_factor_temporal, lat_frames, h, w, device=cond.device)
        mask[:, :, 0] = 1.0
        return torch.cat([mask, cond.to(mask.device)], dim=1)

    @torch.no_grad()
    def image_embeds(self, images: list[Any]) -> torch.Tensor:
        """CLIP penultimate hidden states of PIL images (2.1 I2V), as the pipeline's encode_image."""
        inputs = self.image_processor(images=images, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.image_encoder.dtype)
        return self.image_encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]

    # --- training objective --------------------------------------------------------------
    def timestep_distribution(self, train_cfg: TrainConfig) -> FlowTimesteps:
        return FlowTimesteps(train_cfg.timestep_type, self.flow_shift, train_cfg.content_or_style)

    def _draw_timesteps(
        self, count: int, train_cfg: TrainConfig, generator: torch.Generator | None, expert: str | None
    ) -> tuple[torch.Tensor, str]:
        dist = self.timestep_distribution(train_cfg)
        # min/max_denoising_steps bound every draw (max inclusive, as for SD); like FLUX, never
        # below SIGMA_MIN (sigma = 0 has no noise to learn from)
        lo_cfg = max(float(train_cfg.min_denoising_steps), SIGMA_MIN * NUM_TRAIN_TIMESTEPS)
        hi_cfg = float(min(train_cfg.max_denoising_steps + 1, NUM_TRAIN_TIMESTEPS))

        def bounds(name: str) -> tuple[float, float, bool]:
            low, high = self.expert_timestep_range(name)
            include_high = name != LOW_NOISE
            if hi_cfg < high:
                high, include_high = hi_cfg, True
            return max(low, lo_cfg), high, include_high

        if expert is None:
            candidates = self.trained_experts()
            if len(candidates) > 1:
                # one draw picks the batch's expert with its share of the distribution
                masses = [dist.mass(*bounds(n)[:2]) for n in candidates]
                if sum(masses) <= 0:
                    raise ValueError("train.min/max_denoising_steps leave no timestep to train")
                pick = float(torch.rand(1, generator=generator, dtype=torch.float64)) * sum(masses)
                expert = candidates[-1]
                for name, mass in zip(candidates, masses):
                    if pick < mass:
                        expert = name
                        break
                    pick -= mass
            else:
                expert = candidates[0]
        low, high, include_high = bounds(expert)
        if not low < high:
            raise ValueError(
                f"expert {expert!r} owns timesteps {self.expert_timestep_range(expert)}, outside "
                f"train.min_denoising_steps..max_denoising_steps ({train_cfg.min_denoising_steps}.."
                f"{train_cfg.max_denoising_steps})"
            )
        return dist.draw(count, generator, low, high, include_high), expert

    def make_noisy_batch(
        self,
        latents: torch.Tensor,
        train_cfg: TrainConfig,
        generator: torch.Generator | None,
        context: BatchContext | None = None,
    ) -> NoisyBatch:
        """Flow-matching inputs. With `context.expert` set (2.2) every timestep lies in that
        expert's range; without, one expert is picked for the whole batch (among the trained
        ones). NoisyBatch.extra: "expert", and for I2V "condition" / "image_embeds"."""
        from aitk.models.noise import apply_noise_offset

        if train_cfg.min_snr_gamma:
            raise FlowMatchingConfigError(
                f"train.min_snr_gamma: {train_cfg.min_snr_gamma} is a weighting for DDPM-style models; "
                f"{self.arch_names[0]} trains with flow matching, so leave train.min_snr_gamma unset"
            )
        if latents.ndim == 4:  # image latents cached without a frame axis
            latents = latents.unsqueeze(2)
        latents = latents.to(self.device, torch.float32)
        batch = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device)
        noise = apply_noise_offset(noise, train_cfg.noise_offset, generator)
        expert = context.expert if context is not None else None
        timesteps, expert = self._draw_timesteps(batch, train_cfg, generator, expert)
        timesteps = timesteps.to(latents.device)
        noisy, target = noisy_and_target(latents, noise, timesteps / NUM_TRAIN_TIMESTEPS)
        extra: dict[str, Any] = {"expert": expert}
        if self.i2v:
            first = context.first_frames if context is not None else None
            extra["condition"] = self.i2v_condition(latents, first).to(self.dtype)
            if self.uses_image_encoder:
                if first is None:
                    # a still's image is its own first frame; its pixels come back from the
                    # latents (a close VAE round trip) so cached latents work too
                    first = self._decode_pixels(latents)[:, :, 0]
                extra["image_embeds"] = self.image_embeds(to_pil(first)).to(self.dtype)
        weights = None
        if (train_cfg.timestep_type or "").lower() == "weighted":  # uniform draws, loss weighted by noise level
            weights = weighted_loss(timesteps / NUM_TRAIN_TIMESTEPS)
        return NoisyBatch(noisy.to(self.dtype), timesteps, target, weights, extra)

    def example_batch(
        self, batch: int, size: tuple[int, int], frames: int, *, expert: str, with_controls: bool
    ) -> tuple[NoisyBatch, PromptEmbeds]:
        config = self.experts()[expert].config
        h, w = size[1] // self.vae_scale_factor, size[0] // self.vae_scale_factor
        latent_frames = (max(frames, 1) - 1) // self.vae_scale_factor_temporal + 1
        latents = torch.randn(batch, config.out_channels, latent_frames, h, w)
        extra: dict[str, Any] = {"expert": expert}
        if self.i2v:  # the first-frame condition: what the transformer takes beyond the latents
            extra["condition"] = torch.randn(
                batch, config.in_channels - config.out_channels, latent_frames, h, w, dtype=self.dtype
            )
            if self.uses_image_encoder:
                vision = self.part_configs.part("image_encoder")
                # CLIP vision tokens: one per patch and the class token
                tokens = (vision.get("image_size", 224) // vision.get("patch_size", 14)) ** 2 + 1
                extra["image_embeds"] = torch.randn(batch, tokens, vision["hidden_size"], dtype=self.dtype)
        noisy = NoisyBatch(latents.to(self.dtype), torch.rand(batch) * 1000.0, torch.randn(latents.shape), None, extra)
        cond = PromptEmbeds(torch.randn(batch, self.max_sequence_length, config.text_dim, dtype=self.dtype))
        return noisy, cond

    def predict(self, batch: NoisyBatch, cond: PromptEmbeds) -> torch.Tensor:
        expert = batch.extra.get("expert") or self.expert_for_timesteps(batch.timesteps)
        model = self.experts()[expert]
        hidden = batch.noisy_latents.to(self.dtype)
        condition = batch.extra.get("condition")
        if condition is not None:
            hidden = torch.cat([hidden, condition.to(self.dtype)], dim=1)
        return model(
            hidden_states=hidden,
            timestep=batch.timesteps,
            encoder_hidden_states=cond.hidden_states.to(self.dtype),
            encoder_hidden_states_image=batch.extra.get("image_embeds"),
            return_dict=False,
        )[0]

class Wan21I2VAdapter(Wan21Adapter):
    arch_names = ("wan21_i2v",)
    modelspec_architecture = "wan-2.1-i2v/lora"
    card_pipeline_tag = "image-to-video"
    i2v = True
    uses_image_encoder = True
    auxiliary_names = ("vae", "image_encoder")
    processor_names = ("image_processor",)
    step_auxiliary_names = ("vae", "image_encoder")  # first frames: latent condition, CLIP embeds


class Wan22Adapter(Wan21Adapter):
    arch_names = ("wan22_14b",)
    base_model_version = "wan_2.2"
    modelspec_architecture = "wan-2.2-t2v-14b/lora"
    two_experts = True
    default_boundary_ratio = 0.875


class Wan22I2VAdapter(Wan21Adapter):
    arch_names = ("wan22_14b_i2v",)
    base_model_version = "wan_2.2"
    modelspec_architecture = "wan-2.2-i2v-14b/lora"
    card_pipeline_tag = "image-to-video"
    i2v = True
    step_auxiliary_names = ("vae",)  # encodes the first frames' latent condition
    two_experts = True
    default_boundary_ratio = 0.9
