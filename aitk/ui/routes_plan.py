"""The memory plan before Start (docs/ui.md, "Memory plan"): `aitk plan` for the web UI.

    POST /api/plan              {yaml | config, gpu_ids?, gpu_memory?}  a job being edited (unsaved)
    GET  /api/jobs/{id}/plan    ?gpu_memory=                            a stored job, with its gpu_ids

Both answer 200 with `{"ok": true, "plan", "budget", "suggested", "cached", "seconds"}` or
`{"ok": false, "error", "problems", "budget"}`: a plan that cannot be made (unknown model, missing
folder, invalid job) is an answer about the job, not a failure of the request.

Planning builds the model on fake tensors and traces a step: 1-30 s of CPU. It runs in one of
FastAPI's worker threads (the routes are plain `def`; the server keeps answering), one plan at a
time (two at once only slow each other down on the same cores), and finished plans are kept per
(job YAML hash, budget), so polling pages and the editor's repeated checks cost nothing after the
first. Only a budget or GPU list that cannot be read is refused (400).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel

from aitk.ui import jobspec, system
from aitk.ui.context import Context, ctx
from aitk.ui.routes_jobs import GPU_IDS_RE
from aitk.ui.security import Refused

router = APIRouter(tags=["plan"])
log = logging.getLogger(__name__)

GIB = 2**30
DEFAULT_BUDGET = 24 * GIB  # the card most presets are written for
CACHE_SIZE = 64


class PlanBody(BaseModel):
    yaml: str | None = None
    config: dict[str, Any] | None = None
    gpu_ids: str | None = None
    gpu_memory: str | int | None = None  # "24GB", "16000MB" or bytes; empty: the GPU's total, else 24 GB


# ------------------------------------------------------------------------------------ budget


@dataclass
class Budget:
    bytes: int
    source: str  # "set" (by the request), "gpu" (the job's GPU), "default" (24 GB)
    gpu: dict[str, Any] | None = None  # {index, name, memory_total} of the GPU it came from
    note: str | None = None  # why there is no GPU figure, when that is worth saying

    def to_json(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "source": self.source, "gpu": self.gpu, "note": self.note}


def parse_budget(value: str | int | None) -> int | None:
    """A budget from the request: None / "" -> None (automatic), else bytes > 0, or Refused (400)."""
    from aitk.plan.report import parse_size  # no torch import

    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, int):
        size = value
    else:
        try:
            size = parse_size(value)
        except ValueError as exc:
            raise Refused(f"gpu_memory: {exc}") from None
    if size <= 0:
        raise Refused(f"gpu_memory: {value!r} is not more than 0; give the GPU's memory, e.g. 24GB")
    return size


def _gpu_indices(gpu_ids: str) -> list[int] | None:
    """The GPUs a job may use: None for 'cpu', [] when not chosen (all visible), else the numbers."""
    value = (gpu_ids or "").replace(" ", "")
    if value.lower() == "cpu":
        return None
    if not GPU_IDS_RE.match(value):
        raise Refused(f"gpu_ids {gpu_ids!r} is not valid: use GPU numbers separated by commas, e.g. 0 or 0,1, "
                      "'cpu' for none, or leave it empty for the default")
    return [int(part) for part in value.split(",")] if value else []


def resolve_budget(gpu_memory: str | int | None, gpu_ids: str) -> Budget:
    """The budget set in the request; else the total memory of the job's GPU (the smallest of its
    GPUs: each process has one); else 24 GB, with a note saying why."""
    explicit = parse_budget(gpu_memory)
    wanted = _gpu_indices(gpu_ids)
    if explicit is not None:
        return Budget(explicit, "set")
    if wanted is None:
        return Budget(DEFAULT_BUDGET, "default", note="the job runs on the CPU (GPUs: cpu); set the GPU memory to plan for")
    found = system.gpus()
    if not found:
        return Budget(DEFAULT_BUDGET, "default",
                      note="no GPU information on this server (no NVIDIA GPU or nvidia-ml-py); set your GPU's memory")
    by_index = {g["index"]: g for g in found}
    # not chosen: every GPU stays visible and a single process trains on the first one
    indices = wanted or [min(by_index)]
    missing = [i for i in indices if i not in by_index]
    if missing:
        return Budget(DEFAULT_BUDGET, "default",
                      note=f"GPU {', '.join(map(str, missing))} is not on this server (GPUs: "
                           f"{', '.join(map(str, sorted(by_index)))}); fix the job's GPUs or set the GPU memory")
    gpu = min((by_index[i] for i in indices), key=lambda g: g["memory_total"])
    return Budget(int(gpu["memory_total"]), "gpu",
                  gpu={"index": gpu["index"], "name": gpu["name"], "memory_total": gpu["memory_total"]})


# ------------------------------------------------------------------------------------ suggestion


def _flatten(changes: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"quantize": True}} and {"model.quantize": True} alike -> dotted keys."""
    out: dict[str, Any] = {}
    for key, value in changes.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def apply_suggestion(data: dict[str, Any], suggestion: dict[str, Any]) -> dict[str, Any]:
    """The job data with the plan's suggestion merged into its (only) process entry. Keys are
    relative to the process (model.quantize, train.batch_size); datasets.* applies to every dataset."""
    data = copy.deepcopy(data)
    process = data["config"]["process"][0]
    for dotted, value in _flatten(suggestion).items():
        section, *rest = dotted.split(".")
        if not rest:
            process[section] = copy.deepcopy(value)
            continue
        if section == "datasets":
            targets = [d for d in process.get("datasets") or [] if isinstance(d, dict)]
        else:
            if not isinstance(process.get(section), dict):
                process[section] = {}
            targets = [process[section]]
        for node in targets:
            for key in rest[:-1]:
                if not isinstance(node.get(key), dict):
                    node[key] = {}
                node = node[key]
            node[rest[-1]] = copy.deepcopy(value)
    return data


def _suggested_job(data: dict[str, Any], suggestion: dict[str, Any] | None, training_folder: Path) -> dict[str, Any] | None:
    """{yaml, config} of the job with the suggestion applied (what "Apply" puts in the editor)."""
    if not suggestion:
        return None
    try:
        prepared = jobspec.prepare(apply_suggestion(data, suggestion), training_folder)
    except (jobspec.JobInputError, KeyError, IndexError, TypeError) as exc:
        problems = exc.problems if isinstance(exc, jobspec.JobInputError) else [str(exc)]
        return {"yaml": None, "config": None, "problems": problems}
    return {"yaml": prepared.yaml, "config": prepared.data, "problems": []}


# ------------------------------------------------------------------------------------ planning


class PlanCache:
    """Finished plan answers by (YAML hash, budget), newest kept; one plan computed at a time.

    Plans that fail are not kept: their cause (a missing folder, a model not downloaded yet) is
    usually fixed outside the job text.
    """

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self._size = size
        self._answers: OrderedDict[tuple[str, int], dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()  # guards _answers
        self._planning = threading.Lock()  # one plan at a time

    def _get(self, key: tuple[str, int]) -> dict[str, Any] | None:
        with self._lock:
            answer = self._answers.get(key)
            if answer is not None:
                self._answers.move_to_end(key)
            return answer

    def _put(self, key: tuple[str, int], answer: dict[str, Any]) -> None:
        with self._lock:
            self._answers[key] = answer
            self._answers.move_to_end(key)
            while len(self._answers) > self._size:
                self._answers.popitem(last=False)

    def plan(self, prepared: jobspec.PreparedJob, budget: Budget, training_folder: Path) -> dict[str, Any]:
        """Blocking: call from a worker thread."""
        key = (hashlib.sha256(prepared.yaml.encode()).hexdigest(), budget.bytes)
        found = self._get(key)
        if found is None:
            with self._planning:
                found = self._get(key)  # the same job may have been planned while this one waited
                if found is None:
                    answer = _compute(prepared, budget, training_folder)
                    if not answer["ok"]:
                        return answer
                    self._put(key, answer)
                    return {**answer, "cached": False}
        return {**found, "cached": True, "budget": budget.to_json()}


def _compute(prepared: jobspec.PreparedJob, budget: Budget, training_folder: Path) -> dict[str, Any]:
    from aitk import plan as planning
    from aitk.plan.report import suggestion_yaml

    started = time.monotonic()
    try:
        memory_plan = planning.plan_job(prepared.loaded.job, budget.bytes)
    except planning.PlanInputError as exc:
        return failure(str(exc), budget)
    except Exception as exc:  # noqa: BLE001 - a bug in the planner: say so on the page, never a 500
        log.exception("memory plan of job %r failed", prepared.name)
        first = str(exc).splitlines()[0] if str(exc) else ""
        return failure(f"the memory plan failed ({type(exc).__name__}: {first}); the server log has the "
                       "details. Please report this with the job file", budget)
    data = memory_plan.to_dict()
    data["one_line"] = memory_plan.one_line()
    data["suggestion_yaml"] = suggestion_yaml(memory_plan.suggestion) if memory_plan.suggestion else None
    return {
        "ok": True,
        "plan": data,
        "budget": budget.to_json(),
        "suggested": _suggested_job(prepared.data, memory_plan.suggestion, training_folder),
        "seconds": round(time.monotonic() - started, 2),
    }


def failure(message: str, budget: Budget | None, problems: list[str] | None = None) -> dict[str, Any]:
    return {"ok": False, "error": message, "problems": problems or [],
            "budget": budget.to_json() if budget else None}


_CACHE_LOCK = threading.Lock()


def plans(request: Request) -> PlanCache:
    """The app's plan cache, made on first use."""
    with _CACHE_LOCK:
        cache = getattr(request.app.state, "plan_cache", None)
        if cache is None:
            cache = request.app.state.plan_cache = PlanCache()
        return cache


def _plan_data(data: dict[str, Any], training_folder: Path, budget: Budget, cache: PlanCache) -> dict[str, Any]:
    try:
        prepared = jobspec.prepare(data, training_folder)
    except jobspec.JobInputError as exc:
        return failure("the job is not valid; fix its problems to see the memory plan", budget, exc.problems)
    return cache.plan(prepared, budget, training_folder)


# Plain `def` routes: FastAPI runs them in its worker threads, so a plan of 30 s never holds up
# the event loop (the other pages keep polling meanwhile).


@router.post("/api/plan")
def plan_draft(body: PlanBody, c: Context = Depends(ctx), cache: PlanCache = Depends(plans)) -> dict[str, Any]:
    """The memory plan of a job being edited (not stored; changes nothing). POST: it carries the job."""
    budget = resolve_budget(body.gpu_memory, body.gpu_ids or "")
    try:
        data = jobspec.read_input(body.yaml, body.config)
    except jobspec.JobInputError as exc:
        return failure("the job cannot be read; fix its problems to see the memory plan", budget, exc.problems)
    return _plan_data(data, c.training_folder(), budget, cache)


@router.get("/api/jobs/{job_id}/plan")
def plan_stored(
    job_id: int,
    gpu_memory: str | None = Query(None, description="the budget, e.g. 24GB; default: the job's GPU, else 24 GB"),
    c: Context = Depends(ctx),
    cache: PlanCache = Depends(plans),
) -> dict[str, Any]:
    """The memory plan of a stored job on its GPUs (read-only)."""
    job = c.job(job_id)
    budget = resolve_budget(gpu_memory, job.gpu_ids)
    try:
        data = jobspec.read_input(job.config_yaml, None)
    except jobspec.JobInputError as exc:
        return failure("the stored job cannot be read", budget, exc.problems)
    return _plan_data(data, Path(job.training_folder), budget, cache)
