"""ai-toolkit's flow-matching timestep types beyond the basic shapes, for FLUX
(aitk.models.flow_matching) and WAN (aitk.models.wan.flow) alike.

- flux_shift, lumina2_shift: ai-toolkit draws both exactly as "shift": uniform sigmas through the
  scheduler's time shift, resolution dependent where the scheduler shifts dynamically (FLUX: mu
  from the image token count), the fixed flow shift where it does not (WAN).
- lognorm_blend: aitk.models.timestep_shapes.lognorm_blend; `lognorm_blend_cdf` is its CDF, which
  WAN needs to confine draws to an expert's range.
- weighted: uniform sigmas, each sample's loss weighted by `weighted_loss` (ai-toolkit's
  "weighted": linear timesteps with a loss weight per timestep measured on Flex.1): a bell over
  sigma that favours high-mid noise: 0.65 at both ends, 1.5 at its peak (sigma 0.88), mean 1
  over uniform sigmas, so the loss keeps the scale it has with "linear".
"""

from __future__ import annotations

import math

import torch

from aitk.models.timestep_shapes import LOGNORM_BLEND_WEIGHT, LOGNORM_STD

SHIFT_TYPES = ("shift", "flux_shift", "lumina2_shift")

# weighted: floor + bump * k(sigma), k = sigma^3 (1 - sigma)^0.4 scaled to peak 1 (a beta-shaped
# bell, our fit to the shape of ai-toolkit's measured curve)
_BELL_A, _BELL_B = 3.0, 0.4
_FLOOR, _BUMP = 0.65, 0.85
_PEAK_SIGMA = _BELL_A / (_BELL_A + _BELL_B)
_PEAK = _PEAK_SIGMA**_BELL_A * (1.0 - _PEAK_SIGMA) ** _BELL_B
# mean of k over uniform sigma: the beta function B(a + 1, b + 1) over the peak
_MEAN_K = math.exp(math.lgamma(_BELL_A + 1) + math.lgamma(_BELL_B + 1) - math.lgamma(_BELL_A + _BELL_B + 2)) / _PEAK
_MEAN_WEIGHT = _FLOOR + _BUMP * _MEAN_K


def lognorm_blend_cdf(sigma: torch.Tensor) -> torch.Tensor:
    """P(S <= sigma) of lognorm_blend: the folded log-normal S = clamp(1 - exp(z / 3) / e, 0, 1)
    has S <= s  <=>  z >= 3 (1 + log(1 - s)) (at s = 0: the mass clamped there, about 0.13%)."""
    s = sigma.to(torch.float64).clamp(0.0, 1.0)
    edge = torch.where(s < 1.0, 1.0 + torch.log1p(-s.clamp(max=1.0 - 1e-15)), torch.full_like(s, -math.inf))
    lognormal = torch.special.ndtr(-edge / LOGNORM_STD)
    return LOGNORM_BLEND_WEIGHT * lognormal + (1.0 - LOGNORM_BLEND_WEIGHT) * s


def weighted_loss(sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights of timestep_type "weighted" for noise levels sigma (float32)."""
    s = sigma.to(torch.float64).clamp(0.0, 1.0)
    k = s**_BELL_A * (1.0 - s) ** _BELL_B / _PEAK
    return ((_FLOOR + _BUMP * k) / _MEAN_WEIGHT).to(torch.float32)
