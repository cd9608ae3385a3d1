"""Flow-matching training timesteps for WAN: which sigmas a step trains on.

Every distribution here is a monotone map G of one uniform draw u in [0, 1):
    sigma = G(u) = F(b(u))
with b the train.content_or_style bias (increasing form) and F the train.timestep_type shape.
Because G is monotone, "only timesteps inside [low, high)" (an expert's range, or
min/max_denoising_steps) is exact and costs no rejection loop: u is drawn uniformly in
[G^-1(low), G^-1(high)), which is the distribution conditioned on the range. A resumed run draws
the same numbers, since each sample costs exactly one uniform from the trainer's generator.

Timesteps are sigma * 1000 (what WAN's transformer and diffusers' flow schedulers use).
ai-toolkit's further types (aitk.models.flow_timestep_types): flux_shift and lumina2_shift are
"shift" (WAN's scheduler has no resolution-dependent shift, so both use the flow shift),
lognorm_blend the log-normal / uniform mixture, weighted uniform draws whose loss the adapter
weights.
"""

from __future__ import annotations

import math

import torch

from aitk.models.flow_timestep_types import SHIFT_TYPES, lognorm_blend_cdf
from aitk.models.timestep_shapes import lognorm_blend

NUM_TRAIN_TIMESTEPS = 1000
#: timestep_type when the job leaves it unset: uniform draws, shifted like WAN's 480p schedule
DEFAULT_TIMESTEP_TYPE = "shift"
#: flow shift when neither model.model_kwargs.flow_shift nor the model's scheduler gives one
DEFAULT_FLOW_SHIFT = 3.0

TIMESTEP_TYPES = (
    "sigmoid", "linear", "uniform", "shift", "lognorm", "weighted", "flux_shift", "lumina2_shift", "lognorm_blend"
)


def _shift(s: torch.Tensor, shift: float) -> torch.Tensor:
    # the resolution shift of SD3 / WAN schedulers: pushes sigmas towards the noisy end
    return shift * s / (1.0 + (shift - 1.0) * s)


def _unshift(s: torch.Tensor, shift: float) -> torch.Tensor:
    return s / (shift - (shift - 1.0) * s)


def _logit_normal(u: torch.Tensor) -> torch.Tensor:
    # sigmoid of a standard normal, written as its quantile function so it stays monotone in u
    return torch.sigmoid(torch.special.ndtri(u))


def _logit_normal_inv(s: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(torch.logit(s))


def _folded_lognormal(u: torch.Tensor) -> torch.Tensor:
    # aitk.models.flow_matching's lognorm (1 - exp(z / 3) / e, clamped at 0; mean about 0.61),
    # with z = -ndtri(u) so that it rises with u
    return (1.0 - torch.exp(-torch.special.ndtri(u) / 3.0) / math.e).clamp(0.0, 1.0)


def _folded_lognormal_inv(s: torch.Tensor) -> torch.Tensor:
    if float(s) <= 0.0:
        return torch.zeros_like(s)  # the mass clamped to 0 lies below any positive sigma
    return torch.special.ndtr(-3.0 * (1.0 + torch.log1p(-s)))


def _bias(kind: str, u: torch.Tensor) -> torch.Tensor:
    # Same distributions as SD's timestep_bias (content: 1 - u^3, style: u^3), written increasing
    # in u (1 - (1 - u)^3 has the law of 1 - u^3) so ranges map to ranges.
    if kind == "content":
        return 1.0 - (1.0 - u) ** 3
    if kind == "style":
        return u**3
    return u


def _bias_inv(kind: str, f: torch.Tensor) -> torch.Tensor:
    if kind == "content":
        return 1.0 - (1.0 - f).clamp(min=0.0) ** (1.0 / 3.0)
    if kind == "style":
        return f.clamp(min=0.0) ** (1.0 / 3.0)
    return f


class FlowTimesteps:
    """The training-sigma distribution of one job.

    The shapes are those of aitk.models.flow_matching (FLUX), so a job means the same there:
    sigmoid = sigmoid of a standard normal (mid noise levels most); linear / uniform / weighted =
    uniform sigmas; shift / flux_shift / lumina2_shift = uniform sigmas through the flow shift
    (WAN's default); lognorm = the folded log-normal (mean about 0.61); lognorm_blend = 3/4 of it,
    1/4 uniform. content_or_style biases every shape.
    """

    def __init__(self, timestep_type: str | None, flow_shift: float, content_or_style: str = "balanced") -> None:
        kind = (timestep_type or DEFAULT_TIMESTEP_TYPE).lower()
        if kind not in TIMESTEP_TYPES:
            raise ValueError(f"train.timestep_type: {timestep_type!r} is not one of {', '.join(TIMESTEP_TYPES)}")
        if not (math.isfinite(flow_shift) and flow_shift > 0):
            raise ValueError(f"model.model_kwargs.flow_shift: {flow_shift!r} must be a positive number")
        self.kind = kind
        self.shift = float(flow_shift)
        self.bias = content_or_style

    def sigma(self, u: torch.Tensor) -> torch.Tensor:
        """G(u): the sigma of uniform draws u (float64 for exact range ends)."""
        f = _bias(self.bias, u)
        if self.kind == "sigmoid":
            return _logit_normal(f)
        if self.kind in SHIFT_TYPES:
            return _shift(f, self.shift)
        if self.kind == "lognorm":
            return _folded_lognormal(f)
        if self.kind == "lognorm_blend":
            return lognorm_blend(f)
        return f

    def quantile_of(self, sigma: float) -> float:
        """G^-1(sigma): the u at which the distribution reaches `sigma`."""
        s = torch.tensor(min(max(sigma, 0.0), 1.0), dtype=torch.float64)
        if self.kind == "sigmoid":
            f = _logit_normal_inv(s)
        elif self.kind in SHIFT_TYPES:
            f = _unshift(s, self.shift)
        elif self.kind == "lognorm":
            f = _folded_lognormal_inv(s)
        elif self.kind == "lognorm_blend":
            f = lognorm_blend_cdf(s)
        else:
            f = s
        return float(_bias_inv(self.bias, f).clamp(0.0, 1.0))

    def mass(self, low: float, high: float) -> float:
        """Probability of a timestep in [low, high) (timestep units)."""
        n = NUM_TRAIN_TIMESTEPS
        return max(0.0, self.quantile_of(high / n) - self.quantile_of(low / n))

    def draw(
        self,
        count: int,
        generator: torch.Generator | None,
        low: float = 0.0,
        high: float = float(NUM_TRAIN_TIMESTEPS),
        include_high: bool = True,
    ) -> torch.Tensor:
        """`count` float32 timesteps in [low, high] (high excluded unless include_high), on CPU.

        One uniform per sample from `generator`. Ends are enforced in float32, the precision the
        transformer and the expert switch compare in, so rounding never crosses a boundary.
        """
        n = NUM_TRAIN_TIMESTEPS
        if not low < high:
            raise ValueError(f"empty timestep range [{low}, {high})")
        u_low, u_high = self.quantile_of(low / n), self.quantile_of(high / n)
        u = torch.rand(count, generator=generator, dtype=torch.float64)
        t = (self.sigma(u_low + u * (u_high - u_low)) * n).to(torch.float32)
        lo = torch.tensor(low, dtype=torch.float32)
        hi = torch.tensor(high, dtype=torch.float32)
        if not include_high:
            hi = torch.nextafter(hi, torch.tensor(-math.inf))
        return torch.maximum(torch.minimum(t, hi), lo)
