"""The DDPM training batch the SD families and PixArt share: noise (with train.noise_offset),
integer timesteps drawn by train.timestep_type on the model's schedule (aitk.models.sd.timesteps),
the variance-preserving forward process of a DDPMScheduler, target noise (epsilon) or velocity
(v_prediction), and min-SNR weights with train.min_snr_gamma."""

from __future__ import annotations

from typing import Any

import torch

from aitk.config.schema import TrainConfig
from aitk.models.base import NoisyBatch


def ddpm_noisy_batch(scheduler: Any, latents: torch.Tensor, train_cfg: TrainConfig, generator: torch.Generator | None,
                     label: str, dtype: torch.dtype, alphas_cumprod: torch.Tensor | None = None) -> NoisyBatch:
    """NoisyBatch of `latents` on `scheduler` (a DDPMScheduler); `label` names the model in
    timestep errors, `alphas_cumprod` (default: the scheduler's) weighs min-SNR."""
    from aitk.models.noise import apply_noise_offset, min_snr_weights
    from aitk.models.sd.timesteps import draw_timesteps

    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device)
    noise = apply_noise_offset(noise, train_cfg.noise_offset, generator)
    num_train = scheduler.config.num_train_timesteps
    timesteps = draw_timesteps(batch, train_cfg, generator, num_train, label).to(latents.device)
    latents = latents.to(torch.float32)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    weights = None
    if train_cfg.min_snr_gamma:
        alphas = scheduler.alphas_cumprod if alphas_cumprod is None else alphas_cumprod
        weights = min_snr_weights(timesteps, alphas, train_cfg.min_snr_gamma, prediction_type)
    return NoisyBatch(noisy.to(dtype), timesteps, target, weights)
