"""Training timesteps of DDPM models (SD 1.x / 2.x, SDXL): integers in [0, num_train_timesteps).

Each sample draws one uniform u, bent by train.content_or_style, and the train.timestep_type shape
(aitk/models/timestep_shapes.py, shared with flow matching) turns it into a noise fraction f:
    uniform / linear (default)  f = u                         every timestep alike (ai-toolkit's DDPM draw)
    sigmoid                     logit-normal                  mid timesteps most, few near 0 and 999
    shift                       u shifted by SHIFT (3.0)      mass towards high noise; mean f about 0.68
    lognorm                     folded log-normal             mode near 0.67, few at the ends
    lognorm_blend               3/4 lognorm + 1/4 uniform     as lognorm, with every timestep still drawn
The timestep is low + f * (high - low + 1), rounded down, with low / high = train.min_denoising_steps /
max_denoising_steps (inclusive).

ai-toolkit draws uniform DDPM timesteps whatever timestep_type says (its types only act with
noise_scheduler flowmatch); here they act on the DDPM schedule, and an unset type keeps the uniform draw.
"""

from __future__ import annotations

import torch

from aitk.config.schema import TrainConfig
from aitk.models import timestep_shapes
from aitk.models.archs import DDPM_TIMESTEP_TYPES

DEFAULT_TIMESTEP_TYPE = "uniform"
#: timestep_type shift's fixed shift: that of ai-toolkit's flow schedule for SD-family models
SHIFT = 3.0


class DDPMTimestepError(ValueError):
    """A train.timestep_type the DDPM objective does not draw."""


def timestep_kind(train_cfg: TrainConfig, model_label: str) -> str:
    """The job's timestep type (default uniform); raises for types DDPM models cannot use."""
    kind = (train_cfg.timestep_type or DEFAULT_TIMESTEP_TYPE).lower()
    if kind not in DDPM_TIMESTEP_TYPES:
        raise DDPMTimestepError(
            f"train.timestep_type: {train_cfg.timestep_type!r} is not supported for {model_label} "
            f"(DDPM timesteps); use one of {', '.join(DDPM_TIMESTEP_TYPES)}, or leave it unset (uniform)"
        )
    return kind


def fraction(kind: str, u: torch.Tensor) -> torch.Tensor:
    """The noise fraction in [0, 1] of uniform draws u under timestep type `kind`."""
    if kind == "sigmoid":
        return timestep_shapes.logit_normal(u)
    if kind == "shift":
        return timestep_shapes.shifted(u, SHIFT)
    if kind == "lognorm":
        return timestep_shapes.folded_lognormal(u)
    if kind == "lognorm_blend":
        return timestep_shapes.lognorm_blend(u)
    return u


def draw_timesteps(
    batch: int,
    train_cfg: TrainConfig,
    generator: torch.Generator | None,
    num_train_timesteps: int,
    model_label: str = "this model",
) -> torch.Tensor:
    """(batch,) int64 timesteps on the CPU, one uniform draw from `generator` per sample."""
    kind = timestep_kind(train_cfg, model_label)
    low = min(train_cfg.min_denoising_steps, num_train_timesteps - 1)
    high = min(train_cfg.max_denoising_steps, num_train_timesteps - 1)
    # float32 draws as before the timestep types existed: the default draw keeps its timesteps
    u = torch.rand(batch, generator=generator).to(torch.float64)
    f = fraction(kind, timestep_shapes.content_or_style_bias(train_cfg.content_or_style, u))
    return (low + f * (high - low + 1)).long().clamp(low, high)
