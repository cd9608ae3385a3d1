"""/api/jobs: list, create, edit, start (queue), stop, delete, clone, save-now, sample-now, and what a
run wrote (log, samples, checkpoints, metrics, files)."""

from __future__ import annotations

import functools
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import FileResponse, PlainTextResponse
from pydantic import BaseModel

from aitk.config.text import parse_text
from aitk.trainer.control import ControlRequests
from aitk.ui import files, jobspec
from aitk.ui.context import Context, ctx
from aitk.ui.metrics_query import DEFAULT_FIELDS
from aitk.ui.metrics_query import lines as metrics_lines
from aitk.ui.metrics_query import query as metrics_query
from aitk.ui.security import Refused, check_name, inside, safe_join
from aitk.ui.store import ACTIVE, QUEUED, RUNNING, STARTABLE, STOPPED, STOPPING, Job
from aitk.ui.worker import job_files, output_log

router = APIRouter(prefix="/api/jobs", tags=["jobs"])
GPU_IDS_RE = re.compile(r"^(\d{1,3}(,\d{1,3})*)?$")


class JobBody(BaseModel):
    name: str | None = None
    yaml: str | None = None
    config: dict[str, Any] | None = None
    gpu_ids: str | None = None
    start: bool = False


class CloneBody(BaseModel):
    name: str | None = None


@functools.lru_cache(maxsize=512)
def _summary(yaml_text: str) -> dict[str, Any]:
    return jobspec.summary(yaml_text)


def job_json(job: Job) -> dict[str, Any]:
    total = job.total_steps or _summary(job.config_yaml).get("steps")
    return {
        "id": job.id, "name": job.name, "status": job.status, "run_state": job.run_state,
        "gpu_ids": job.gpu_ids, "step": job.step, "total_steps": total,
        "progress": (job.step / total) if total else None, "speed": job.speed, "eta_s": job.eta_s,
        "queue_position": job.queue_position if job.status == QUEUED else None,
        "error": job.error, "reason": job.reason, "message": job.message, "fix": job.fix,
        "info": job.info, "exit_code": job.exit_code, "pid": job.pid,
        "created_at": job.created_at, "updated_at": job.updated_at, "started_at": job.started_at,
        "finished_at": job.finished_at, "summary": _summary(job.config_yaml),
    }


def _gpu_ids(value: str | None) -> str:
    """"0" / "0,1": those GPUs; "cpu": none; "" or missing: every GPU stays visible."""
    value = (value or "").replace(" ", "")
    if value.lower() == "cpu":
        return "cpu"
    if not GPU_IDS_RE.match(value):
        raise Refused(f"gpu_ids {value!r} is not valid: use GPU numbers separated by commas, e.g. 0 or 0,1, "
                      "'cpu' for none, or leave it empty for the default")
    return value


def _unique_name(c: Context, wanted: str) -> str:
    if c.store.get_job_by_name(wanted) is None:
        return wanted
    for i in range(2, 1000):
        candidate = f"{wanted[:90]}_{i}"
        if c.store.get_job_by_name(candidate) is None:
            return candidate
    raise Refused(f"no free name like {wanted!r}", 409)


def _prepare(c: Context, body: JobBody, training_folder: Path) -> jobspec.PreparedJob:
    try:
        data = jobspec.read_input(body.yaml, body.config)
        return jobspec.prepare(data, training_folder, name=body.name)
    except jobspec.JobInputError as exc:
        raise HTTPException(422, {"message": "the job is not valid", "problems": exc.problems,
                                  "warnings": exc.warnings}) from None


@router.get("")
def list_jobs(c: Context = Depends(ctx)) -> dict[str, Any]:
    return {"jobs": [job_json(j) for j in c.store.list_jobs()]}


@router.post("", status_code=201)
def create_job(body: JobBody, c: Context = Depends(ctx)) -> dict[str, Any]:
    gpu_ids = _gpu_ids(body.gpu_ids)
    training_folder = c.training_folder()
    prepared = _prepare(c, body, training_folder)
    if c.store.get_job_by_name(prepared.name) is not None:
        raise Refused(f"a job named {prepared.name!r} exists; pick another name or clone it", 409)
    training_folder.mkdir(parents=True, exist_ok=True)
    job = c.store.add_job(name=prepared.name, gpu_ids=gpu_ids, config_yaml=prepared.yaml,
                          training_folder=str(training_folder), status="idle")
    if body.start:
        c.store.transition(job.id, STARTABLE, status=QUEUED, queue_position=c.store.next_queue_position())
    return {"job": job_json(c.job(job.id)), "warnings": prepared.warnings}


@router.get("/{job_id}")
def job_detail(job_id: int, c: Context = Depends(ctx)) -> dict[str, Any]:
    job = c.job(job_id)
    run_dir = c.run_dir(job)
    warnings: list[str] = []
    try:
        config = parse_text(job.config_yaml, "job", {}, warnings)
    except Exception:  # noqa: BLE001 - show the text even if it no longer parses
        config = None
    return {
        "job": job_json(job),
        "yaml": job.config_yaml,
        "config": config,
        "run_status": files.read_status(run_dir),
        "run_folder": str(run_dir),
        "log_tail": _log(c, job, 100)["lines"],
        "lora_files": files.lora_files(run_dir),
        "checkpoints": files.checkpoint_folders(run_dir),
        "samples": files.samples(run_dir),
        "files_url": f"/api/jobs/{job.id}/files/",
        "metrics_url": f"/api/jobs/{job.id}/metrics",
    }


@router.put("/{job_id}")
def edit_job(job_id: int, body: JobBody, c: Context = Depends(ctx)) -> dict[str, Any]:
    job = c.job(job_id)
    if job.status in (QUEUED, *ACTIVE):
        raise Refused(f"job {job.name!r} is {job.status}; stop it before editing", 409)
    gpu_ids = _gpu_ids(body.gpu_ids if body.gpu_ids is not None else job.gpu_ids)
    if body.yaml is None and body.config is None:
        prepared_yaml, name, warnings = job.config_yaml, job.name, []
    else:
        prepared = _prepare(c, body, Path(job.training_folder))
        prepared_yaml, name, warnings = prepared.yaml, prepared.name, prepared.warnings
    other = c.store.get_job_by_name(name)
    if other is not None and other.id != job.id:
        raise Refused(f"a job named {name!r} exists", 409)
    if not c.store.transition(job.id, [job.status], name=name, config_yaml=prepared_yaml, gpu_ids=gpu_ids):
        raise Refused("the job changed meanwhile; reload and try again", 409)
    return {"job": job_json(c.job(job.id)), "warnings": warnings}


@router.delete("/{job_id}")
def delete_job(job_id: int, delete_files: bool = Query(False), c: Context = Depends(ctx)) -> dict[str, Any]:
    job = c.job(job_id)
    if job.status in ACTIVE:
        raise Refused(f"job {job.name!r} is {job.status}; stop it first", 409)
    run_dir = c.run_dir(job)
    if not c.store.delete_job(job.id, (*STARTABLE, QUEUED)):
        raise Refused("the job started meanwhile; stop it first", 409)
    shutil.rmtree(job_files(c.settings, job.id), ignore_errors=True)
    if delete_files and run_dir.is_dir():
        shutil.rmtree(run_dir)
    return {"deleted": job.id, "files_deleted": bool(delete_files)}


@router.post("/{job_id}/start")
def start_job(job_id: int, c: Context = Depends(ctx)) -> dict[str, Any]:
    job = c.job(job_id)
    if not c.store.transition(job.id, STARTABLE, status=QUEUED, queue_position=c.store.next_queue_position(),
                              error=None, reason=None, message=None, fix=None, info=None):
        raise Refused(f"job {job.name!r} is {job.status}; only an idle, completed, stopped or failed job starts", 409)
    return {"job": job_json(c.job(job.id))}


@router.post("/{job_id}/stop")
def stop_job(job_id: int, c: Context = Depends(ctx)) -> dict[str, Any]:
    job = c.job(job_id)
    if c.store.transition(job.id, [QUEUED], status=STOPPED, queue_position=None, info="removed from the queue"):
        return {"job": job_json(c.job(job.id))}
    if c.store.transition(job.id, [RUNNING], status=STOPPING, stop_requested_at=time.time()):
        return {"job": job_json(c.job(job.id))}
    if job.status == STOPPING:
        return {"job": job_json(job)}  # asked twice: the first request is being carried out
    raise Refused(f"job {job.name!r} is {job.status}; nothing to stop", 409)


@router.post("/{job_id}/clone", status_code=201)
def clone_job(job_id: int, body: CloneBody | None = None, c: Context = Depends(ctx)) -> dict[str, Any]:
    job = c.job(job_id)
    if body is not None and body.name is not None:
        name = check_name(body.name, "job name")  # asked for by name: that name or nothing
    else:
        name = _unique_name(c, f"{job.name[:90]}_copy")
    if c.store.get_job_by_name(name) is not None:
        raise Refused(f"a job named {name!r} exists", 409)
    training_folder = c.training_folder()
    data = jobspec.read_input(job.config_yaml, None)
    try:
        prepared = jobspec.prepare(data, training_folder, name=name)
    except jobspec.JobInputError as exc:
        raise HTTPException(422, {"message": "the job is not valid", "problems": exc.problems}) from None
    clone = c.store.add_job(name=name, gpu_ids=job.gpu_ids, config_yaml=prepared.yaml,
                            training_folder=str(training_folder), status="idle")
    return {"job": job_json(c.job(clone.id))}


def _control(c: Context, job_id: int, request: str) -> dict[str, Any]:
    job = c.job(job_id)
    if job.status != RUNNING:
        raise Refused(f"job {job.name!r} is {job.status}; {request.replace('_', '-')} needs a running job", 409)
    # A file in the run folder, picked up after the next optimizer step: the run never needs the database.
    path = ControlRequests(c.run_dir(job) / "control").request(request)
    return {"requested": request, "file": str(path)}


@router.post("/{job_id}/save-now")
def save_now(job_id: int, c: Context = Depends(ctx)) -> dict[str, Any]:
    return _control(c, job_id, "save_now")


@router.post("/{job_id}/sample-now")
def sample_now(job_id: int, c: Context = Depends(ctx)) -> dict[str, Any]:
    return _control(c, job_id, "sample_now")


def _log(c: Context, job: Job, lines: int, source: str = "auto") -> dict[str, Any]:
    log_txt = c.run_dir(job) / "log.txt"
    output = output_log(c.settings, job.id)
    if source == "auto":
        source = "output" if output.is_file() else "log"
    path = output if source == "output" else log_txt
    own = inside(path.parent, path)  # a link leading outside its folder is not read
    return {"source": source, "lines": files.tail_lines(path, lines) if own else []}


@router.get("/{job_id}/log")
def job_log(job_id: int, lines: int = Query(200, ge=1, le=5000), source: str = Query("auto", pattern="^(auto|log|output)$"),
            c: Context = Depends(ctx)) -> dict[str, Any]:
    return _log(c, c.job(job_id), lines, source)


@router.get("/{job_id}/samples")
def job_samples(job_id: int, c: Context = Depends(ctx)) -> dict[str, Any]:
    return {"samples": files.samples(c.run_dir(c.job(job_id)))}


@router.get("/{job_id}/checkpoints")
def job_checkpoints(job_id: int, c: Context = Depends(ctx)) -> dict[str, Any]:
    run_dir = c.run_dir(c.job(job_id))
    return {"lora_files": files.lora_files(run_dir), "checkpoints": files.checkpoint_folders(run_dir)}


def _metrics_file(c: Context, job: Job) -> Path:
    run_dir = c.run_dir(job)
    path = run_dir / f"metrics_{job.name}.jsonl"
    if not inside(run_dir, path):
        raise Refused(f"{path.name} in the run folder is a link leading outside it; it is not read", 403)
    return path


@router.get("/{job_id}/metrics")
def job_metrics(
    job_id: int,
    fields: str | None = Query(None, description="comma-separated fields; default: the chart fields"),
    points: int = Query(1000, ge=2, le=20000),
    since_step: int | None = Query(None, description="only lines with a step after this one"),
    step_min: int | None = None,
    step_max: int | None = None,
    trend_points: int = Query(50, ge=1, le=2000),
    c: Context = Depends(ctx),
) -> dict[str, Any]:
    job = c.job(job_id)
    index, complete = c.metrics.fresh(_metrics_file(c, job))
    wanted = [f.strip() for f in fields.split(",") if f.strip()] if fields else None
    wanted = wanted or list(DEFAULT_FIELDS)
    answer = metrics_query(index.snapshot(wanted), wanted, points, since_step, step_min, step_max, trend_points)
    return {"complete": complete, **answer}


@router.get("/{job_id}/metrics/lines")
def job_metrics_lines(job_id: int, since_step: int | None = None, limit: int = Query(500, ge=1, le=10000),
                      c: Context = Depends(ctx)) -> dict[str, Any]:
    index, complete = c.metrics.fresh(_metrics_file(c, c.job(job_id)))
    return {"complete": complete, "lines": metrics_lines(index.snapshot([]), since_step, limit)}


@router.get("/{job_id}/inspect")
def inspect_job_datasets(job_id: int, c: Context = Depends(ctx)) -> dict[str, Any]:
    job = c.job(job_id)
    return run_inspect(job.config_yaml)


def run_inspect(yaml_text: str) -> dict[str, Any]:
    """`aitk dataset inspect` on a job text; the report lines and whether every dataset is usable.
    Links leading outside a dataset folder are not followed (their files are not read)."""
    from aitk.data.inspect import inspect_job

    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="aitk-inspect-") as tmp:
        path = Path(tmp) / "job.yaml"
        path.write_text(yaml_text, encoding="utf-8")
        code = inspect_job(str(path), out=lines.append, confine=True)
    return {"ok": code == 0, "lines": [line.replace(str(path), "job") for line in lines]}


@router.get("/{job_id}/yaml")
def job_yaml(job_id: int, c: Context = Depends(ctx)) -> PlainTextResponse:
    job = c.job(job_id)
    return PlainTextResponse(job.config_yaml, media_type="application/yaml",
                             headers={"Content-Disposition": f'attachment; filename="{job.name}.yaml"'})


@router.get("/{job_id}/files/{path:path}")
def job_file(job_id: int, path: str, download: bool = False, c: Context = Depends(ctx)) -> FileResponse:
    """Any file of the run folder: samples, LoRA files, checkpoint files, log.txt, config.yaml."""
    target = safe_join(c.run_dir(c.job(job_id)), path)
    if not target.is_file():
        raise Refused(f"no file {path!r} in this run", 404)
    if download:
        return FileResponse(target, filename=target.name)
    return FileResponse(target)
