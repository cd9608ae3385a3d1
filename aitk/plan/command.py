"""`aitk plan job.yaml [--gpu-memory 24GB] [--json]`: print the plan; exit 1 with one message on bad input."""

from __future__ import annotations

import json
import sys
from typing import Any

EXIT_OK, EXIT_BAD = 0, 1


def _quiet_libraries() -> None:
    """The plan's output is the report: library chatter at import (torchao's optional kernels,
    torch's pytree deprecation, transformers' torchvision fallbacks) is not for this command."""
    import logging

    for name in ("torchao", "torch.utils._pytree", "transformers", "diffusers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
    except ImportError:
        pass


def plan_command(jobs: list[str], gpu_memory: str | None, as_json: bool, process_index: int = 0) -> int:
    from aitk.plan import PlanInputError, parse_size, plan_job

    _quiet_libraries()
    budget = None
    if gpu_memory is not None:
        try:
            budget = parse_size(gpu_memory)
        except ValueError as exc:
            print(f"--gpu-memory: {exc}", file=sys.stderr)
            return EXIT_BAD
    results: list[dict[str, Any]] = []
    status = EXIT_OK
    for job in jobs:
        try:
            plan = plan_job(job, budget, process_index=process_index)
        except PlanInputError as exc:
            print(f"error: {job}: {exc}", file=sys.stderr)
            status = EXIT_BAD
            continue
        if as_json:
            results.append(plan.to_dict())
        else:
            print(plan.render())
    if as_json:
        print(json.dumps(results[0] if len(results) == 1 and len(jobs) == 1 else results, indent=1))
    return status
