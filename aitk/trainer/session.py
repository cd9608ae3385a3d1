"""Where a run lives and what it runs on: output paths, processes, device and precision."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from aitk.config.schema import ProcessConfig

if TYPE_CHECKING:
    from aitk.trainer.fsdp import FsdpSettings

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def torch_dtype(name: str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    return _DTYPES[name] if name else default


@dataclass(frozen=True)
class RunPaths:
    root: Path
    name: str

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def log(self) -> Path:
        return self.root / "log.txt"

    @property
    def metrics(self) -> Path:
        return self.root / f"metrics_{self.name}.jsonl"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def lora_file(self, step: int | None) -> Path:
        suffix = "" if step is None else f"_{step:09d}"
        return self.root / f"{self.name}{suffix}.safetensors"


@dataclass
class Session:
    """The process-level facts of a run, resolved once through accelerate."""

    device: torch.device
    weight_dtype: torch.dtype
    mixed_precision: str  # "no" | "bf16" | "fp16"
    rank: int
    world_size: int
    notes: list[str]
    fsdp: "FsdpSettings | None" = None  # sharded full fine-tune (aitk/trainer/fsdp.py)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> AbstractContextManager:
        if self.mixed_precision == "no":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.weight_dtype)

    def grad_scaler(self) -> "torch.amp.GradScaler | None":
        """fp16 needs loss scaling; bf16 and fp32 do not."""
        return torch.amp.GradScaler(self.device.type) if self.mixed_precision == "fp16" else None


def _want_cpu(device: str | None) -> bool:
    if device is None:
        return not torch.cuda.is_available() and not torch.backends.mps.is_available()
    return device == "cpu"


def start_session(process: ProcessConfig) -> Session:
    """Resolve device and processes through accelerate (it joins the process group under
    torchrun / accelerate launch). Precision is per job, so it is not accelerate's global state:
    several jobs with different dtypes can run one after another in one process."""
    from accelerate import PartialState

    notes: list[str] = []
    requested = process.device
    if requested and requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device: {requested!r} was requested but CUDA is not available on this machine; "
            "set `device: cpu` (or remove the key to pick automatically)"
        )
    weight_dtype = torch_dtype(process.train.dtype)
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(weight_dtype, "no")
    cpu = _want_cpu(requested)
    if cpu and mixed == "fp16":
        notes.append("train.dtype fp16 is not supported on CPU; training in fp32 instead")
        weight_dtype, mixed = torch.float32, "no"
    if cpu and mixed == "bf16":
        notes.append("train.dtype bf16 on CPU is several times slower than fp32 on most CPUs")
    state = PartialState(cpu=cpu)
    device = state.device
    if requested and requested.startswith("cuda:") and state.num_processes == 1:
        device = torch.device(requested)  # an explicit GPU index in a single-process run
        torch.cuda.set_device(device)
    elif requested == "mps":
        device = torch.device("mps")
    if os.environ.get("OMP_NUM_THREADS") is None and state.num_processes > 1 and cpu:
        torch.set_num_threads(1)  # two threads per process on a small CPU collapse throughput
    from aitk.trainer.fsdp import resolve_fsdp

    fsdp = resolve_fsdp(process, state.num_processes, notes)  # a job FSDP cannot train stops here
    return Session(
        device=device,
        weight_dtype=weight_dtype,
        mixed_precision=mixed,
        rank=state.process_index,
        world_size=state.num_processes,
        notes=notes,
        fsdp=fsdp,
    )
