"""Timing, memory and FLOP measurement for bench/gpu.py, and the guard around each case.

- `DeviceOps`: synchronize, peak-memory statistics and cache release of the device (CUDA), or
  no-ops on the CPU (the dry run), so the same code measures on both.
- `StepFlopCounter`: the FLOPs of what runs inside it, by torch.utils.flop_counter's formulas.
- `time_steps`: warm-up steps (the first one counted: what the step computes, recomputation
  included), then timed steps between synchronizations, stopping early at a soft deadline.
- `guarded`: runs one case with a hard time limit (SIGALRM) and turns out-of-memory, time-outs
  and other errors into a status, so one case never stops the run.
- `matmul_peak`: the card's bf16 matrix rate, measured, for model FLOPs utilisation.
"""

from __future__ import annotations

import gc
import signal
import statistics
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CaseTimeout(Exception):
    """The case ran past its hard time limit."""


class DeviceOps:
    """Synchronization and memory statistics of one device (CUDA); the CPU has none of them."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def peak_allocated(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def peak_reserved(self) -> int | None:
        return torch.cuda.max_memory_reserved(self.device) if self.cuda else None

    def release(self) -> None:
        """Return what the allocators cache (device memory, pinned host memory) between cases."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            host_empty = getattr(torch._C, "_host_emptyCache", None)
            if host_empty is not None:
                host_empty()

    def describe(self) -> dict[str, Any]:
        if not self.cuda:
            return {"device": "cpu"}
        props = torch.cuda.get_device_properties(self.device)
        return {
            "device": str(self.device),
            "gpu": torch.cuda.get_device_name(self.device),
            "gpu_memory_bytes": props.total_memory,
            "multiprocessors": props.multi_processor_count,
            "compute_capability": f"{props.major}.{props.minor}",
        }


class StepFlopCounter(TorchDispatchMode):
    """FLOPs of the ops run inside (forward, backward, recomputation), by torch's own formulas.

    Not FlopCounterMode itself: its per-module tracking keeps tensors alive through backward
    (aitk.plan measured a FLUX step's workspace 4x larger under it), which would inflate, or
    run out of, the very memory this benchmark measures."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        from aitk.plan.tracker import flop_formulas  # the plan's table: bench and plan count alike

        self._formulas = flop_formulas()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self._formulas.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        return out


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def matmul_peak(ops: DeviceOps, dtype: torch.dtype, size: int, repeats: int, warm_seconds: float = 0.5) -> float:
    """FLOP/s of a size x size x size matrix product in `dtype` on random data (random data, not
    zeros: the rate depends on the values through power). Products run for `warm_seconds` first
    (an idle GPU's clocks need that to rise), then the best of three rounds of `repeats`
    products timed between synchronizations."""
    a = torch.randn(size, size, device=ops.device).to(dtype)
    b = torch.randn(size, size, device=ops.device).to(dtype)
    warm_until = time.perf_counter() + warm_seconds
    while True:
        torch.mm(a, b)
        ops.sync()
        if time.perf_counter() > warm_until:
            break
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        ops.sync()
        best = min(best, (time.perf_counter() - start) / repeats)
    del a, b
    return 2.0 * size**3 / best


@dataclass
class StepTimes:
    warmup: list[float] = field(default_factory=list)
    timed: list[float] = field(default_factory=list)
    flops: int | None = None  # StepFlopCounter's count of the first warm-up step
    loss: float | None = None
    cut_short: bool = False  # the soft deadline stopped the timed steps early

    @property
    def median(self) -> float | None:
        return statistics.median(self.timed) if self.timed else None


def time_steps(
    step: Callable[[int], torch.Tensor],
    *,
    warmup: int,
    timed: int,
    ops: DeviceOps,
    deadline: float | None = None,
    count_flops: bool = True,
    times: StepTimes | None = None,
) -> StepTimes:
    """Run `step(i)` (returns the loss) `warmup` then `timed` times; each timed step is wrapped
    in synchronizations. Once `deadline` (time.monotonic) passes, no further timed step starts
    after the first. Errors propagate; `times` (when given) keeps what was measured so far."""
    out = times if times is not None else StepTimes()
    for i in range(warmup):
        ops.sync()
        start = time.perf_counter()
        if i == 0 and count_flops:
            counter = StepFlopCounter()
            with counter:
                loss = step(i)
            out.flops = counter.flops
        else:
            loss = step(i)
        ops.sync()
        out.warmup.append(time.perf_counter() - start)
    for i in range(timed):
        if out.timed and deadline is not None and time.monotonic() > deadline:
            out.cut_short = True
            break
        ops.sync()
        start = time.perf_counter()
        loss = step(warmup + i)
        ops.sync()
        out.timed.append(time.perf_counter() - start)
    if warmup + len(out.timed):
        out.loss = float(loss.detach().float().item())
    return out


@contextmanager
def hard_limit(seconds: float | None) -> Iterator[None]:
    """Raise CaseTimeout in the main thread after `seconds` (SIGALRM; a no-op elsewhere).

    Python runs the handler between bytecodes, so a long CUDA call finishes first; the case's
    work is abandoned and its memory released by the caller."""
    usable = seconds is not None and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(_signum: int, _frame: Any) -> None:
        raise CaseTimeout(f"ran past its limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(float(seconds), 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Outcome:
    status: str  # "ok" | "OOM" | "timeout" | "error"
    value: Any = None  # what the body returned (status ok)
    note: str = ""
    seconds: float = 0.0
    detail: str = ""  # the traceback of an error, for the JSON


def guarded(body: Callable[[], Any], limit: float | None, ops: DeviceOps) -> Outcome:
    """Run `body()` under a hard time limit; out of memory, time-out and errors become a status.

    The exception (and the frames holding the case's tensors) is dropped before the device
    caches are released, so the next case starts from an empty device."""
    start = time.monotonic()
    outcome: Outcome
    try:
        with hard_limit(limit):
            value = body()
        outcome = Outcome("ok", value)
    except CaseTimeout as exc:
        outcome = Outcome("timeout", note=str(exc))
    except Exception as exc:  # noqa: BLE001 - every failure of one case is that case's result
        if is_oom(exc):
            outcome = Outcome("OOM", note=_first_line(exc))
        else:
            outcome = Outcome("error", note=f"{type(exc).__name__}: {_first_line(exc)}",
                              detail="".join(traceback.format_exception(exc))[-4000:])
    outcome.seconds = time.monotonic() - start
    ops.release()
    return outcome


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
