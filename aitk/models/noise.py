"""Parts of the training objective every DDPM or flow-matching family shares: train.noise_offset
and train.min_snr_gamma's per-sample loss weights.

Adapters draw them in make_noisy_batch; they live here, below both adapters and trainer, so that
adapters never import aitk.trainer (imports point down).
"""

from __future__ import annotations

import torch

_PREDICTION_ALIASES = {
    "epsilon": "epsilon",
    "eps": "epsilon",
    "v_prediction": "v_prediction",
    "v": "v_prediction",
    "v_pred": "v_prediction",
    "sample": "sample",
    "x0": "sample",
}


def min_snr_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-gamma loss weights (B,), float32, on timesteps' device.

    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t]) (what diffusers' compute_snr gives);
    epsilon: min(snr, gamma) / snr; v_prediction: min(snr, gamma) / (snr + 1);
    sample (x0): min(snr, gamma). Only for DDPM-style (discrete-timestep) schedules.
    """
    if gamma is None or float(gamma) <= 0:
        raise ValueError(f"train.min_snr_gamma: {gamma!r} must be > 0 (leave it unset to disable)")
    kind = _PREDICTION_ALIASES.get(str(prediction_type).lower())
    if kind is None:
        raise ValueError(
            f"min_snr_gamma needs an epsilon, v_prediction or sample model; got prediction type "
            f"{prediction_type!r} (flow-matching models: leave train.min_snr_gamma unset)"
        )
    ac = alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)
    t = timesteps.reshape(-1).round().long().clamp(0, ac.shape[0] - 1)
    a = ac[t]
    snr = a / (1.0 - a)  # inf where alphas_cumprod == 1
    clipped = torch.clamp(snr, max=float(gamma))
    if kind == "epsilon":
        w = clipped / snr
    elif kind == "v_prediction":
        w = clipped / (snr + 1.0)
    else:
        w = clipped
    return torch.nan_to_num(w, nan=1.0).float()


def apply_noise_offset(
    noise: torch.Tensor, offset: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """noise + offset * randn(B, C, 1, 1[, 1]): one random shift per sample and channel.
    offset 0 returns `noise` itself (same object)."""
    if not offset:
        return noise
    if noise.ndim < 2:
        raise ValueError(f"noise must be (B, C, ...), got shape {tuple(noise.shape)}")
    shape = tuple(noise.shape[:2]) + (1,) * (noise.ndim - 2)
    device = generator.device if generator is not None else noise.device
    shift = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return noise + float(offset) * shift.to(device=noise.device, dtype=noise.dtype)
