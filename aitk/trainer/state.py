"""What goes into a checkpoint folder, and reading it back.

Files: network.safetensors (fp32 network weights), optimizer.pt, lr_scheduler.pt, ema.pt (when EMA
is on), grad_scaler.pt (fp16), health.pt (previous gradient signs), rng.pt (one entry per process),
trainer_state.json (step, data position, counters, stability EMAs, alpha scheduler state).
FSDP runs add fsdp.json (checkpoint kind, process count); their sharded checkpoints hold sharded/
(torch.distributed.checkpoint: weights, optimizer state, EMA) instead of network.safetensors,
optimizer.pt and ema.pt (aitk/trainer/fsdp_state.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class TrainerState:
    """The small, JSON-able part of the run state."""

    step: int = 0  # optimizer steps completed
    data: dict[str, Any] = field(default_factory=dict)
    nonfinite_in_a_row: int = 0
    nonfinite_steps: int = 0  # updates skipped for a non-finite loss or gradient, over the run
    nan_rollbacks: int = 0  # train.nan_policy rollback: how many so far
    lr_factor: float = 1.0  # the learning rate's scale after rollbacks (0.5 per rollback)
    # What must match when resuming (optimizer, ranks, wrapped modules); see trainer/resume.py.
    signature: dict[str, Any] = field(default_factory=dict)
    # Training health: stability EMAs and the alpha scheduler's state (trainer/health.py).
    health: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        raw = json.loads(text)
        return cls(**{key: raw[key] for key in cls.__dataclass_fields__ if key in raw})


@dataclass
class CheckpointContent:
    state: TrainerState
    network: dict[str, torch.Tensor] | None  # None: in sharded/ (FSDP) or not read on this process
    optimizer: dict[str, Any] | None  # likewise
    lr_scheduler: dict[str, Any]
    rng_per_rank: list[dict[str, Any]]
    ema: dict[str, Any] | None = None
    grad_scaler: dict[str, Any] | None = None
    health: dict[str, Any] | None = None  # previous gradient signs per expert (health.pt)
    fsdp: dict[str, Any] | None = None  # fsdp.json: kind and process count of an FSDP run


def write_content(folder: Path, content: CheckpointContent) -> None:
    from safetensors.torch import save_file

    if content.network is not None:
        network = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in content.network.items()}
        save_file(network, str(folder / "network.safetensors"))
    if content.optimizer is not None:
        torch.save(content.optimizer, folder / "optimizer.pt")
    torch.save(content.lr_scheduler, folder / "lr_scheduler.pt")
    torch.save(content.rng_per_rank, folder / "rng.pt")
    if content.ema is not None:
        torch.save(content.ema, folder / "ema.pt")
    if content.grad_scaler is not None:
        torch.save(content.grad_scaler, folder / "grad_scaler.pt")
    if content.health is not None:
        torch.save(content.health, folder / "health.pt")
    if content.fsdp is not None:
        (folder / "fsdp.json").write_text(json.dumps(content.fsdp, indent=1))
    (folder / "trainer_state.json").write_text(content.state.to_json())


def read_content(folder: Path, *, model_state: bool = True) -> CheckpointContent:
    """`model_state=False` leaves out the weights, optimizer state and EMA (an FSDP process other
    than the first: it receives them from the first)."""
    from safetensors.torch import load_file

    # Our own files: full unpickling is needed for optimizer states of third-party optimizers.
    def load(name: str) -> Any:
        return torch.load(folder / name, map_location="cpu", weights_only=False)

    def load_optional(name: str) -> Any:
        return load(name) if (folder / name).exists() else None

    network_file = folder / "network.safetensors"
    fsdp_file = folder / "fsdp.json"
    return CheckpointContent(
        state=TrainerState.from_json((folder / "trainer_state.json").read_text()),
        network=load_file(str(network_file)) if model_state and network_file.is_file() else None,
        optimizer=load_optional("optimizer.pt") if model_state else None,
        lr_scheduler=load("lr_scheduler.pt"),
        rng_per_rank=load("rng.pt"),
        ema=load_optional("ema.pt") if model_state else None,
        grad_scaler=load_optional("grad_scaler.pt"),
        health=load_optional("health.pt"),
        fsdp=json.loads(fsdp_file.read_text()) if fsdp_file.is_file() else None,
    )
