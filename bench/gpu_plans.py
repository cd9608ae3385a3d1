"""The plan's estimate beside each measurement: `aitk.plan.plan_job` on the case's job.

On the GPU machine plans are computed in separate processes (spawned before any weight is
built) while the GPU runs the cases: a plan traces a step on fake tensors, pure Python work
that would otherwise slow the thread launching kernels. The dry run computes them inline.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

from gpu_cases import load_job


def plan_summary(job: dict[str, Any]) -> dict[str, Any]:
    """The figures of `plan_job(job)` the report puts beside the measurement, or {"error": ...}."""
    import os
    import time

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    try:
        from aitk.plan import plan_job

        plan = plan_job(load_job(job))
        step = plan.step
        return {
            "step_total": step.total,
            "weights": step.weights,
            "trainable": step.trainable,
            "optimizer": step.optimizer,
            "gradients": step.gradients,
            "activations": step.activations,
            "workspace": step.workspace,
            "peak_device": plan.peak_device,
            "peak_phase": plan.peak_phase,
            "peak_host": plan.peak_host,
            "flops_per_step": plan.flops_per_step,
            "trainable_parameters": plan.trainable_parameters,
            "setup": plan.setup,
            "one_line": plan.one_line(),
            "seconds": round(time.perf_counter() - started, 2),
        }
    except Exception as exc:  # noqa: BLE001 - a plan that fails is reported beside the case
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return {"error": f"{type(exc).__name__}: {first}"[:400]}


def _quiet_worker() -> None:
    import torch

    torch.set_num_threads(1)  # fake tensors compute nothing; leave the cores to the benchmark


class PlanService:
    """submit(case id, job) now; ready() / wait() for the summaries later.

    mode "process": a pool of spawned processes; "inline": computed at submit; "off": none."""

    def __init__(self, mode: str = "process", workers: int = 2) -> None:
        self.mode = mode
        self.results: dict[str, dict[str, Any]] = {}
        self._pending: dict[str, Any] = {}
        self._pool = None
        if mode == "process":
            context = multiprocessing.get_context("spawn")  # never fork a process that uses CUDA
            self._pool = context.Pool(processes=max(1, workers), initializer=_quiet_worker)

    def submit(self, case_id: str, job: dict[str, Any]) -> None:
        if self.mode == "inline":
            self.results[case_id] = plan_summary(job)
        elif self._pool is not None:
            self._pending[case_id] = self._pool.apply_async(plan_summary, (job,))

    def ready(self) -> dict[str, dict[str, Any]]:
        """Every summary finished so far."""
        for case_id, pending in list(self._pending.items()):
            if pending.ready():
                self.results[case_id] = pending.get()
                del self._pending[case_id]
        return self.results

    def wait(self, seconds: float) -> dict[str, dict[str, Any]]:
        """Wait up to `seconds` in all for the rest; what is still running is marked so."""
        import time

        end = time.monotonic() + max(0.0, seconds)
        for case_id, pending in list(self._pending.items()):
            pending.wait(max(0.0, end - time.monotonic()))
        self.ready()
        for case_id in self._pending:
            self.results[case_id] = {"error": "the plan did not finish within the time budget"}
        self._pending.clear()
        return self.results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()  # unfinished plans are abandoned, not waited for
            self._pool.join()
            self._pool = None
