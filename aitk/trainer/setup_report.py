"""`logging.verbose`: set-up details in log.txt: where each model part lives and in which dtype,
and what each optimizer group trains."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch


def _tensor_summary(tensors: list[torch.Tensor]) -> str:
    """'12,345 parameters in 24 tensors, float32 on cpu' (mixed dtypes / devices are listed)."""
    count = sum(t.numel() for t in tensors)
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in tensors)
    devices = Counter(str(t.device) for t in tensors)
    return (
        f"{count:,} parameters in {len(tensors)} tensors, "
        f"{'/'.join(sorted(dtypes))} on {'/'.join(sorted(devices))}"
    )


def part_lines(placement: Any) -> list[str]:
    """One line per placed model part: residency, parameters, dtypes, devices, offloaded blocks."""
    lines = []
    for name, part in placement.parts.items():
        tensors = list(part.module.parameters())
        where = "resident" if part.resident else "parked (on the device while used)"
        offload = ""
        if part.offloader is not None:
            offload = f", {part.offloader.offloaded_count} of {part.offloader.block_count} blocks offloaded"
        lines.append(f"verbose: model part {name}: {where}, {_tensor_summary(tensors)}{offload}")
    return lines


def optimizer_lines(optimizer: torch.optim.Optimizer, network: Any) -> list[str]:
    """One line per optimizer group: its expert, the modules it trains, its tensors and lr."""
    lines = [f"verbose: optimizer {type(optimizer).__name__}, {len(optimizer.param_groups)} parameter group(s)"]
    handles = dict(network.items())
    for index, group in enumerate(optimizer.param_groups):
        expert = group.get("expert")
        handle = handles.get(expert) if expert is not None else (network.first if len(handles) == 1 else None)
        modules = f"{len(handle.wrapped_module_names())} modules, " if handle is not None else ""
        which = f" ({expert} expert)" if expert else ""
        lines.append(
            f"verbose: group {index}{which}: {modules}{_tensor_summary(list(group['params']))}, lr {group['lr']:.3g}"
        )
    return lines


def setup_lines(trainer: Any) -> list[str]:
    """Everything `logging.verbose` adds once set-up is done."""
    session = trainer.session
    cfg = trainer.train_cfg
    lines = [
        f"verbose: device {session.device}, weights {str(session.weight_dtype).removeprefix('torch.')}, "
        f"mixed precision {session.mixed_precision}, process {session.rank} of {session.world_size}",
        f"verbose: {cfg.steps} steps, batch size {cfg.batch_size}, accumulation {cfg.accumulation_steps}, "
        f"lr scheduler {cfg.lr_scheduler}, gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}",
    ]
    lines += part_lines(trainer.placement)
    lines += optimizer_lines(trainer.optimizer, trainer.network)
    return lines
