"""The memory plan of a run (aitk.plan), computed in the background while the model loads, then
one log line and a warning when the device has less free memory than the plan needs.

On the CPU there is no device memory to run out of, so no plan is made (tests and CPU runs stay
quick); `aitk plan job.yaml` gives the same figures on any machine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from aitk.config.schema import JobFile, ProcessConfig


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device as the driver sees them (other processes included)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def shortfall_warning(plan: Any, free: int | None, job_hint: str) -> str | None:
    """The warning when `free` device bytes are fewer than the plan's peak, else None."""
    if free is None or plan.peak_device <= free:
        return None
    from aitk.plan.report import gib

    # a size `aitk plan --gpu-memory` reads back: whole GiB, or MiB below one GiB
    budget = f"{free // 2**30}GB" if free >= 2**30 else f"{max(1, free // 2**20)}MB"
    return (
        f"warning: the memory plan needs {gib(plan.peak_device)} on the device ({plan.peak_phase}) but "
        f"{gib(free)} is free: the run will likely run out of memory. `aitk plan {job_hint} --gpu-memory "
        f"{budget}` prints the cheapest settings that fit"
    )


class PlanCheck:
    """Plans one process entry of a job in a thread; `report()` waits for it and logs."""

    def __init__(self, job: JobFile, process: ProcessConfig, device: torch.device, job_hint: str,
                 log: Callable[[str], None]) -> None:
        self.job = job
        self.index = next(i for i, p in enumerate(job.config.process) if p is process)
        self.device = device
        self.job_hint = job_hint
        self.log = log
        self.plan: Any = None
        self.error: str | None = None
        self.free_at_start: int | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Before anything is placed on the device: note its free memory, start planning."""
        if self.device.type == "cpu":
            return
        self.free_at_start = free_device_memory(self.device)
        self._thread = threading.Thread(target=self._work, name="aitk-plan", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        from aitk.plan import PlanInputError, plan_job

        try:
            self.plan = plan_job(self.job, process_index=self.index)
        except PlanInputError as exc:
            self.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - the plan is advice; it never stops a run
            self.error = f"{type(exc).__name__}: {exc}"

    def report(self, timeout: float = 60.0) -> None:
        """Log the plan's line (and a shortfall warning) once it is ready."""
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.log("note: the memory plan is still being computed; see `aitk plan` for it")
            return
        if self.plan is None:
            self.log(f"note: no memory plan for this run ({self.error})")
            return
        self.log(self.plan.one_line())
        warning = shortfall_warning(self.plan, self.free_at_start, self.job_hint)
        if warning:
            self.log(warning)


def free_cached_memory(device: torch.device) -> None:
    """After an out-of-memory error: drop what the failed step left (its tensors are unreachable
    once the exception is handled) and hand the allocator's cache back to the driver."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_total_memory(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory)


def fit_advice(job: JobFile, process_index: int, budget: int | None) -> str | None:
    """The fix of an out-of-memory failure from the memory plan: the cheapest settings that fit
    in `budget` bytes (the device's memory), as job keys; None when there is no plan or no fit."""
    if budget is None:
        return None
    from aitk.plan import plan_job
    from aitk.plan.report import gib

    try:
        plan = plan_job(job, budget, process_index=process_index)
    except Exception:  # noqa: BLE001 - advice only (no plan for this model, ...): the failure is reported either way
        return None
    if not plan.suggestion:
        if plan.fits:
            return (f"the memory plan puts this run at {gib(plan.peak_device)} of {gib(budget)}: other processes on "
                    "the device or memory fragmentation took the rest; free the device, or lower train.batch_size")
        return plan.suggestion_note
    changes = ", ".join(f"{key}: {value}" for key, value in plan.suggestion.items())
    return (f"change in the job: {changes} (planned peak {gib(plan.suggestion_peak or 0)} of {gib(budget)}; "
            "`aitk plan JOB --gpu-memory <size>` shows the whole plan)")
