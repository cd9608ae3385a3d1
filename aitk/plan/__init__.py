"""Memory plan of a training job without weights or a GPU (`aitk plan`, docs/memory.md).

    from aitk.plan import plan_job
    plan = plan_job("job.yaml", gpu_memory=24 * 2**30)
    print(plan.one_line())      # plan: 17.9 GiB device peak (training step), ...; fits in 24.0 GiB
    plan.to_dict()              # what `aitk plan --json` prints

The job's model is built at real size on fake tensors from its configs (a local folder's, or the
public configs shipped in configs/ for known hub ids), with the job's dtype, quantization,
network and checkpointing; one training step at the largest bucket is traced under a memory
tracker; the residency rules of offloading, low_vram and caching place each part.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aitk.plan.errors import PlanInputError
from aitk.plan.report import MemoryPlan, parse_size

if TYPE_CHECKING:
    from pathlib import Path

    from aitk.config.schema import JobFile

__all__ = ["MemoryPlan", "PlanInputError", "parse_size", "plan_job"]


def plan_job(job: "str | Path | JobFile", gpu_memory: int | None = None, *, process_index: int = 0) -> MemoryPlan:
    """See aitk.plan.planner.plan_job (imported here lazily: it pulls in torch and diffusers)."""
    from aitk.plan.planner import plan_job as _plan_job

    return _plan_job(job, gpu_memory, process_index=process_index)
