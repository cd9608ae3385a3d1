"""FLUX.2 latents as the transformer sees them.

The VAE (AutoencoderKLFlux2) encodes to 32 channels at 1/8 of the image size; FLUX.2 takes 2x2
patches of those (128 channels at 1/16) and normalises each with the VAE's batch-norm running
statistics. Those normalised patch latents (B, 4C, H/16, W/16) are what NoisyBatch holds and the
loss compares; the transformer gets them as one token per position, with the pipeline's
4-axis position ids (time, row, column, layer).
"""

from __future__ import annotations

from typing import Any

import torch

from aitk.models import common


def _bn_stats(vae: Any, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(ref.device, ref.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(ref.device, ref.dtype)
    return mean, std


def encode_latents(vae: Any, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> normalised patch latents (B, 4C, H/16, W/16), in fp32 (the
    mode of the latent distribution, as the pipeline encodes reference images)."""
    from diffusers import Flux2Pipeline

    latents = Flux2Pipeline._patchify_latents(common.encode_mode(vae, pixels, device))
    mean, std = _bn_stats(vae, latents)
    return (latents - mean) / std


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Normalised patch latents (B, 4C, h, w), or the VAE's own latents (B, C, 2h, 2w) as
    Flux2KleinPipeline returns them, -> pixels (B, 3, H, W) in about [-1, 1], in fp32."""
    from diffusers import Flux2Pipeline

    latents = latents.to(vae.device, torch.float32)
    if latents.shape[1] != vae.config.latent_channels:
        mean, std = _bn_stats(vae, latents)
        latents = Flux2Pipeline._unpatchify_latents(latents * std + mean)
    return vae.decode(latents).sample


def pack(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, h, w) -> tokens (B, h*w, C) and their position ids (B, h*w, 4)."""
    from diffusers import Flux2Pipeline

    return Flux2Pipeline._pack_latents(latents), Flux2Pipeline._prepare_latent_ids(latents).to(latents.device)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack`: (B, h*w, C) -> (B, C, h, w)."""
    return tokens.permute(0, 2, 1).reshape(tokens.shape[0], tokens.shape[2], h, w)


def text_ids(hidden: torch.Tensor) -> torch.Tensor:
    """The text tokens' position ids (B, L, 4), as the pipeline gives them."""
    from diffusers import Flux2Pipeline

    return Flux2Pipeline._prepare_text_ids(hidden).to(hidden.device)
