"""Qwen-Image's latent space and training noise levels.

- Latents: the Qwen-Image VAE (a causal 3-D VAE, as WAN's) encodes an image as a one-frame video;
  the denoiser sees (latent - latents_mean) / latents_std per channel, frame axis dropped:
  (B, 16, H/8, W/8).
- Tokens: 2x2 patches of those latents, (B, H/16 * W/16, 64), in QwenImagePipeline's layout, with
  `img_shapes` [(1, H/16, W/16)] per sample for the transformer's RoPE.
- Noise levels (ai-toolkit's flowmatch training for Qwen-Image): the shift types ("shift",
  "flux_shift", "lumina2_shift") use the resolution-dependent time shift of the scheduler config,
  mu = calculate_shift(image token count) (base_shift 0.5 at 256 tokens to max_shift 0.9 at 8192;
  a scheduler without dynamic shifting: mu = log(shift)),
  then the scheduler's `shift_terminal` stretch, which maps the schedule's lowest level (the shift
  of 1/1000) onto shift_terminal (0.02) and keeps 1 at 1:
      sigma' = 1 - (1 - sigma) * (1 - terminal) / (1 - shift(1/1000)),
  kept at or above terminal (the schedule's range).
  The other types draw as for every flow-matching model (aitk.models.flow_matching).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from aitk.config.schema import TrainConfig
from aitk.models import common

#: the transformer's patch side: tokens are 2x2 patches of the latents
PATCH = 2


class QwenImageInputError(ValueError):
    """A batch or setting this Qwen-Image model cannot train on."""


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C) tokens of 2x2 patches (QwenImagePipeline's layout)."""
    from diffusers import QwenImagePipeline

    b, c, h, w = latents.shape
    if h % PATCH or w % PATCH:
        raise QwenImageInputError(f"Qwen-Image latents need an even height and width, got {h}x{w}")
    return QwenImagePipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_latents` for latents of h x w: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, n, packed = tokens.shape
    c = packed // (PATCH * PATCH)
    tokens = tokens.view(b, h // PATCH, w // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return tokens.reshape(b, c, h, w)


def img_shapes(batch: int, h: int, w: int) -> list[list[tuple[int, int, int]]]:
    """The transformer's `img_shapes` for `batch` latents of h x w: one frame of h/2 x w/2 tokens."""
    return [[(1, h // PATCH, w // PATCH)]] * batch


def _stats(vae: Any, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean, device=ref.device, dtype=ref.dtype).view(1, cfg.z_dim, 1, 1)
    std = torch.tensor(cfg.latents_std, device=ref.device, dtype=ref.dtype).view(1, cfg.z_dim, 1, 1)
    return mean, std


def encode_latents(vae: Any, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> normalised latents (B, 16, H/8, W/8), in fp32 (the mode of
    the latent distribution: deterministic, so cached latents and resumed runs agree)."""
    latents = common.encode_mode(vae, pixels.unsqueeze(2), device).squeeze(2)
    mean, std = _stats(vae, latents)
    return (latents - mean) / std


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B, 16, h, w) -> pixels (B, 3, 8h, 8w) in about [-1, 1], in fp32."""
    latents = latents.to(vae.device, torch.float32)
    mean, std = _stats(vae, latents)
    return vae.decode((latents * std + mean).unsqueeze(2)).sample[:, :, 0]


def image_seq_shift(num_tokens: int, scheduler_config: Mapping[str, Any]) -> float:
    """QwenImagePipeline's mu for `num_tokens` image tokens (its calculate_shift)."""
    from aitk.models.flow_matching import resolution_shift

    return resolution_shift(num_tokens, scheduler_config)


def stretch_to_terminal(sigma: torch.Tensor, mu: float, terminal: float) -> torch.Tensor:
    """The scheduler's shift_terminal stretch (module docstring) of time-shifted levels `sigma`."""
    from aitk.models.flow_matching import NUM_TRAIN_TIMESTEPS, time_shift

    lowest = float(time_shift(torch.tensor(1.0 / NUM_TRAIN_TIMESTEPS, dtype=torch.float64), mu))
    return 1.0 - (1.0 - sigma) * (1.0 - terminal) / (1.0 - lowest)


def training_sigmas(
    batch: int,
    latent_hw: tuple[int, int],
    train_cfg: TrainConfig,
    scheduler_config: Mapping[str, Any],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Per-sample noise levels (B,) for latents of `latent_hw`, float32 (module docstring)."""
    from aitk.models.flow_matching import DEFAULT_TIMESTEP_TYPE, SIGMA_MIN, sample_sigmas
    from aitk.models.flow_timestep_types import SHIFT_TYPES

    h, w = latent_hw
    if scheduler_config.get("use_dynamic_shifting", True):
        mu = image_seq_shift((h // PATCH) * (w // PATCH), scheduler_config)
    else:  # a fixed shift s: mu = log(s)
        mu = math.log(float(scheduler_config.get("shift", 1.0)))
    sigma = sample_sigmas(batch, train_cfg, generator, mu=mu)
    terminal = scheduler_config.get("shift_terminal")
    if terminal and (train_cfg.timestep_type or DEFAULT_TIMESTEP_TYPE).lower() in SHIFT_TYPES:
        # draws below the schedule's lowest level (u < 1/1000) stay at its end, as on the grid
        sigma = stretch_to_terminal(sigma, mu, float(terminal)).clamp(min=max(float(terminal), SIGMA_MIN), max=1.0)
    return sigma.float()


class QwenLatentsMixin:
    """Images through Qwen-Image's VAE (per-channel normalised) and previews from its 2x2-packed
    tokens, for the adapters on that VAE (Qwen-Image, Krea 2); put before FlowTransformerAdapter."""

    vae: Any
    device: torch.device
    vae_scale_factor: int

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_latents(self.vae, pixels, self.device)

    def _unpack_preview(self, latents: torch.Tensor) -> torch.Tensor:
        height, width = self._preview_pixel_size(latents.shape[1])  # type: ignore[attr-defined]
        return unpack_latents(latents, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def _decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, latents)
