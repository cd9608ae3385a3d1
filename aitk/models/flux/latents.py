"""FLUX.1 latents as the transformer sees them: 2x2-patch tokens with FluxPipeline's position
ids, the VAE's shift and scale, and the resolution-dependent time shift of a token count.
"""

from __future__ import annotations

from typing import Any

import torch

from aitk.models.diffusers_parts import encode_scaled_latents


class FluxInputError(ValueError):
    """A batch or setting this FLUX model cannot train on (e.g. Kontext without controls)."""


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C) tokens of 2x2 patches (FluxPipeline's layout)."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise FluxInputError(f"FLUX latents need an even height and width, got {h}x{w}")
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(tokens: torch.Tensor, height: int, width: int, vae_scale_factor: int = 8) -> torch.Tensor:
    """Inverse of `pack_latents` for an image of height x width pixels."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(tokens, height, width, vae_scale_factor)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype, first: float = 0.0) -> torch.Tensor:
    """Position ids (h/2 * w/2, 3) of packed latents of h x w; `first` fills axis 0 (1 = Kontext's
    reference image)."""
    from diffusers import FluxPipeline

    ids = FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)
    if first:
        ids[..., 0] = first
    return ids


#: pixels in [-1, 1] -> FLUX's normalized latents, encoded in fp32 (the VAE's mode)
encode_flux_latents = encode_scaled_latents


def image_seq_shift(num_tokens: int, scheduler_config: Any) -> float:
    """FluxPipeline's mu for an image of `num_tokens` packed tokens (resolution-dependent shift)."""
    from aitk.models.flow_matching import resolution_shift

    return resolution_shift(num_tokens, scheduler_config)
