"""The speed switches of train: (docs/training.md, "Speed"): TF32 matmuls, channels-last UNets and
regional compilation of the denoiser's repeated blocks. Each leaves the losses as they are, within
float tolerance (tests/test_speed_switches.py).
"""

from __future__ import annotations

from typing import Any

import torch


def apply_tf32(enabled: bool, device: torch.device) -> str | None:
    """TF32 for float32 matmuls and convolutions on Ampere or newer GPUs; a note of what is used."""
    if device.type != "cuda":
        return None
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    major, _ = torch.cuda.get_device_capability(device)
    if enabled and major < 8:
        return "train.allow_tf32: this GPU predates Ampere (no TF32); float32 matmuls run in full precision"
    return None


def apply_channels_last(denoiser: torch.nn.Module, enabled: bool) -> str | None:
    """Convolution weights in channels-last layout (UNets: faster convolutions on tensor cores);
    a note when the denoiser has no 2-D convolutions to benefit."""
    if not enabled:
        return None
    if not any(isinstance(m, torch.nn.Conv2d) for m in denoiser.modules()):
        return "train.channels_last: the denoiser has no 2-D convolutions; nothing changes"
    denoiser.to(memory_format=torch.channels_last)
    return None


def compile_blocks(blocks: list[torch.nn.Module], **options: Any) -> int:
    """Compile each repeated block on its own (regional compilation, diffusers' way: the blocks its
    `_repeated_blocks` names, as `ModelAdapter.offload_blocks` finds them): a far shorter warm-up than
    compiling the whole model, and the LoRA layers inside a block compile with it. Returns the count."""
    for block in blocks:
        block.compile(**options)
    return len(blocks)
