"""The state of an FSDP run in and out of checkpoints.

Two kinds (train.fsdp_state_dict_type, or the accelerate config's fsdp_state_dict_type):
- full: the weights, optimizer state and EMA are gathered on process 0 (in host memory, one tensor
  at a time) and written as a plain checkpoint (network.safetensors, optimizer.pt keyed by
  parameter path, ema.pt); on resume process 0 reads them and broadcasts each tensor to the shards.
- sharded: every process writes its own shards through torch.distributed.checkpoint into
  `<checkpoint>/sharded/`; nothing is gathered. It resumes with the same number of processes.
Either way fsdp.json records the kind and the number of processes, and every call here is a
collective: all processes make it, in the same order.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from aitk.trainer.fsdp import ShardedRun

SHARDED_DIR = "sharded"


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


# ---------------------------------------------------------------------------- full (gathered)
def full_optimizer_state(run: ShardedRun, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state gathered on process 0 in host memory ({} on the others)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(
        run.container, optimizer, options=_options(full_state_dict=True, cpu_offload=True)
    )


def load_full_optimizer_state(run: ShardedRun, optimizer: torch.optim.Optimizer, state: dict | None) -> None:
    """`state` is read on process 0 only; each tensor is broadcast and kept as this process's shard."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(
        run.container, optimizer, state if _rank() == 0 else {},
        options=_options(full_state_dict=True, broadcast_from_rank0=True),
    )


def full_ema_state(ema: Any) -> dict[str, Any] | None:
    """The EMA in the plain ema.pt layout, its shadows gathered on process 0 (None elsewhere)."""
    if ema is None:
        return None
    main = _rank() == 0
    shadow = {}
    for name, tensor in ema.shadow.items():
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        if main:
            shadow[name] = full.detach().to("cpu", copy=True)
        del full
    return {"decay": ema.decay, "num_updates": ema.num_updates, "shadow": shadow} if main else None


@torch.no_grad()
def load_full_ema_state(ema: Any, state: dict | None) -> None:
    """Process 0 passes the ema.pt content; every shadow is scattered to the shards."""
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    if ema is None:
        return
    main = _rank() == 0
    if main and state is not None:
        missing = sorted(set(ema.shadow) - set(state["shadow"]))
        if missing:
            raise KeyError(f"EMA state does not match the model: missing {missing[:5]}")
    meta = [(state["decay"], state["num_updates"]) if main and state is not None else None]
    dist.broadcast_object_list(meta, src=0)
    if meta[0] is None:
        return  # the checkpoint has no EMA: it starts from the current weights
    for name, shard in ema.shadow.items():
        source = state["shadow"][name] if main else torch.empty(shard.shape, dtype=shard.dtype)
        full = distribute_tensor(
            source.to(device=shard.device, dtype=shard.dtype), shard.device_mesh, shard.placements, src_data_rank=0
        )
        shard.to_local().copy_(full.to_local())
    ema.decay, ema.num_updates = float(meta[0][0]), int(meta[0][1])


# ---------------------------------------------------------------------------- sharded (DCP)
def _sharded_state(run: ShardedRun, optimizer: torch.optim.Optimizer, ema: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(run.container, optimizer)
    state: dict[str, Any] = {"model": model, "optimizer": optim}
    if ema is not None:
        state["ema"] = dict(ema.shadow)  # DTensors: saved and loaded in place, shard by shard
    return state


def save_sharded(run: ShardedRun, folder: Path, optimizer: torch.optim.Optimizer, ema: Any) -> None:
    """Every process writes its shards into `folder/sharded/` (a folder process 0 created)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_state(run, optimizer, ema), checkpoint_id=str(folder / SHARDED_DIR))


def load_sharded(run: ShardedRun, folder: Path, optimizer: torch.optim.Optimizer, ema: Any, info: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _sharded_state(run, optimizer, ema)
    dcp.load(state, checkpoint_id=str(folder / SHARDED_DIR))
    set_state_dict(run.container, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if ema is not None:
        ema.decay, ema.num_updates = float(info["ema"]["decay"]), int(info["ema"]["num_updates"])


# ---------------------------------------------------------------------------- the record
def fsdp_info(run: ShardedRun, ema: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"kind": run.settings.checkpoint, "world_size": run.world_size}
    if ema is not None:
        info["ema"] = {"decay": ema.decay, "num_updates": ema.num_updates}
    return info


def resume_fsdp(run: ShardedRun, folder: Path, content: Any, network: Any, optimizer: Any, ema: Any) -> None:
    """Load a checkpoint into the shards: by what the folder holds, whichever kind this run writes."""
    info = content.fsdp
    if info is None:
        raise ValueError(
            "it was written without FSDP (its optimizer state is not keyed by parameter path); resume it "
            "without FSDP, or start this FSDP run in a new folder"
        )
    if info["kind"] == "sharded":
        if info["world_size"] != run.world_size:
            raise ValueError(
                f"its sharded state was written by {info['world_size']} processes and this run has "
                f"{run.world_size}; resume with {info['world_size']} processes (full checkpoints, "
                "train.fsdp_state_dict_type: full, resume with any number)"
            )
        load_sharded(run, folder, optimizer, ema, info)
        return
    network.load_network_state_dict(content.network if _rank() == 0 else {})
    load_full_optimizer_state(run, optimizer, content.optimizer)
    load_full_ema_state(ema, content.ema)


def local_gradients(named_params: dict[str, Any]) -> dict[str, Any]:
    """Each parameter's gradient as this process's shard (for the gradient-stability metric, which
    samples signs: process 0's shards stand for the model, with no gathering)."""
    return {
        name: SimpleNamespace(grad=p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad)
        for name, p in named_params.items()
    }
