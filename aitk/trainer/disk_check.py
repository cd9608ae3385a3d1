"""Free space before training: room for two checkpoints and the previews, or a reason io failure.

A checkpoint holds the trained weights in fp32 (network.safetensors, and ema.pt with EMA), the
optimizer state, and the step's LoRA file (or model folder) in save.dtype; the final LoRA adds one
more file. Previews are counted at their uncompressed size (an upper bound for PNG / JPEG; videos at
a quarter of it, for the mp4 and WebP together).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from aitk.trainer import faults
from aitk.trainer.errors import TrainingAborted

FP32 = 4


@dataclass(frozen=True)
class SpaceNeeded:
    checkpoint: int  # bytes of one checkpoint with its step LoRA file
    final_files: int  # the final LoRA file(s)
    previews: int  # every preview the run will write

    @property
    def total(self) -> int:
        return 2 * self.checkpoint + self.final_files + self.previews


def checkpoint_bytes(params: list[torch.Tensor], optimizer: str, save_element_size: int, ema: bool) -> tuple[int, int]:
    """(one checkpoint with its step file, one saved file) for these trained tensors."""
    from aitk.plan.optimizer_state import total_state_bytes

    count = sum(p.numel() for p in params)
    try:
        state = total_state_bytes(optimizer, [(tuple(p.shape), FP32) for p in params])
    except ValueError:  # an optimizer the plan does not know: Adam's two moments
        state = 2 * FP32 * count
    saved = count * save_element_size
    return count * FP32 * (2 if ema else 1) + state + saved, saved


def preview_bytes(sizes: list[tuple[int, int, int]], rounds: int) -> int:
    """`sizes`: (width, height, frames) of each preview prompt; `rounds`: how often they are drawn."""
    one_round = sum(w * h * 3 if frames <= 1 else w * h * 3 * frames // 4 for w, h, frames in sizes)
    return one_round * rounds


def preview_rounds(total_steps: int, sample_every: int | None, start_step: int = 0) -> int:
    """The first preview, one every sample_every steps from start_step, and the last one."""
    if not sample_every:
        return 2
    return 2 + max(0, total_steps - start_step) // sample_every


def check_free_space(folder: Path, needed: SpaceNeeded) -> None:
    """TrainingAborted (reason io) when `folder`'s disk has less free space than `needed.total`."""
    from aitk.plan.report import gib

    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = faults.free_space(shutil.disk_usage(probe).free)
    if free >= needed.total:
        return
    raise TrainingAborted(
        f"not enough free space for {folder}: {gib(free)} free, {gib(needed.total)} needed (two checkpoints of "
        f"{gib(needed.checkpoint)}, the final files {gib(needed.final_files)} and up to {gib(needed.previews)} of "
        "previews)",
        reason="io",
        fix=f"free {gib(needed.total - free)} on that disk or point training_folder at a disk with more room; fewer "
            "or smaller previews (sample.sample_every, sample.width / height) need less",
    )


def element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()
