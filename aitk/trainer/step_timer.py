"""Where an optimizer step's time goes (`performance_log_every`): data, forward, backward, optimizer.

Off, every call is a no-op (no clock reads, no CUDA synchronization). On, CUDA is synchronized at
each phase boundary so a phase is charged with its own GPU work, not with its kernel launches
only. Offloaded blocks' host->device copies (`BlockOffloader.take_copy_seconds`) happen inside
forward and backward; their time is reported beside the phases, not added to them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any

import torch

PHASES = ("data", "forward", "backward", "optimizer")
#: the metrics-record fields of a timed step, in the order the log line shows them
FIELDS = tuple(f"time_{phase}_s" for phase in PHASES) + ("time_offload_s",)

_OFF = nullcontext()


class _Phase:
    """Adds the time between enter and exit to one phase of the current step."""

    def __init__(self, timer: "StepTimer", name: str) -> None:
        self.timer = timer
        self.name = name
        self.started = 0.0

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *_exc: Any) -> None:
        self.timer.sync()
        self.timer.seconds[self.name] += time.perf_counter() - self.started


class StepTimer:
    """Phase times of one optimizer step; accumulation micro-steps add up into the same phases.

    `offloaders` gives the run's `BlockOffloader`s (read at each step's end)."""

    def __init__(
        self, enabled: bool, device: torch.device, offloaders: Callable[[], Iterable[Any]] = lambda: (),
    ) -> None:
        self.enabled = enabled
        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self.offloaders = offloaders
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        if enabled:
            for offloader in offloaders():
                offloader.time_copies = True

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def begin_step(self) -> None:
        """Start a step: work queued before it (a preview, a save) is not charged to it."""
        if not self.enabled:
            return
        self.sync()
        self.seconds = dict.fromkeys(PHASES, 0.0)
        for offloader in self.offloaders():
            offloader.take_copy_seconds()  # copies outside the step (e.g. previews) do not count

    def phase(self, name: str) -> Any:
        """A context manager timing `name` (one of PHASES); a shared no-op when off."""
        if not self.enabled:
            return _OFF
        return _Phase(self, name)

    def end_step(self) -> dict[str, float]:
        """This step's fields (`time_<phase>_s`, `time_offload_s`); empty when off."""
        if not self.enabled:
            return {}
        record = {f"time_{phase}_s": seconds for phase, seconds in self.seconds.items()}
        record["time_offload_s"] = sum(o.take_copy_seconds() for o in self.offloaders())
        return record


def performance_line(records: list[dict[str, Any]], first_step: int, last_step: int) -> str:
    """One readable line: each phase's mean time per step over `records` (steps first..last, 1-based)."""
    def mean(key: str) -> float:
        values = [r[key] for r in records if r.get(key) is not None]
        return sum(values) / len(values) if values else 0.0

    step = mean("step_time_s")
    parts = []
    for phase in PHASES:
        seconds = mean(f"time_{phase}_s")
        share = f" ({100 * seconds / step:.0f}%)" if step > 0 else ""
        parts.append(f"{phase} {seconds:.3f} s{share}")
    span = f"step {last_step}" if first_step == last_step else f"steps {first_step}-{last_step}"
    offload = mean("time_offload_s")
    tail = f"; offload copies {offload:.3f} s (inside forward/backward)" if offload > 0 else ""
    return f"performance, {span}, mean per step: {', '.join(parts)}; step {step:.3f} s{tail}"
