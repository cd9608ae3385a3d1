"""FSDP2 for full fine-tunes: the denoiser's parameters, gradients and optimizer state are sharded
over the processes, so a model that does not fit one device trains on several.

Switched on by the job (`train.fsdp: true`, launched with torchrun) or by the launcher
(`accelerate launch --config_file fsdp.yaml`, whose `distributed_type: FSDP` and `fsdp_*` keys
reach every process as FSDP_* environment variables). accelerate's FullyShardedDataParallelPlugin
reads those settings; the sharding itself is `torch.distributed.fsdp.fully_shard`, called here
directly: accelerate's `Accelerator.prepare` only takes the FSDP path on GPUs (with `use_cpu` its
state is MULTI_CPU and the plugin is dropped), and this trainer runs its own loop on CPU and GPU
alike, so the same code path is the one tested here with gloo.

Units: every repeated block of the denoiser (the entries of its top-level ModuleLists: UNet
down/up blocks, FLUX double and single transformer blocks, WAN blocks) is one FSDP unit, gathered
just before it runs and freed after; the root holds the rest (embeddings, mid block, heads).
accelerate's `fsdp_transformer_layer_cls_to_wrap` names other block classes instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from aitk.config.schema import ProcessConfig
from aitk.config.support import FSDP_OPTIMIZERS
from aitk.trainer.errors import TrainingAborted

CheckpointKind = Literal["full", "sharded"]
_KIND_NAMES: dict[str, CheckpointKind] = {
    "full": "full", "full_state_dict": "full",
    "sharded": "sharded", "sharded_state_dict": "sharded",
}


@dataclass(frozen=True)
class FsdpSettings:
    checkpoint: CheckpointKind  # full: gathered on rank 0; sharded: torch.distributed.checkpoint
    reshard_after_forward: bool  # free a block's gathered weights after its forward (less memory)
    offload_policy: Any  # torch's OffloadPolicy (CPUOffloadPolicy keeps shards in host memory)
    block_classes: tuple[str, ...]  # class names to shard as units; empty: the repeated blocks
    source: str  # what switched FSDP on, for the log

    def describe(self) -> str:
        from torch.distributed.fsdp import CPUOffloadPolicy

        offload = ", shards kept in host memory" if isinstance(self.offload_policy, CPUOffloadPolicy) else ""
        return (
            f"FSDP2 ({self.source}): {self.checkpoint} checkpoints, "
            f"reshard_after_forward {str(self.reshard_after_forward).lower()}{offload}"
        )


def launched_with_fsdp(env: dict[str, str] | None = None) -> bool:
    """`accelerate launch` with `distributed_type: FSDP` sets ACCELERATE_USE_FSDP in every process."""
    return (env if env is not None else os.environ).get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _checkpoint_kind(value: str, where: str) -> CheckpointKind:
    kind = _KIND_NAMES.get(str(value).lower())
    if kind is None:
        raise TrainingAborted(
            f"{where}: {value!r} is not a checkpoint kind FSDP can write here; use full "
            "(FULL_STATE_DICT) or sharded (SHARDED_STATE_DICT)"
        )
    return kind


def fsdp_job_problems(process: ProcessConfig) -> list[str]:
    """Why this job cannot train under FSDP (empty when it can). Also used by `aitk validate`."""
    problems = []
    if process.network is not None:
        problems.append(
            "FSDP shards full fine-tunes only: remove the network: section to fine-tune the whole model, "
            "or train the LoRA without FSDP (plain data parallel: torchrun / accelerate launch --multi_gpu)"
        )
    train = process.train
    if train.optimizer not in FSDP_OPTIMIZERS:
        problems.append(
            f"train.optimizer: {train.optimizer} does not run on sharded (DTensor) parameters yet; "
            f"use one of {', '.join(FSDP_OPTIMIZERS)} with FSDP"
        )
    if train.dtype in ("fp16", "float16"):
        problems.append("train.dtype: fp16 loss scaling is not sharded-aware; use bf16 (or fp32) with FSDP")
    model = process.model
    if model.quantize:
        problems.append("model.quantize: a full fine-tune trains full-precision weights; remove it with FSDP")
    extra = model.model_extra or {}
    if getattr(model, "layer_offloading", None) or extra.get("layer_offloading"):
        problems.append(
            "model.layer_offloading: block swapping and FSDP both decide where blocks live; "
            "use one of them (FSDP already keeps only a share of every block on each device)"
        )
    return problems


def resolve_fsdp(process: ProcessConfig, world_size: int, notes: list[str]) -> FsdpSettings | None:
    """The run's FSDP settings, or None when it trains unsharded. Job-file keys win over the
    launcher's; a job FSDP cannot train stops here, before any model loads."""
    train = process.train
    launched = launched_with_fsdp()
    wanted = train.fsdp if train.fsdp is not None else launched
    if not wanted:
        if launched:
            notes.append("the launcher asked for FSDP but the job sets train.fsdp: false; training unsharded")
        return None
    problems = fsdp_job_problems(process)
    if problems:
        raise TrainingAborted("FSDP cannot train this job:\n  " + "\n  ".join(problems))
    from torch.distributed.fsdp import OffloadPolicy

    kind: CheckpointKind = "full"
    reshard = True
    offload: Any = OffloadPolicy()
    classes: tuple[str, ...] = ()
    source = "train.fsdp"
    if launched:
        from accelerate.utils import FullyShardedDataParallelPlugin

        source = "accelerate config"
        plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* settings
        if plugin.fsdp_version != 2:
            raise TrainingAborted(
                f"the accelerate config asks for fsdp_version: {plugin.fsdp_version}; this trainer shards with "
                "FSDP2 - set fsdp_version: 2 in its fsdp_config"
            )
        kind = _checkpoint_kind(plugin.state_dict_type.name, "fsdp_config.fsdp_state_dict_type")
        reshard = bool(plugin.reshard_after_forward)
        offload = plugin.cpu_offload or OffloadPolicy()
        classes = tuple(plugin.transformer_cls_names_to_wrap or ())
    if train.fsdp_state_dict_type is not None:
        kind = _checkpoint_kind(train.fsdp_state_dict_type, "train.fsdp_state_dict_type")
    if train.fsdp_reshard_after_forward is not None:
        reshard = train.fsdp_reshard_after_forward
    if world_size < 2:
        notes.append(f"FSDP ({source}) with one process: nothing to shard, training unsharded")
        return None
    return FsdpSettings(kind, reshard, offload, classes, source)


# ---------------------------------------------------------------------------- sharding
def shard_units(module: nn.Module, blocks: list[nn.Module], class_names: tuple[str, ...] = ()) -> list[nn.Module]:
    """The modules to shard as units: the model's repeated blocks (`ModelAdapter.offload_blocks`,
    the same list layer offloading uses), or the modules of `class_names` innermost first."""
    if class_names:
        found = {type(m).__name__ for m in module.modules()}
        missing = [name for name in class_names if name not in found]
        if missing:
            raise TrainingAborted(
                f"fsdp_transformer_layer_cls_to_wrap: {', '.join(missing)} is not a module class of "
                f"{type(module).__name__}; name classes it has (or remove the key to shard its repeated blocks)"
            )
        # post-order: a nested match is sharded before the block that holds it
        ordered = list(module.modules())[::-1]
        return [m for m in ordered if m is not module and type(m).__name__ in class_names]
    return list(blocks)


def shard_module(module: nn.Module, blocks: list[nn.Module], settings: FsdpSettings, mesh: Any) -> int:
    """fully_shard each block, then the root; returns the number of block units."""
    from torch.distributed.fsdp import fully_shard

    units = 0
    for block in shard_units(module, blocks, settings.block_classes):
        if any(True for _ in block.parameters()):
            fully_shard(
                block, mesh=mesh, reshard_after_forward=settings.reshard_after_forward,
                offload_policy=settings.offload_policy,
            )
            units += 1
    # the root's own reshard setting is left to torch (it keeps the root's small remainder gathered
    # between forward and backward rather than gathering it again first thing in backward)
    fully_shard(module, mesh=mesh, offload_policy=settings.offload_policy)
    return units


class ShardedRun:
    """The sharded denoisers of a run (one per trained expert) and their mesh."""

    def __init__(self, settings: FsdpSettings, modules: dict[str, nn.Module], device: torch.device,
                 blocks: Callable[[nn.Module], list[nn.Module]]) -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        self.settings = settings
        self.world_size = dist.get_world_size()
        self.mesh = init_device_mesh(device.type, (self.world_size,))
        self.units = {
            name: shard_module(module, blocks(module), settings, self.mesh) for name, module in modules.items()
        }
        # one module over every expert: the optimizer's state is named by its parameters' paths in it
        self.container = nn.ModuleDict(modules)

    def reshard(self) -> None:
        """Free every gathered copy. An inference forward (previews) leaves the root's weights
        gathered for a backward that never comes; the next training forward would use that copy,
        stale once the shards change under it (the EMA weights swapped out after previews)."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.container.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    @property
    def full_checkpoints(self) -> bool:
        return self.settings.checkpoint == "full"

    def describe(self) -> str:
        units = ", ".join(f"{n}: {u} blocks + root" for n, u in self.units.items())
        return f"{self.settings.describe()}; {self.world_size} shards; units {units}"
