"""Pydantic schema of the ai-toolkit job file (spec: shared/spec/job-file.md).

Every model keeps unknown keys (extra="allow") so the loader can warn about them with a
did-you-mean instead of failing; `--strict` turns those warnings into errors.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="allow", validate_assignment=True, protected_namespaces=())


class NetworkKwargs(Section):
    only_if_contains: list[str] | None = None
    ignore_if_contains: list[str] | None = None


class ExitCriteria(Section):
    loss_improvement_rate_below: float = 0.001
    min_gradient_stability: float = 0.55
    min_loss_r2: float | None = None
    max_loss_cv: float | None = None
    min_samples: int = 100


class AlphaPhase(Section):
    alpha: float | None = None
    linear_alpha: float | None = None
    min_steps: int = 500
    exit_criteria: ExitCriteria = Field(default_factory=ExitCriteria)


class ExpertAlphaSchedule(Section):
    conv_alpha_phases: dict[str, AlphaPhase] | None = None
    alpha_phases: dict[str, AlphaPhase] | None = None
    linear_alpha_phases: dict[str, AlphaPhase] | None = None
    linear_alpha: float | None = None


class AlphaSchedule(ExpertAlphaSchedule):
    enabled: bool = False
    per_expert: dict[str, ExpertAlphaSchedule] | None = None


class NetworkConfig(Section):
    type: Literal["lora", "locon", "lokr", "loha", "dora"] = "lora"
    linear: int | None = None
    rank: int | None = None
    linear_alpha: float | None = None
    alpha: float | None = None
    conv: int | None = None
    conv_alpha: float | None = None
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    dora: bool = False
    lokr_full_rank: bool = False
    lokr_factor: int = -1
    network_kwargs: NetworkKwargs = Field(default_factory=NetworkKwargs)
    pretrained_lora_path: str | None = None
    alpha_schedule: AlphaSchedule | None = None

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
    dtype: Literal["float16", "fp16", "bfloat16", "bf16", "float32", "fp32"] = "float16"
    save_every: int = Field(1000, ge=1)
    max_step_saves_to_keep: int = Field(5, ge=0)
    save_format: Literal["comfyui", "kohya", "diffusers"] = "comfyui"
    push_to_hub: bool = False
    hf_repo_id: str | None = None
    hf_private: bool = True


class DatasetConfig(Section):
    folder_path: str
    caption_ext: str = "txt"
    default_caption: str = ""
    caption_dropout_rate: float = Field(0.0, ge=0.0, le=1.0)
    shuffle_tokens: bool = False
    keep_tokens: int = Field(0, ge=0)
    token_dropout_rate: float = Field(0.0, ge=0.0, le=1.0)
    trigger_word: str | None = None
    resolution: int | list[int] = 512
    buckets: bool = True
    bucket_tolerance: int = 64
    random_crop: bool = False
    flip_x: bool = False
    flip_y: bool = False
    num_repeats: int = Field(1, ge=1)
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    cache_text_embeddings: bool = False
    num_workers: int = Field(0, ge=0)
    is_reg: bool = False
    loss_multiplier: float = 1.0
    control_path: str | None = None
    mask_path: str | None = None
    num_frames: int = Field(1, ge=1)
    shrink_video_to_frames: bool = True
    fps: float | None = None
    max_pixels_per_frame: int | None = None
    temporal_jitter: int = 0
    do_i2v: bool = False

    @property
    def resolutions(self) -> list[int]:
        return [self.resolution] if isinstance(self.resolution, int) else list(self.resolution)


class EmaConfig(Section):
    use_ema: bool = False
    ema_decay: float = Field(0.999, gt=0.0, lt=1.0)


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
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    gradient_accumulation_steps: int | None = None  # ai-toolkit spelling; same meaning
    lr: float = 1e-4
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    optimizer: Optimizer = "adamw"
    optimizer_params: dict[str, Any] = Field(default_factory=dict)
    lr_scheduler: LrScheduler = "constant"
    lr_scheduler_params: dict[str, Any] = Field(default_factory=dict)
    lr_warmup_steps: int = 0
    dtype: Literal["fp32", "float32", "bf16", "bfloat16", "fp16", "float16"] = "fp32"
    train_unet: bool = True
    train_text_encoder: bool = False
    gradient_checkpointing: bool = False
    noise_scheduler: str = "ddpm"
    timestep_type: Literal["sigmoid", "linear", "shift", "lognorm", "weighted", "uniform"] | None = None
    content_or_style: Literal["balanced", "content", "style"] = "balanced"
    min_denoising_steps: int = Field(0, ge=0)
    max_denoising_steps: int = Field(999, ge=0)
    loss_type: Literal["mse", "mae", "l1", "pseudo_huber", "huber"] = "mse"
    huber_c: float = 0.1
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    max_grad_norm: float = 1.0
    ema_config: EmaConfig = Field(default_factory=EmaConfig)
    switch_boundary_every: int | None = None
    skip_first_sample: bool = False
    disable_sampling: bool = False
    cache_text_embeddings: bool = False
    attention_backend: str | None = None

    @property
    def accumulation_steps(self) -> int:
        return self.gradient_accumulation_steps or self.gradient_accumulation


class ModelConfig(Section):
    name_or_path: str
    arch: str | None = None
    is_flux: bool = False
    is_xl: bool = False
    is_v2: bool = False
    is_v_pred: bool = False
    quantize: bool = False
    qtype: str | None = None
    quantize_te: bool = False
    low_vram: bool = False
    assistant_lora_path: str | None = None
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    vae_path: str | None = None

    @property
    def resolved_arch(self) -> str:
        """The architecture key: `arch` wins, else the legacy flags, else SD 1.5."""
        if self.arch:
            return self.arch
        if self.is_flux:
            return "flux"
        if self.is_xl:
            return "sdxl"
        if self.is_v2:
            return "sd2"
        return "sd1"


class SamplePrompt(Section):
    prompt: str
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    sample_steps: int | None = None
    neg: str | None = None
    network_multiplier: float | None = None
    ctrl_img: str | None = None


class SampleConfig(Section):
    sampler: str = "ddpm"
    sample_every: int = Field(100, ge=1)
    width: int = 512
    height: int = 512
    prompts: list[str] = Field(default_factory=list)
    samples: list[SamplePrompt] = Field(default_factory=list)
    neg: str = ""
    seed: int = 42
    walk_seed: bool = False
    guidance_scale: float = 7.0
    sample_steps: int = Field(20, ge=1)
    num_frames: int = 1
    fps: int = 16
    network_multiplier: float = 1.0
    ctrl_img: str | None = None


class LoggingConfig(Section):
    log_every: int = 1
    use_wandb: bool = False
    verbose: bool = False


class ProcessConfig(Section):
    type: Literal["sd_trainer", "diffusion_trainer", "ui_trainer"] = "sd_trainer"
    training_folder: str
    device: str | None = None
    trigger_word: str | None = None
    training_seed: int | None = None
    log_dir: str | None = None
    performance_log_every: int | None = None
    network: NetworkConfig | None = None
    save: SaveConfig = Field(default_factory=SaveConfig)
    datasets: list[DatasetConfig] = Field(min_length=1)
    train: TrainConfig = Field(default_factory=TrainConfig)
    model: ModelConfig
    sample: SampleConfig | None = None
    logging: LoggingConfig = Field(default_factory=LoggingConfig)


class JobConfig(Section):
    name: str = Field(min_length=1)
    process: list[ProcessConfig] = Field(min_length=1)


class JobFile(Section):
    job: Literal["extension", "train"] = "extension"
    config: JobConfig
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _name_is_a_folder_name(self) -> "JobFile":
        name = self.config.name
        if "/" in name or "\\" in name or name in {".", ".."}:
            raise ValueError(f"config.name {name!r} must be a plain folder name (no '/' or '..')")
        return self
