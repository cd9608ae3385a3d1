"""Choosing the checkpoint a run resumes from, and refusing one that does not fit the job."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aitk.config.schema import ProcessConfig
from aitk.trainer import checkpoint as ckpt


class IncompatibleCheckpoint(RuntimeError):
    pass


def run_signature(
    process: ProcessConfig,
    wrapped_modules: list[str],
    networks: list[str] | None = None,
    text_encoder_modules: list[str] | None = None,
) -> dict[str, Any]:
    """What must not change between a checkpoint and the job that resumes from it.

    `text_encoder_modules`: the text-encoder networks' modules (train.train_text_encoder; checkpoints
    written before they existed lack the key, so it is not compared with those)."""
    from aitk.networks.build import network_algo

    network = process.network
    return {
        "text_encoder_modules": len(text_encoder_modules or []),
        "networks": list(networks or ["main"]),
        "network_algo": network_algo(network.type, network.dora) if network else None,
        "optimizer": process.train.optimizer,
        "linear_rank": network.linear_rank if network else None,
        "conv_rank": network.conv_rank if network else None,
        "wrapped_modules": len(wrapped_modules),
        "arch": process.model.resolved_arch,
    }


def check_signature(saved: dict[str, Any] | None, current: dict[str, Any], folder: Path) -> None:
    if not saved:
        return
    changed = [
        f"{key}: {saved[key]!r} in the checkpoint, {current[key]!r} now"
        for key in current
        if key in saved and saved[key] != current[key]
    ]
    if changed:
        raise IncompatibleCheckpoint(
            f"the checkpoint {folder} was written by a different set-up ({'; '.join(changed)}). "
            "Resuming would mix them. Fix: change the settings back, give the job a new config.name, "
            f"or move {folder.parent} away to start over."
        )


def set_aside_newer(root: Path, step: int, warn: Callable[[str], None]) -> None:
    """Rename checkpoint folders newer than the one resumed from (they failed verification), so
    pruning never counts them and the user can still inspect them."""
    for info in ckpt.list_checkpoints(root):
        if info.step > step:
            target = info.path.with_name(f"{info.path.name}.damaged-{int(time.time())}")
            info.path.rename(target)
            warn(f"moved the unusable checkpoint {info.path.name} to {target.name}")


def choose_checkpoint(root: Path, *, is_main: bool, world_size: int, warn: Callable[[str], None]) -> ckpt.CheckpointInfo | None:
    """The newest complete checkpoint, chosen by the main process and shared with the others so
    every process resumes from the same step."""
    choice: list[Any] = [None]
    if is_main:
        ckpt.remove_stale_temp_dirs(root)
        found = ckpt.latest_complete_checkpoint(root, warn=warn)
        # every unusable folder goes aside (all of them when none is usable), so pruning never
        # counts a damaged folder as one of the newest saves
        set_aside_newer(root, found.step if found is not None else -1, warn)
        choice[0] = found
    if world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(choice, src=0)
    return choice[0]
