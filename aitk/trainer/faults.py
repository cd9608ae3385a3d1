"""Fault injection for the failure tests (docs/reliability.md): `AITK_FAULT`, read once per process.

A comma-separated list of faults:
  nan@K       the loss is NaN at every step from step K (0-based)
  nan@KxN     the loss is NaN the first N times a step >= K runs (a rollback gets past it)
  oom@K       the step K raises torch.OutOfMemoryError inside its forward pass
  enospc@K    writing the checkpoint of step K fails with "No space left on device" (after its
              files are written, before it is committed)
  erofs@K     the same with "Read-only file system"
  free=BYTES  the disk check before training sees this many free bytes

Without AITK_FAULT every hook is a dictionary lookup that finds nothing.
"""

from __future__ import annotations

import errno
import os
from functools import cache
from pathlib import Path

import torch

ENV = "AITK_FAULT"


@cache
def _faults() -> dict[str, str]:
    parsed: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in os.environ.get(ENV, "").split(","))):
        key, _, value = item.partition("@") if "@" in item else item.partition("=")
        parsed[key] = value
    return parsed


_nan_left: list[int] = []  # the NaN budget of nan@KxN, counted down in this process


def poison_loss(loss: torch.Tensor, step: int) -> torch.Tensor:
    spec = _faults().get("nan")
    if spec is None:
        return loss
    start, _, times = spec.partition("x")
    if step < int(start):
        return loss
    if times:
        if not _nan_left:
            _nan_left.append(int(times))
        if _nan_left[0] <= 0:
            return loss
        _nan_left[0] -= 1
    return loss * float("nan")  # keeps the graph: backward gives NaN gradients too


def raise_out_of_memory(step: int) -> None:
    spec = _faults().get("oom")
    if spec is not None and step == int(spec):
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB (injected by AITK_FAULT for a test)"
        )


def refuse_checkpoint_write(step: int, folder: Path) -> None:
    for kind, code in (("enospc", errno.ENOSPC), ("erofs", errno.EROFS)):
        spec = _faults().get(kind)
        if spec is not None and step == int(spec):
            raise OSError(code, os.strerror(code), str(folder / "optimizer.pt"))


def free_space(real: int) -> int:
    spec = _faults().get("free")
    return real if spec is None else int(spec)
