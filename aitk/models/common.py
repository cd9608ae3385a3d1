"""Helpers the model adapters share: where a model comes from, module placement, VAE round trips.

Kept apart from `aitk.models.base` (the adapter interface) so that the interface stays readable;
every adapter family (SD 1.5 / SDXL, FLUX, WAN) uses these instead of its own copy.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch


def offline_note() -> str:
    """The hint load errors append when HF_HUB_OFFLINE is set, else "".

    Read at call time, not import time, so a change of the variable after import is seen.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "; HF_HUB_OFFLINE is set, so only hub models already in the cache can be used"
    return ""


def could_be_hub_id(source: str) -> bool:
    """Whether `source` has the form of a hub id (exactly owner/name, not a relative or absolute
    path), so a missing local path of that form is looked up on the hub instead of refused."""
    return source.count("/") == 1 and not source.startswith((".", "/", "~"))


def freeze(modules: Iterable[torch.nn.Module]) -> None:
    """No gradients and eval mode: the base model's parts are never trained, only the network."""
    for module in modules:
        module.requires_grad_(False)
        module.eval()


def cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast in place (on the host), only when needed: diffusers warns on every dtype cast."""
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)


def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent along each side of an AutoencoderKL (each block after the first halves)."""
    return vae_scale_from_config(vae.config)


def vae_scale_from_config(config: Mapping[str, Any], default: int = 8) -> int:
    """`vae_scale_factor` from an AutoencoderKL config (`default` when it names no blocks)."""
    blocks = config.get("block_out_channels")
    return 2 ** (len(blocks) - 1) if blocks else default


def encode_mode(vae: Any, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The VAE's latent distribution mode for pixels in [-1, 1], encoded in fp32.

    fp32 because fp16 VAEs overflow; the mode (not a sample) because it is deterministic, so cached
    latents and resumed runs agree.
    """
    pixels = pixels.to(device, dtype=torch.float32, non_blocking=True)
    with torch.no_grad():  # the VAE is never trained: no graph to record
        return vae.encode(pixels).latent_dist.mode()


def pixels_to_pil(pixels: torch.Tensor, scale_factor: int) -> list[Any]:
    """Decoded image batches (B, 3, H, W) in about [-1, 1] as PIL images, as the pipelines return them."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=scale_factor).postprocess(pixels, output_type="pil")
