"""The job settings that change memory, read once from a process entry of the job file.

`PlanSettings` is what the planner reads and what the advisor varies (dataclasses.replace), so a
suggestion is always a set of job keys with new values. No torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aitk.config.schema import ProcessConfig

DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}


@dataclass(frozen=True)
class NetworkShape:
    """What decides the trainable parameters of a network section."""

    type: str
    linear_rank: int
    linear_alpha: float
    conv_rank: int | None
    conv_alpha: float | None
    dora: bool
    only_if_contains: tuple[str, ...] | None
    ignore_if_contains: tuple[str, ...] | None
    lokr_factor: int
    lokr_full_rank: bool


@dataclass(frozen=True)
class PlanSettings:
    arch: str
    name_or_path: str
    dtype: str  # "fp32" | "bf16" | "fp16": weights of the denoiser and text encoders
    quantize: bool
    qtype: str | None  # as written (may carry "|<accuracy recovery adapter>")
    quantize_te: bool
    qtype_te: str | None
    network: NetworkShape | None  # None: full fine-tune of the trained experts
    optimizer: str
    ema: bool
    gradient_checkpointing: bool
    batch_size: int
    resolution: int  # the largest dataset resolution (pixels per side of the square budget)
    max_pixels_per_frame: int | None
    frames: int  # the largest num_frames of the datasets (1 = images)
    uses_controls: bool  # a dataset has control images (Kontext appends their tokens)
    cache_text_embeddings: bool  # or unload_text_encoder: either way the text encoders go before the first step
    cache_latents: bool
    low_vram: bool
    layer_offloading: bool
    offload_transformer_percent: float
    offload_text_encoder_percent: float
    model_kwargs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def quantized_qtype(self) -> str:
        """The quantization format of the denoiser without the accuracy-recovery adapter."""
        from aitk.models.quantize import split_qtype

        return split_qtype(self.qtype)[0]

    @property
    def te_qtype(self) -> str:
        from aitk.models.quantize import split_qtype

        return split_qtype(self.qtype_te or self.qtype)[0]

    @property
    def recovery_adapter(self) -> str | None:
        from aitk.models.quantize import split_qtype

        return split_qtype(self.qtype)[1]

    @property
    def offloaded_share(self) -> float:
        return self.offload_transformer_percent if self.layer_offloading else 0.0

    @property
    def te_offloaded_share(self) -> float:
        return self.offload_text_encoder_percent if self.layer_offloading else 0.0


def _extra(section: Any, key: str, default: Any) -> Any:
    """A key the schema does not declare yet (kept by extra="allow"), or the declared field."""
    if key in type(section).model_fields:
        return getattr(section, key)
    return (section.model_extra or {}).get(key, default)


def _percent(value: Any, key: str) -> float:
    from aitk.plan.errors import PlanInputError

    try:
        share = float(value)
    except (TypeError, ValueError):
        raise PlanInputError(f"model.{key}: {value!r} is not a number; use a share between 0 and 1, e.g. 0.5") from None
    if not 0.0 <= share <= 1.0:
        raise PlanInputError(f"model.{key}: {value!r} is outside 0..1; use a share between 0 and 1, e.g. 0.5")
    return share


def _network(process: ProcessConfig) -> NetworkShape | None:
    net = process.network
    if net is None:
        return None
    kwargs = net.network_kwargs
    return NetworkShape(
        type=net.type,
        linear_rank=net.linear_rank,
        linear_alpha=net.linear_alpha_value,
        conv_rank=net.conv_rank,
        conv_alpha=net.conv_alpha_value,
        dora=net.dora,
        only_if_contains=tuple(kwargs.only_if_contains) if kwargs.only_if_contains else None,
        ignore_if_contains=tuple(kwargs.ignore_if_contains) if kwargs.ignore_if_contains else None,
        lokr_factor=net.lokr_factor,
        lokr_full_rank=net.lokr_full_rank,
    )


def settings_from_process(process: ProcessConfig) -> PlanSettings:
    """The memory-relevant settings of one process entry (its largest bucket, frames, ...)."""
    model, train, datasets = process.model, process.train, process.datasets
    return PlanSettings(
        arch=model.resolved_arch,
        name_or_path=model.name_or_path,
        dtype=DTYPE_NAMES[train.dtype],
        quantize=model.quantize,
        qtype=model.qtype,
        quantize_te=model.quantize_te,
        qtype_te=_extra(model, "qtype_te", None),
        network=_network(process),
        optimizer=train.optimizer,
        ema=bool(train.ema_config and train.ema_config.use_ema),
        gradient_checkpointing=train.gradient_checkpointing,
        batch_size=train.batch_size,
        resolution=max(r for d in datasets for r in d.resolutions),
        max_pixels_per_frame=max((d.max_pixels_per_frame or 0 for d in datasets), default=0) or None,
        frames=max(d.num_frames for d in datasets),
        uses_controls=any(d.control_path for d in datasets),
        cache_text_embeddings=train.cache_text_embeddings or train.unload_text_encoder
        or any(d.cache_text_embeddings for d in datasets),
        cache_latents=all(d.cache_latents or d.cache_latents_to_disk for d in datasets),
        low_vram=model.low_vram,
        layer_offloading=bool(_extra(model, "layer_offloading", False)),
        offload_transformer_percent=_percent(
            _extra(model, "layer_offloading_transformer_percent", 1.0), "layer_offloading_transformer_percent"
        ),
        offload_text_encoder_percent=_percent(
            _extra(model, "layer_offloading_text_encoder_percent", 1.0), "layer_offloading_text_encoder_percent"
        ),
        model_kwargs=dict(model.model_kwargs),
    )


def largest_bucket(settings: PlanSettings, divisibility: int) -> tuple[int, int]:
    """(width, height) of the job's largest bucket: the most pixels among the aspect buckets of
    its largest resolution (or of max_pixels_per_frame for video), the squarest on a tie."""
    from aitk.data.buckets import bucket_sizes, budget_buckets

    if settings.frames > 1 and settings.max_pixels_per_frame:
        sizes = budget_buckets(settings.max_pixels_per_frame, divisibility)
    else:
        sizes = bucket_sizes(settings.resolution, divisibility)
    return max(sizes, key=lambda wh: (wh[0] * wh[1], -abs(wh[0] - wh[1])))
