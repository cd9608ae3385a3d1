"""Shapes of training-timestep distributions, shared by the DDPM and flow-matching objectives.

Each shape maps one uniform draw u in [0, 1) to a noise fraction f in [0, 1] (0 = clean, 1 = pure
noise) through its quantile function, so every map rises with u and one draw per sample keeps runs
reproducible. Flow matching uses f as sigma; DDPM models (SD 1.x / 2.x, SDXL) use f * 1000 as the
integer timestep. With z = Phi^-1(u) ~ N(0, 1):
    logit_normal       f = sigmoid(z)                          mass around 0.5 (timestep_type sigmoid)
    shifted            f = s*u / (1 + (s - 1)*u)               s > 1 moves mass to high noise (shift)
    folded_lognormal   f = clamp(1 - exp(-z / 3) / e, 0, 1)     ai-toolkit's log-normal(0, 1/3) read
                       as 1 - x / e: mode near 0.67, mean about 0.61 (lognorm)
    lognorm_blend      3/4 folded_lognormal + 1/4 uniform        ai-toolkit's lognorm_blend, as one
                       monotone quantile function (its CDF inverted by bisection)
content_or_style bends u before the shape: content 1 - u^3 (high noise), style u^3 (low noise).
"""

from __future__ import annotations

import math

import torch

#: standard deviation of the log-normal of lognorm / lognorm_blend
LOGNORM_STD = 1.0 / 3.0
#: weight of the log-normal part of lognorm_blend; the rest is uniform
LOGNORM_BLEND_WEIGHT = 0.75
# bisection steps of lognorm_blend's quantile: 2^-48 is below float64's use here
_BISECTION_STEPS = 48


def content_or_style_bias(content_or_style: str, u: torch.Tensor) -> torch.Tensor:
    """Bend uniform u in [0, 1): content favours high noise (1 - u^3), style low noise (u^3)."""
    if content_or_style == "content":
        return 1.0 - u**3
    if content_or_style == "style":
        return u**3
    return u


def logit_normal(u: torch.Tensor) -> torch.Tensor:
    """sigmoid(Phi^-1(u)): the logit-normal(0, 1) quantile."""
    return torch.sigmoid(torch.special.ndtri(u))


def shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The time shift of flow-matching schedulers: s*u / (1 + (s - 1)*u); fixes 0 and 1."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def folded_lognormal(u: torch.Tensor) -> torch.Tensor:
    """1 - exp(-z / 3) / e clamped to [0, 1], z = Phi^-1(u) (-z so that it rises with u)."""
    return (1.0 - torch.exp(-torch.special.ndtri(u) * LOGNORM_STD) / math.e).clamp(0.0, 1.0)


def _folded_lognormal_cdf(f: torch.Tensor) -> torch.Tensor:
    # P(folded_lognormal <= f) for f in [0, 1): the mass clamped to 0 sits at f = 0
    return torch.special.ndtr(-(1.0 + torch.log1p(-f)) / LOGNORM_STD)


def lognorm_blend(u: torch.Tensor) -> torch.Tensor:
    """Quantile of the mixture LOGNORM_BLEND_WEIGHT * folded_lognormal + the rest uniform."""
    w = LOGNORM_BLEND_WEIGHT
    u = u.to(torch.float64)
    low, high = torch.zeros_like(u), torch.ones_like(u)
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (low + high)
        below = w * _folded_lognormal_cdf(mid) + (1.0 - w) * mid < u
        low, high = torch.where(below, mid, low), torch.where(below, high, mid)
    return high
