"""Rectified-flow (flow-matching) training objective, shared by flow-matching adapters.

With clean latents x0, noise e ~ N(0, I) and a noise level sigma in [0, 1]:
    x_sigma = (1 - sigma) * x0 + sigma * e        (the noisy input)
    target  = e - x0                              (the velocity d x_sigma / d sigma)
The denoiser sees the timestep t = 1000 * sigma (diffusers' scheduler convention).

`train.timestep_type` chooses how sigma is drawn. Each sample draws u ~ U(0, 1) and maps it
through the type's quantile function (so z = Phi^-1(u) ~ N(0, 1)); every map rises with u:
    sigmoid (default)  sigma = sigmoid(z)                     logit-normal(0, 1): mass around 0.5
    linear / uniform   sigma = u                              every noise level alike
    shift              sigma = e^mu / (e^mu + 1/u - 1)        u pushed up by the time shift mu
                       (mu > 0 moves mass to high noise; `mu` is resolution dependent for FLUX,
                       `shift` = s > 0 gives the fixed form s*u / (1 + (s - 1)*u), s = e^mu)
    lognorm            sigma = clamp(1 - exp(-z / 3) / e, 0, 1)  log-normal(0, 1/3) folded under 1:
                       mode near 0.67, mean about 0.61; leans to mid-high noise, few at the ends
    flux_shift, lumina2_shift  as shift (ai-toolkit draws the three alike)
    lognorm_blend      3/4 lognorm + 1/4 uniform (aitk.models.timestep_shapes)
    weighted           as linear; the adapter weights each sample's loss (flow_timestep_types)
`train.content_or_style` bends u first, for every type: content 1 - u^3 (mass at high noise),
style u^3 (low noise), balanced u.
Then sigma is mapped into [min_denoising_steps, max_denoising_steps + 1] / 1000 and kept above
SIGMA_MIN (sigma = 0 has no noise to learn from).

`min_snr_gamma` is a DDPM-schedule weighting with no meaning here: asking for it is an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from aitk.config.schema import TrainConfig
from aitk.models.flow_timestep_types import SHIFT_TYPES
from aitk.models.timestep_shapes import content_or_style_bias, folded_lognormal, lognorm_blend, logit_normal

TIMESTEP_TYPES = (
    "sigmoid", "linear", "uniform", "shift", "lognorm", "flux_shift", "lumina2_shift", "lognorm_blend", "weighted"
)
DEFAULT_TIMESTEP_TYPE = "sigmoid"
NUM_TRAIN_TIMESTEPS = 1000
SIGMA_MIN = 1e-3


class FlowMatchingConfigError(ValueError):
    """A train.* setting that flow-matching models cannot honour."""


def check_train_config(train_cfg: TrainConfig, model_label: str) -> None:
    """Raise for settings of DDPM-style training that a flow-matching model cannot use."""
    if train_cfg.min_snr_gamma:
        raise FlowMatchingConfigError(
            f"train.min_snr_gamma: {train_cfg.min_snr_gamma} is a weighting for DDPM-style (epsilon / "
            f"v-prediction) models; {model_label} is trained with flow matching, so leave "
            "train.min_snr_gamma unset"
        )
    kind = (train_cfg.timestep_type or DEFAULT_TIMESTEP_TYPE).lower()
    if kind not in TIMESTEP_TYPES:
        raise FlowMatchingConfigError(
            f"train.timestep_type: {train_cfg.timestep_type!r} is not supported for flow matching "
            f"({model_label}); use one of {', '.join(TIMESTEP_TYPES)}"
        )


def time_shift(sigma: torch.Tensor, mu: float) -> torch.Tensor:
    """The exponential time shift of flow-matching schedulers: e^mu / (e^mu + 1/sigma - 1).

    Equal to s*sigma / (1 + (s - 1)*sigma) with s = e^mu; fixes 0 and 1, mu > 0 raises the rest.
    """
    s = math.exp(mu)
    return s * sigma / (1.0 + (s - 1.0) * sigma)


def resolution_shift(num_tokens: int, scheduler_config: Mapping[str, Any], max_shift: float = 1.15) -> float:
    """The resolution-dependent time shift mu of `num_tokens` image tokens that diffusers'
    flow-matching pipelines compute (calculate_shift: base_shift at base_image_seq_len rising
    linearly to max_shift at max_image_seq_len), from a scheduler config; `max_shift` is the
    pipeline's default when the config has none."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return float(
        calculate_shift(
            num_tokens,
            scheduler_config.get("base_image_seq_len", 256),
            scheduler_config.get("max_image_seq_len", 4096),
            scheduler_config.get("base_shift", 0.5),
            scheduler_config.get("max_shift", max_shift),
        )
    )


def sample_sigmas(
    batch: int,
    train_cfg: TrainConfig,
    generator: torch.Generator | None,
    *,
    mu: float | None = None,
    shift: float | None = None,
) -> torch.Tensor:
    """Per-sample noise levels sigma (B,), float32 on the CPU, drawn as the module docstring says.

    `mu` (a resolution-dependent time shift) or `shift` (a fixed one, mu = log(shift)) is used by
    timestep_type "shift"; with neither, "shift" is plain uniform.
    """
    kind = (train_cfg.timestep_type or DEFAULT_TIMESTEP_TYPE).lower()
    if kind not in TIMESTEP_TYPES:
        raise FlowMatchingConfigError(
            f"train.timestep_type: {train_cfg.timestep_type!r} is not supported for flow matching; "
            f"use one of {', '.join(TIMESTEP_TYPES)}"
        )
    # one uniform draw per sample, bent by content_or_style, then the type's quantile function:
    # the bias means the same for every type, and the same seed gives the same ranks
    u = content_or_style_bias(train_cfg.content_or_style, torch.rand(batch, generator=generator, dtype=torch.float64))
    if kind == "sigmoid":
        sigma = logit_normal(u)
    elif kind in ("linear", "uniform", "weighted"):
        sigma = u
    elif kind in SHIFT_TYPES:
        if mu is None and shift is not None:
            mu = math.log(shift)
        sigma = time_shift(u, mu) if mu is not None else u
    elif kind == "lognorm_blend":
        sigma = lognorm_blend(u)
    else:  # lognorm
        sigma = folded_lognormal(u)
    low = min(train_cfg.min_denoising_steps, NUM_TRAIN_TIMESTEPS - 1) / NUM_TRAIN_TIMESTEPS
    high = min(train_cfg.max_denoising_steps + 1, NUM_TRAIN_TIMESTEPS) / NUM_TRAIN_TIMESTEPS
    sigma = low + sigma.float() * (high - low)
    return sigma.clamp(min=SIGMA_MIN, max=1.0)


def noisy_and_target(
    latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_sigma, target) for latents (B, ...) and per-sample sigma (B,), in float32."""
    s = sigma.to(device=latents.device, dtype=torch.float32).view(-1, *([1] * (latents.ndim - 1)))
    x0 = latents.float()
    noise = noise.float()
    return (1.0 - s) * x0 + s * noise, noise - x0
