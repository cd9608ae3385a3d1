"""Flex.2's extra transformer inputs: inpaint latents, inpaint mask and control latents.

Flex.2's x_embedder reads, per 2x2 patch, the noisy latents (C channels) followed by its
conditioning: the inpaint image latents with the area to fill zeroed (C), the inpaint mask (1 =
fill, 0 = keep) and a control image's latents (C); C = 16. "Nothing to inpaint" is zero latents
with an all-ones mask, "no control" zero latents (as upstream's Flex2 pipeline feeds them).

Training draws its inpaint masks and dropouts from the trainer's noise generator (so a resumed run
draws the same ones); what each model.model_kwargs option does is upstream's (Flex2Options).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from aitk.models.flex2.options import Flex2InputError, Flex2Options


def _chance(p: float, generator: torch.Generator | None) -> bool:
    """True with probability p (one draw only when p > 0, so unused options draw nothing)."""
    return p > 0.0 and float(torch.rand((), generator=generator)) < p


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def random_blob_masks(batch: int, height: int, width: int, generator: torch.Generator | None) -> torch.Tensor:
    """(B, 1, h, w) masks of a few smooth random blobs (1 inside), each covering 20-80 % of its image.

    Smooth noise on a coarse 4x4 grid, upsampled and cut at the quantile that gives the drawn cover.
    """
    masks = []
    for _ in range(batch):
        coarse = torch.randn(1, 1, 4, 4, generator=generator)
        field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
        cover = _uniform(0.2, 0.8, generator)
        cut = torch.quantile(field.flatten(), 1.0 - cover)
        masks.append((field > cut).float())
    return torch.cat(masks)


def _gaussian_kernel(size: int) -> torch.Tensor:
    # the sigma torchvision's gaussian_blur derives from a kernel size
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def random_blur(mask: torch.Tensor, generator: torch.Generator | None, p: float = 0.5) -> torch.Tensor:
    """With probability p, a Gaussian blur of an odd kernel size from 3 to 9 (latent pixels)."""
    if not _chance(p, generator):
        return mask
    size = int(torch.randint(3, 9, (), generator=generator)) | 1
    kernel = _gaussian_kernel(size).to(mask)
    pad = size // 2
    x = F.pad(mask, (pad, pad, pad, pad), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, size))
    return F.conv2d(x, kernel.view(1, 1, size, 1))


def random_dilate(mask: torch.Tensor, generator: torch.Generator | None, max_percent: float = 0.05) -> torch.Tensor:
    """Each sample's mask grown or shrunk a little: a box average over an odd window of up to
    max_percent of the width, cut at a random level from 0.2 to 0.8 (a window of 1 keeps it)."""
    largest = max(3, int(mask.shape[-1] * max_percent))
    out = []
    for sample in mask.split(1):
        size = int(torch.randint(1, largest, (), generator=generator))
        if size < 2:
            out.append(sample)
            continue
        size |= 1
        box = torch.full((1, 1, size, size), 1.0 / (size * size)).to(sample)
        averaged = F.conv2d(F.pad(sample, (size // 2,) * 4), box)
        out.append((averaged > _uniform(0.2, 0.8, generator)).to(sample.dtype))
    return torch.cat(out)


def blank_inpaint(latents: torch.Tensor) -> torch.Tensor:
    """(B, C + 1, h, w): nothing to inpaint (zero latents, the mask all ones)."""
    b, _, h, w = latents.shape
    return torch.cat([torch.zeros_like(latents), torch.ones(b, 1, h, w).to(latents)], dim=1)


def inpaint_input(latents: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, C + 1, h, w): the latents where `keep` (B, 1, h, w; 1 = keep) is 1, and the fill mask."""
    return torch.cat([latents * keep, 1.0 - keep], dim=1)


def training_inputs(
    latents: torch.Tensor,
    controls: torch.Tensor | None,
    options: Flex2Options,
    generator: torch.Generator | None,
    encode: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """(B, 2C + 1, h, w): one training batch's inpaint and control inputs.

    `controls`: the batch's control images in [-1, 1], (B, 3, H, W) or (B, K, 3, H, W) for K
    control folders (one of them is picked per batch); `encode` turns pixels into latents.
    """
    latents = latents.detach()
    dropped = _chance(options.inpaint_dropout, generator)
    _chance(options.inpaint_random_chance, generator)  # no inpaint image to replace: drawn, as upstream, only
    inpaint = blank_inpaint(latents)
    if options.do_random_inpainting and not dropped:
        b, _, h, w = latents.shape
        keep = 1.0 - random_blob_masks(b, h, w, generator).to(latents)
        if options.random_blur_mask:
            keep = random_blur(keep, generator)
        if _chance(options.invert_inpaint_mask_chance, generator):
            keep = 1.0 - keep
        cut = latents * keep
        if options.random_dialate_mask:
            keep = random_dilate(keep, generator)
        inpaint = torch.cat([cut, 1.0 - keep], dim=1)
    control = torch.zeros_like(latents)
    if controls is not None and not _chance(options.control_dropout, generator):
        if controls.ndim == 5:
            controls = controls[:, int(torch.randint(controls.shape[1], (), generator=generator))]
        if controls.shape[0] != latents.shape[0]:
            raise Flex2InputError(f"{controls.shape[0]} control images for a batch of {latents.shape[0]} latents")
        control = encode(controls).to(latents)
        if control.shape != latents.shape:
            raise Flex2InputError(
                f"control latents {tuple(control.shape)} do not match the image latents {tuple(latents.shape)}: "
                "give control images the size of their training images"
            )
    return torch.cat([inpaint, control], dim=1)


def conditioning_channels(latent_channels: int) -> int:
    """Channels Flex.2 reads besides the noisy latents: inpaint latents + mask + control latents."""
    return 2 * latent_channels + 1


def expected_in_channels(latent_channels: int) -> int:
    """x_embedder's input width of a Flex.2 transformer (2x2 patches of every input channel)."""
    return 4 * (latent_channels + conditioning_channels(latent_channels))


def check_transformer(config: Mapping[str, Any], label: str) -> int:
    """The latent channel count of a Flex.2 transformer config; Flex2InputError for a plain FLUX one."""
    out_channels = config.get("out_channels") or config.get("in_channels", 0)
    latent = int(out_channels) // 4
    if latent <= 0 or int(config.get("in_channels", 0)) != expected_in_channels(latent):
        raise Flex2InputError(
            f"model.name_or_path: this transformer takes {config.get('in_channels')} input channels and gives "
            f"{out_channels}; a {label} transformer takes {expected_in_channels(latent or 16)} (latents, inpaint "
            f"latents and mask, control latents in 2x2 patches) and gives {4 * (latent or 16)}: give a Flex.2 "
            "model (e.g. ostris/Flex.2-preview), or model.arch flux for FLUX.1 / Flex.1"
        )
    return latent


__all__ = [
    "Flex2InputError", "Flex2Options", "blank_inpaint", "check_transformer", "conditioning_channels",
    "expected_in_channels", "inpaint_input", "random_blob_masks", "random_blur", "random_dilate",
    "training_inputs",
]
