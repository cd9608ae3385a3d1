"""Pydantic schema of the ai-toolkit job file (reference: docs/job-file.md).

Every section (aitk/config/section.py) keeps unknown keys (extra="allow") so the loader can warn
about them with a did-you-mean instead of failing; `--strict` turns those warnings into errors.
Validators raise `user_error(...)`, whose message is already user-facing; keep that convention for
new checks so no raw pydantic text reaches users.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from aitk.config.section import Section, _check_pixel_size, user_error
from aitk.config.prompts import PREVIEW_SAMPLERS, PreviewRequest, SamplePromptError, parse_prompt


class NetworkKwargs(Section):
    only_if_contains: list[str] | None = Field(
        None, description="Wrap only modules whose name contains one of these strings."
    )
    ignore_if_contains: list[str] | None = Field(
        None, description="Never wrap modules whose name contains one of these (wins over only_if_contains)."
    )


class ExitCriteria(Section):
    loss_improvement_rate_below: float = Field(
        0.001, ge=0.0, description="Plateau threshold T: |loss slope| per step must be at most this."
    )
    min_gradient_stability: float = Field(
        0.55, ge=0.0, le=1.0, description="Required EMA of the gradient sign agreement (0..1)."
    )
    min_loss_r2: float | None = Field(
        None, ge=0.0, le=1.0, description="Optional: required R² of the loss trend (or a flat trend)."
    )
    max_loss_cv: float | None = Field(
        None, gt=0.0, description="Optional: the loss coefficient of variation must be below this."
    )
    min_samples: int = Field(100, ge=1, description="Losses needed in the window before a transition.")


class AlphaPhase(Section):
    alpha: float | None = Field(None, description="Conv alpha in this phase.")
    linear_alpha: float | None = Field(None, description="Linear alpha in this phase (optional).")
    min_steps: int = Field(500, ge=0, description="Steps to spend in this phase at least.")
    exit_criteria: ExitCriteria = Field(default_factory=ExitCriteria)


class ExpertAlphaSchedule(Section):
    conv_alpha_phases: dict[str, AlphaPhase] | None = Field(
        None, description="Ordered phases (YAML order) that set conv alpha (and optionally linear alpha)."
    )
    alpha_phases: dict[str, AlphaPhase] | None = Field(
        None, description="Phases whose `alpha` sets the linear alpha (models without conv layers)."
    )
    linear_alpha_phases: dict[str, AlphaPhase] | None = Field(
        None, description="Same as alpha_phases."
    )
    linear_alpha: float | None = Field(
        None, description="Linear alpha while no phase sets linear_alpha."
    )


class AlphaSchedule(ExpertAlphaSchedule):
    enabled: bool = Field(False, description="Turn alpha scheduling on.")
    per_expert: dict[str, ExpertAlphaSchedule] | None = Field(
        None, description="Multi-expert models: overrides per expert (high_noise, low_noise)."
    )


class NetworkConfig(Section):
    type: Literal["lora", "locon", "lokr", "loha", "dora"] = Field(
        "lora", description="Adapter kind: lora (linear layers), locon (lora + conv layers), lokr, loha, dora."
    )
    linear: int | None = Field(None, ge=1, description="Rank of linear layers (default 4).")
    rank: int | None = Field(None, ge=1, description="Alias of `linear`.")
    linear_alpha: float | None = Field(None, description="Alpha of linear layers (default: the rank).")
    alpha: float | None = Field(None, description="Alias of `linear_alpha`.")
    conv: int | None = Field(None, ge=1, description="Rank of conv layers (LoCon); none = conv layers untouched.")
    conv_alpha: float | None = Field(None, description="Alpha of conv layers (default: the conv rank).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's hidden features.")
    dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    lokr_full_rank: bool = Field(False, description="LoKr: use a full-rank second factor.")
    lokr_factor: int = Field(-1, description="LoKr factor (-1 = automatic).")
    network_kwargs: NetworkKwargs = Field(default_factory=NetworkKwargs)
    pretrained_lora_path: str | None = Field(None, description="Start from this LoRA file.")
    alpha_schedule: AlphaSchedule | None = Field(None, description="Alpha scheduling (phases of alpha).")

    @property
    def linear_rank(self) -> int:
        return self.linear if self.linear is not None else (self.rank if self.rank is not None else 4)

    @property
    def linear_alpha_value(self) -> float:
        if self.linear_alpha is not None:
            return self.linear_alpha
        if self.alpha is not None:
            return self.alpha
        return float(self.linear_rank)

    @property
    def conv_rank(self) -> int | None:
        return self.conv

    @property
    def conv_alpha_value(self) -> float | None:
        if self.conv is None:
            return None
        return self.conv_alpha if self.conv_alpha is not None else float(self.conv)


class SaveConfig(Section):
    dtype: Literal["float16", "fp16", "bfloat16", "bf16", "float32", "fp32"] = Field(
        "float16", description="Precision of the saved LoRA weights."
    )
    save_every: int = Field(1000, ge=1, description="Save a LoRA and a checkpoint every N steps.")
    max_step_saves_to_keep: int = Field(5, ge=0, description="Keep this many step saves (older ones are removed).")
    save_format: Literal["comfyui", "kohya", "diffusers"] = Field(
        "comfyui", description="Key naming of the LoRA file: comfyui/kohya (lora_unet_...) or diffusers (PEFT)."
    )
    single_file: bool = Field(
        False, description="Full fine-tune: also write each saved model as one .safetensors file."
    )
    push_to_hub: bool = Field(False, description="Upload the final LoRA to the Hugging Face Hub.")
    hf_repo_id: str | None = Field(None, description="Hub repository for push_to_hub (user/name).")
    hf_private: bool = Field(True, description="Make the Hub repository private.")


class DatasetConfig(Section):
    folder_path: str = Field(description="Folder of images (and caption files).")
    caption_ext: str = Field("txt", description="Extension of the caption file next to each image.")
    default_caption: str = Field("", description="Caption for images without a caption file.")
    caption_dropout_rate: float = Field(0.0, ge=0.0, le=1.0, description="Chance of training with an empty caption.")
    shuffle_tokens: bool = Field(False, description="Shuffle comma-separated caption parts.")
    keep_tokens: int = Field(0, ge=0, description="Caption parts kept in front when shuffling.")
    token_dropout_rate: float = Field(0.0, ge=0.0, le=1.0, description="Chance of dropping each caption part.")
    trigger_word: str | None = Field(None, description="Trigger word for this dataset.")
    resolution: int | list[int] = Field(
        512, description="Training resolution; a list trains one bucket set per value (e.g. [512, 768])."
    )
    buckets: bool = Field(True, description="Group images by aspect ratio instead of square cropping.")
    bucket_tolerance: int = Field(64, ge=1, description="Bucket size step in pixels.")
    random_crop: bool = Field(False, description="Crop at random positions instead of the centre.")
    flip_x: bool = Field(False, description="Also train on horizontally flipped images.")
    flip_y: bool = Field(False, description="Also train on vertically flipped images.")
    num_repeats: int = Field(1, ge=1, description="Repeat each image this many times per epoch.")
    cache_latents: bool = Field(False, description="Encode images once and keep the latents in memory.")
    cache_latents_to_disk: bool = Field(False, description="Encode images once and keep the latents on disk.")
    cache_text_embeddings: bool = Field(False, description="Encode captions once.")
    num_workers: int = Field(0, ge=0, description="Threads that load the samples of a batch in parallel (0: one after another).")
    is_reg: bool = Field(False, description="A regularisation dataset.")
    loss_multiplier: float = Field(1.0, ge=0.0, description="Weight of this dataset's loss.")
    control_path: str | list[str] | None = Field(
        None, description="Folder of control images (edit models); a list of folders gives each image several "
        "(Qwen-Image-Edit-2509: up to 3), matched by file name."
    )
    mask_path: str | None = Field(None, description="Folder of loss masks.")
    num_frames: int = Field(1, ge=1, description="Frames per sample; more than 1 = video.")
    shrink_video_to_frames: bool = Field(True, description="Sample num_frames evenly over each video.")
    fps: float | None = Field(None, gt=0.0, description="Video frame rate to sample at.")
    max_pixels_per_frame: int | None = Field(None, ge=1, description="Video: limit of pixels per frame.")
    temporal_jitter: int = Field(0, ge=0, description="Video: random offset of sampled frames.")
    do_i2v: bool = Field(False, description="Video: give the model each clip's first frame (always on for I2V archs).")

    @field_validator("resolution")
    @classmethod
    def _resolution_is_a_pixel_size(cls, value: int | list[int]) -> int | list[int]:
        values = [value] if isinstance(value, int) else value
        if not values:
            raise user_error("[] is not valid; use a resolution or a list of them, e.g. 512 or [512, 768]")
        for v in values:
            _check_pixel_size(v)
        return value

    @field_validator("control_path")
    @classmethod
    def _control_folders_named(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and (not value or not all(isinstance(v, str) and v.strip() for v in value)):
            raise user_error(
                f"{value!r} is not valid; give a folder of control images or a list of folders, e.g. "
                "[/data/ctrl_a, /data/ctrl_b], or remove the key"
            )
        return value

    @property
    def resolutions(self) -> list[int]:
        return [self.resolution] if isinstance(self.resolution, int) else list(self.resolution)

    @property
    def control_folders(self) -> list[str]:
        """control_path as a list (empty: none); the order is the control images' order."""
        if not self.control_path:
            return []
        return [self.control_path] if isinstance(self.control_path, str) else list(self.control_path)


class EmaConfig(Section):
    use_ema: bool = Field(False, description="Keep an exponential moving average of the trained weights.")
    ema_decay: float = Field(0.999, gt=0.0, lt=1.0, description="EMA decay per step.")


Optimizer = Literal["adamw", "adamw8bit", "adafactor", "prodigy", "lion", "automagic", "sgd", "adam"]
LrScheduler = Literal[
    "constant",
    "constant_with_warmup",
    "cosine",
    "cosine_with_warmup",
    "cosine_with_restarts",
    "linear",
    "polynomial",
]


class TrainConfig(Section):
    steps: int = Field(1000, ge=1, description="Optimizer steps to train.")
    batch_size: int = Field(1, ge=1, description="Images per step.")
    gradient_accumulation: int = Field(1, ge=1, description="Batches accumulated per optimizer step.")
    gradient_accumulation_steps: int | None = Field(
        None, ge=1, description="ai-toolkit spelling of gradient_accumulation; wins when set."
    )
    lr: float = Field(1e-4, gt=0.0, description="Learning rate.")
    unet_lr: float | None = Field(None, gt=0.0, description="Learning rate of the denoiser (default: lr).")
    text_encoder_lr: float | None = Field(None, gt=0.0, description="Learning rate of the text encoder (default: lr).")
    optimizer: Optimizer = Field("adamw", description="Optimizer.")
    optimizer_params: dict[str, Any] = Field(
        default_factory=dict, description="Extra optimizer arguments (weight_decay, betas, ...)."
    )
    lr_scheduler: LrScheduler = Field("constant", description="Learning-rate schedule.")
    lr_scheduler_params: dict[str, Any] = Field(default_factory=dict, description="Extra schedule arguments.")
    lr_warmup_steps: int = Field(0, ge=0, description="Warm-up steps of *_with_warmup schedules.")
    dtype: Literal["fp32", "float32", "bf16", "bfloat16", "fp16", "float16"] = Field(
        "fp32", description="Training precision."
    )
    train_unet: bool = Field(True, description="Train the denoiser (UNet / transformer).")
    train_text_encoder: bool = Field(False, description="Also train the text encoder.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    noise_scheduler: str | None = Field(
        None, description="Training schedule name (ai-toolkit's): ddpm, ddim, euler, ... for SD / SDXL, "
        "flowmatch for FLUX / WAN; unset: the model's own."
    )
    linear_timesteps: bool = Field(
        False, description="ai-toolkit's flag: on flow-matching models (FLUX, WAN) draw timesteps uniformly and weight "
        "each sample's loss by its noise level, i.e. timestep_type weighted; on SD / SDXL uniform draws (the default)."
    )
    force_first_sample: bool = Field(
        False, description="Render the previews before the first step also when resuming (ai-toolkit's flag)."
    )
    timestep_type: Literal[
        "sigmoid", "linear", "shift", "lognorm", "weighted", "uniform", "lognorm_blend", "flux_shift", "lumina2_shift"
    ] | None = Field(None, description="How training timesteps are drawn.")
    content_or_style: Literal["balanced", "content", "style"] = Field(
        "balanced", description="Bias timesteps towards content (high noise) or style (low noise)."
    )
    min_denoising_steps: int = Field(0, ge=0, description="Lowest training timestep.")
    max_denoising_steps: int = Field(999, ge=0, description="Highest training timestep.")
    loss_type: Literal["mse", "mae", "l1", "pseudo_huber", "huber"] = Field("mse", description="Loss function.")
    huber_c: float = Field(0.1, gt=0.0, description="Huber / pseudo-Huber threshold.")
    noise_offset: float = Field(0.0, description="Noise offset.")
    min_snr_gamma: float | None = Field(None, gt=0.0, description="Min-SNR loss weighting gamma.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm (0 = off).")
    nan_policy: Literal["skip", "rollback", "stop"] = Field(
        "skip", description="A step whose loss or gradients are not finite is never applied. skip: go on, and stop "
        "the run (reason nan) after nan_patience such steps in a row; rollback: after nan_patience in a row, reload "
        "the last complete checkpoint with half the learning rate and go on (at most 3 times); stop: stop at the "
        "first one.",
    )
    nan_patience: int = Field(
        10, ge=1, description="Non-finite steps in a row before nan_policy skip stops the run or rollback rolls back."
    )
    compile: bool = Field(
        False, description="Compile the denoiser's repeated blocks with torch.compile (regional compilation): "
        "faster steps after a warm-up of the first step."
    )
    allow_tf32: bool = Field(True, description="TF32 for float32 matmuls and convolutions on Ampere or newer GPUs.")
    channels_last: bool = Field(
        False, description="Channels-last memory layout for the denoiser's convolutions (UNets: SD 1.5 / SDXL)."
    )
    ema_config: EmaConfig = Field(default_factory=EmaConfig)
    switch_boundary_every: int | None = Field(
        None, ge=1, description="Multi-expert models: switch the trained expert every N steps."
    )
    skip_first_sample: bool = Field(False, description="Do not sample before the first step.")
    disable_sampling: bool = Field(False, description="Never sample previews.")
    cache_text_embeddings: bool = Field(False, description="Encode captions once.")
    unload_text_encoder: bool = Field(
        False, description="ai-toolkit's low-memory mode: encode the trigger word, the blank prompt and the preview "
        "prompts once, release the text encoders, and train every sample on the trigger word (regularisation "
        "samples on the blank prompt) instead of its caption. With cache_text_embeddings the cached captions win."
    )
    attention_backend: str | None = Field(
        None, description="Attention kernel of the denoiser: native (PyTorch SDPA), flash, sage, xformers, flex, "
        "... (diffusers' attention backends; docs/job-file.md)."
    )
    xformers: bool = Field(False, description="ai-toolkit's older key: attention_backend xformers when that is unset.")
    bypass_guidance_embedding: bool = Field(
        False, description="FLUX with a guidance embedding (dev, Flex.1): train without it in the conditioning."
    )
    fsdp: bool | None = Field(
        None,
        description="Full fine-tunes over several processes: shard weights, gradients and optimizer state "
        "(FSDP2). Default: on when accelerate launch's config says distributed_type: FSDP (docs/multi-gpu.md).",
    )
    fsdp_state_dict_type: Literal["full", "sharded", "FULL_STATE_DICT", "SHARDED_STATE_DICT"] | None = Field(
        None,
        description="FSDP checkpoints: full (gathered on process 0; resumes with any process count) or "
        "sharded (each process writes its shards; resumes with the same count). Default: the accelerate "
        "config's fsdp_state_dict_type, else full.",
    )
    fsdp_reshard_after_forward: bool | None = Field(
        None, description="FSDP: free each block's gathered weights after its forward (default true: less memory)."
    )

    @field_validator("attention_backend")
    @classmethod
    def _known_attention_backend(cls, value: str | None) -> str | None:
        from aitk.models.attention import accepted_names, normalise

        if value is not None and normalise(value) not in accepted_names():
            raise user_error(f"{value!r} is not an attention backend; use one of {', '.join(accepted_names())}")
        return value

    @model_validator(mode="after")
    def _denoising_range(self) -> "TrainConfig":
        if self.min_denoising_steps > self.max_denoising_steps:
            raise user_error(
                f"{self.max_denoising_steps} is not valid; it must be at least "
                f"min_denoising_steps ({self.min_denoising_steps})",
                key="max_denoising_steps",
            )
        return self

    @property
    def accumulation_steps(self) -> int:
        return self.gradient_accumulation_steps or self.gradient_accumulation


class ModelConfig(Section):
    name_or_path: str = Field(
        description="Base model: a Hugging Face hub id, a local diffusers folder or a .safetensors file."
    )
    arch: str | None = Field(None, description="Architecture: sd1, sdxl, flux, wan21, ... (default sd1).")
    is_flux: bool = Field(False, description="Legacy flag: arch flux.")
    is_xl: bool = Field(False, description="Legacy flag: arch sdxl.")
    is_v2: bool = Field(False, description="Legacy flag: arch sd2.")
    is_v3: bool = Field(False, description="Legacy flag: arch sd3 (SD 3 / 3.5).")
    is_lumina2: bool = Field(False, description="Legacy flag: arch lumina2 (Lumina-Image 2.0).")
    is_v_pred: bool = Field(False, description="The model predicts v instead of noise.")
    quantize: bool = Field(False, description="Quantize the denoiser.")
    qtype: str | None = Field(None, description="Quantization type.")
    quantize_te: bool = Field(False, description="Quantize the text encoder.")
    low_vram: bool = Field(
        False,
        description="Park every part not in use in host memory (text encoders, VAE, WAN 2.2's idle expert); "
        "slower, less GPU memory.",
    )
    layer_offloading: bool = Field(
        False, description="Keep a share of the denoiser's (and text encoders') blocks in host memory."
    )
    layer_offloading_transformer_percent: float = Field(
        1.0, ge=0.0, le=1.0, description="With layer_offloading: share of the denoiser's blocks offloaded (0-1)."
    )
    layer_offloading_text_encoder_percent: float = Field(
        1.0, ge=0.0, le=1.0, description="With layer_offloading: share of the text encoders' blocks offloaded (0-1)."
    )
    assistant_lora_path: str | None = Field(None, description="A LoRA merged in while training only.")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="Model-specific options.")
    dtype: str | None = Field(None, description="Precision the model is loaded in.")
    vae_path: str | None = Field(None, description="A different VAE (hub id, folder or file).")
    extras_name_or_path: str | None = Field(
        None,
        description="Where the parts besides the denoiser (VAE, text encoders, tokenizers, scheduler) come from "
        "when name_or_path holds the transformer only (a transformer folder, hub repo or .safetensors file); "
        "default: name_or_path. Z-Image.",
    )

    @property
    def resolved_arch(self) -> str:
        """The architecture key: `arch` wins, else the legacy flags, else SD 1.5. ai-toolkit's web UI
        writes a variant after a colon (`wan21:1b`, `wan22_14b:t2v`); the key is the part before it,
        as upstream reads it (the variant picks default paths in its UI only)."""
        if self.arch:
            return self.arch.split(":", 1)[0].strip()
        if self.is_flux:
            return "flux"
        if self.is_xl:
            return "sdxl"
        if self.is_v3:
            return "sd3"
        if self.is_lumina2:
            return "lumina2"
        if self.is_v2:
            return "sd2"
        return "sd1"


class SamplePrompt(Section):
    prompt: str = Field(description="Prompt text ([trigger] is replaced by the trigger word).")
    width: int | None = Field(None, description="Image width (multiple of 8).")
    height: int | None = Field(None, description="Image height (multiple of 8).")
    seed: int | None = None
    guidance_scale: float | None = None
    sample_steps: int | None = Field(None, ge=1)
    neg: str | None = None
    network_multiplier: float | None = None
    ctrl_img: str | None = Field(None, description="Control image: what Kontext edits, the first frame of I2V.")
    ctrl_img_1: str | None = Field(None, description="Multi-image edit models: the first control image (without ctrl_img).")
    ctrl_img_2: str | None = Field(None, description="Multi-image edit models: the second control image.")
    ctrl_img_3: str | None = Field(None, description="Multi-image edit models: the third control image.")
    num_frames: int | None = Field(None, ge=1, description="Video models: frames of this preview.")
    fps: int | None = Field(None, ge=1, description="Video models: frame rate of this preview.")

    @field_validator("width", "height")
    @classmethod
    def _pixel_size(cls, value: int | None) -> int | None:
        if value is not None:
            _check_pixel_size(value)
        return value


class SampleConfig(Section):
    sampler: str = Field("ddpm", description="Sampler / scheduler used for previews.")
    sample_every: int = Field(100, ge=1, description="Sample previews every N steps.")
    sample_start_step: int = Field(
        0, ge=0, description="No periodic previews before this step (the one before training follows skip_first_sample)."
    )
    width: int = Field(512, description="Preview width (multiple of 8).")
    height: int = Field(512, description="Preview height (multiple of 8).")
    prompts: list[str] = Field(
        default_factory=list, description="Preview prompts; inline flags (--w --seed --ctrl_img ...) override settings."
    )
    samples: list[SamplePrompt] = Field(default_factory=list, description="Preview prompts with their own settings.")
    neg: str = Field("", description="Negative prompt.")
    seed: int = Field(42, description="Seed of the first preview (-1: a new random seed every time).")
    walk_seed: bool = Field(False, description="Use seed + i for the i-th prompt.")
    guidance_scale: float = Field(7.0, description="Classifier-free guidance scale.")
    sample_steps: int = Field(20, ge=1, description="Denoising steps per preview.")
    num_frames: int = Field(1, ge=1, description="Video models: frames per preview.")
    fps: int = Field(16, ge=1, description="Video models: frame rate of previews.")
    network_multiplier: float = Field(1.0, description="LoRA strength used for previews.")
    ctrl_img: str | None = Field(None, description="Control image: what Kontext edits, the first frame of I2V.")
    guidance_rescale: float = Field(0.0, ge=0.0, description="SD / SDXL previews: guidance rescale (0: off).")

    @field_validator("width", "height")
    @classmethod
    def _pixel_size(cls, value: int) -> int:
        _check_pixel_size(value)
        return value

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, value: str) -> str:
        if value.lower() not in PREVIEW_SAMPLERS:
            raise user_error(f"{value!r} is not a known sampler; use one of {', '.join(PREVIEW_SAMPLERS)}")
        return value.lower()

    @model_validator(mode="after")
    def _prompts_parse(self) -> "SampleConfig":
        defaults = PreviewRequest("", self.width, self.height, self.seed, self.guidance_scale,
                                  self.sample_steps, self.neg, self.network_multiplier)
        for key, prompt in [("prompts", p) for p in self.prompts] + [("samples", s.prompt) for s in self.samples]:
            try:
                request = parse_prompt(prompt, defaults)
                _check_pixel_size(request.width)
                _check_pixel_size(request.height)
            except (SamplePromptError, PydanticCustomError) as exc:
                message = exc.message() if isinstance(exc, PydanticCustomError) else exc.problem
                raise user_error(f"in {prompt!r}: {message}", key=key) from None
        return self


class LoggingConfig(Section):
    log_every: int = Field(
        1, ge=1,
        description="The progress bar's loss and W&B get the mean of every N steps (the metrics file keeps every step).",
    )
    use_wandb: bool = Field(False, description="Also log to Weights & Biases (pip install wandb).")
    project_name: str = Field("ai-toolkit", min_length=1, description="W&B project of the run.")
    run_name: str | None = Field(None, description="W&B run name (default: the job name).")
    verbose: bool = Field(
        False, description="Set-up details (parts, dtypes, devices, optimizer groups) and a loss line per log_every in log.txt."
    )




class ProcessConfig(Section):
    type: Literal["sd_trainer", "diffusion_trainer", "ui_trainer"] = Field(
        "sd_trainer", description="Process kind (all three train the same way)."
    )
    training_folder: str = Field(description="Output goes to <training_folder>/<name>/.")
    device: str | None = Field(None, description="cpu, cuda, cuda:N or mps (default: the best available).")
    trigger_word: str | None = Field(None, description="Word that triggers the LoRA; replaces [trigger].")
    training_seed: int | None = Field(None, description="Seed of the run (default: random, recorded).")
    log_dir: str | None = Field(None, description="Extra folder for logs.")
    performance_log_every: int | None = Field(
        None, ge=1,
        description="Time each step's phases (data, forward, backward, optimizer, offload copies): a line in log.txt every N steps, fields in the metrics.",
    )
    network: NetworkConfig | None = Field(None, description="The adapter; none = full fine-tune.")
    save: SaveConfig = Field(default_factory=SaveConfig)
    datasets: list[DatasetConfig] = Field(min_length=1, description="One or more image folders.")
    train: TrainConfig = Field(default_factory=TrainConfig)
    model: ModelConfig
    sample: SampleConfig | None = Field(None, description="Preview sampling; none = no previews.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig)


    @model_validator(mode="after")
    def _linear_timesteps(self) -> "ProcessConfig":
        """ai-toolkit's linear_timesteps on a flow-matching model: uniform draws with the loss weighted
        by noise level, which is timestep_type weighted here (SD draws uniformly by default)."""
        from aitk.models.archs import NOISE_SCHEDULERS, FLOW_NOISE_SCHEDULERS

        flow = NOISE_SCHEDULERS.get(self.model.resolved_arch) == FLOW_NOISE_SCHEDULERS
        if self.train.linear_timesteps and flow and self.train.timestep_type in (None, "linear"):
            self.train.timestep_type = "weighted"
        return self

    @model_validator(mode="after")
    def _i2v_first_frames(self) -> "ProcessConfig":
        """I2V models always take each clip's first frame, as in ai-toolkit (whose do_i2v only
        switches models doing both T2V and I2V): their video datasets give it whatever do_i2v says."""
        from aitk.models.archs import FIRST_FRAME_ARCHS

        if self.model.resolved_arch in FIRST_FRAME_ARCHS:
            for dataset in self.datasets:
                if dataset.num_frames > 1 and not dataset.do_i2v:
                    dataset.do_i2v = True
        return self


class JobConfig(Section):
    name: str = Field(min_length=1, description="Run name: the output folder and LoRA file name.")
    process: list[ProcessConfig] = Field(min_length=1, description="The training process (one entry).")

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, name: str) -> str:
        if "/" in name or "\\" in name or name.strip() in {".", ".."} or not name.strip():
            raise user_error(
                f"{name!r} is not valid; use a plain folder name without '/' or '..', e.g. my_lora_v1"
            )
        return name

    @model_validator(mode="after")
    def _one_output_folder_per_process(self) -> "JobConfig":
        seen: dict[str, int] = {}
        for index, process in enumerate(self.process):
            try:
                folder = str(Path(process.training_folder).expanduser().resolve())
            except (RuntimeError, OSError, ValueError):  # ~user unknown here, a NUL byte: compare as written
                folder = process.training_folder
            if folder in seen:
                raise user_error(
                    f"process[{index}] writes to the same folder as process[{seen[folder]}] "
                    f"({process.training_folder}/{self.name}), so each would resume from the other's "
                    "checkpoints; give it its own training_folder or put it in its own job file",
                    key="process",
                )
            seen[folder] = index
        return self


class JobFile(Section):
    job: Literal["extension", "train"] = Field("extension", description="Job kind (ai-toolkit: extension).")
    config: JobConfig
    meta: dict[str, Any] = Field(default_factory=dict, description="Copied into the LoRA file's metadata.")
