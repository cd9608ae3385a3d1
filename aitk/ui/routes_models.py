"""/api/models: the Hugging Face cache on the settings page, models fetched ahead of a run, and
/api/jobs/{id}/publish: a finished run uploaded to the Hub on demand.

- GET /api/models/cache: where the hub cache is (HF_HOME, HF_HUB_CACHE as huggingface_hub resolves
  them), its size and its repos (size, files, last used), through huggingface_hub's scan_cache_dir.
- DELETE /api/models/cache?repo_id=: remove a cached model (every revision) through
  huggingface_hub's delete strategy; 404 when it is not cached, 409 while a fetch runs.
- POST /api/models/fetch {repo_id, revision?} or {job_id}: download a model, or every hub model a
  job names, into the cache in the background (aitk/model_cache.py, as `aitk fetch-model`);
  202 with its state, 409 while another fetch runs or when HF_HUB_OFFLINE is set.
- GET /api/models/fetch: the newest fetch: state (planning, downloading, completed, failed), bytes
  done / total, the items with their local paths, the one-line error.
- POST /api/jobs/{id}/publish {repo_id?, private?}: upload a completed job's final LoRA, model card
  and samples (aitk.trainer.publish.publish_output_dir, as `aitk push`) in the background; 202,
  409 unless the job is completed or while it is being published.
- GET /api/jobs/{id}/publish: its newest upload (running, uploaded with the URL, failed with the
  reason) and the defaults of the job's save section.

One fetch at a time for the server, one upload per job: each runs in a thread of the server (they
wait on the network, not on the CPU). The token is the settings page's (else huggingface_hub's
own: HF_TOKEN, the stored login). An upload's outcome is kept in <home>/jobs/<id>/publish.json.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from aitk.fsutil import atomic_write_bytes
from aitk.ui.context import Context, ctx
from aitk.ui.security import Refused, inside
from aitk.ui.store import ACTIVE, COMPLETED, Job
from aitk.ui.worker import HF_TOKEN_KEY, job_files

router = APIRouter(tags=["models"])
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
REFERENCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,200}){1,8}$")
REVISION_RE = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$"
FETCH_FINAL = ("completed", "failed")


class FetchBody(BaseModel):
    repo_id: str | None = Field(None, max_length=1000, description="owner/name, or owner/name/file for one file")
    revision: str | None = Field(None, max_length=200, pattern=REVISION_RE)
    job_id: int | None = Field(None, description="fetch every hub model this job names instead")


class PublishBody(BaseModel):
    repo_id: str | None = Field(None, max_length=200, description="default: the job's save.hf_repo_id, else "
                                "<the token's user>/<job name>")
    private: bool | None = Field(None, description="default: the job's save.hf_private")


class ModelTasks:
    """The server's fetch (one at a time) and uploads (one per job), with their state."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fetch: dict[str, Any] | None = None
        self.publishing: dict[int, dict[str, Any]] = {}  # running uploads, by job id
        self.published: dict[int, dict[str, Any]] = {}  # their outcomes (also in publish.json)

    def fetch_state(self) -> dict[str, Any] | None:
        with self.lock:
            return json.loads(json.dumps(self.fetch)) if self.fetch is not None else None


def tasks(request: Request) -> ModelTasks:
    app = request.app
    if getattr(app.state, "model_tasks", None) is None:
        app.state.model_tasks = ModelTasks()
    return app.state.model_tasks


def _token(c: Context) -> str | None:
    return c.store.get_setting(HF_TOKEN_KEY) or None


# ------------------------------------------------------------------------------------ the cache
@router.get("/api/models/cache")
def model_cache(all_tasks: ModelTasks = Depends(tasks)) -> dict[str, Any]:
    from aitk.model_cache import cache_report

    return {**cache_report(), "fetch": all_tasks.fetch_state()}


@router.delete("/api/models/cache")
def delete_cached_model(repo_id: str = Query(..., max_length=200),
                        all_tasks: ModelTasks = Depends(tasks)) -> dict[str, Any]:
    from aitk.model_cache import cache_report, delete_cached

    if not REPO_ID_RE.match(repo_id):
        raise Refused(f"repo_id {repo_id!r} is not a model id (owner/name)")
    state = all_tasks.fetch_state()
    if state is not None and state["state"] not in FETCH_FINAL:
        raise Refused("a model is being fetched; delete once it is done", 409)
    freed = delete_cached(repo_id)
    if freed is None:
        raise Refused(f"{repo_id} is not in the Hugging Face cache", 404)
    return {"deleted": repo_id, "freed": freed, "cache": cache_report()}


# ------------------------------------------------------------------------------------ fetching
def _targets(body: FetchBody, c: Context) -> tuple[str, list[Any], list[str]]:
    """(label, targets, notes) of a fetch request; Refused when it names nothing to fetch."""
    from aitk.model_cache import FetchError, job_targets, target_from_id

    if body.job_id is not None:
        if body.repo_id or body.revision:
            raise Refused("give either job_id or repo_id (and revision), not both")
        from aitk.config.loader import JobFileError, parse_job_text

        job = c.job(body.job_id)
        try:
            loaded = parse_job_text(job.config_yaml, source=f"job {job.name}")
        except JobFileError as exc:
            raise Refused(str(exc), 422) from None
        targets, notes = job_targets(loaded.job)  # type: ignore[arg-type]
        if not targets:
            raise Refused(f"job {job.name} names no model on the Hugging Face Hub (its models are local paths); "
                          "nothing to fetch", 422)
        return f"job {job.name}", targets, notes
    if body.revision and (".." in body.revision.split("/") or "//" in body.revision or body.revision.endswith("/")):
        raise Refused(f"revision {body.revision!r} is not a branch, tag or commit name")
    reference = (body.repo_id or "").strip()
    if not REFERENCE_RE.match(reference):
        raise Refused(f"repo_id {reference!r} is not a Hugging Face model id: give owner/name (a model repo) or "
                      "owner/name/file")
    try:
        target = target_from_id(reference, body.revision)
    except FetchError as exc:
        raise Refused(str(exc)) from None
    return target.label, [target], []


def _run_fetch(all_tasks: ModelTasks, state: dict[str, Any], targets: list[Any], token: str | None) -> None:
    from dataclasses import asdict

    from aitk.model_cache import FetchProgress, fetch

    def on_change(progress: FetchProgress) -> None:
        with all_tasks.lock:
            state.update({k: v for k, v in asdict(progress).items() if k != "items"})
            state["items"] = [dict(item) for item in progress.items]

    fetch(targets, token=token, on_change=on_change)
    with all_tasks.lock:
        state["finished_at"] = time.time()


@router.post("/api/models/fetch", status_code=202)
def start_fetch(body: FetchBody, c: Context = Depends(ctx), all_tasks: ModelTasks = Depends(tasks)) -> dict[str, Any]:
    from aitk.hub_files import is_offline

    label, targets, notes = _targets(body, c)
    if is_offline():
        raise Refused("HF_HUB_OFFLINE is set for the server, so nothing can be downloaded; start `aitk ui` "
                      "without it to fetch models", 409)
    with all_tasks.lock:
        running = all_tasks.fetch
        if running is not None and running["state"] not in FETCH_FINAL:
            raise Refused(f"{running['label']} is being fetched; wait for it to finish", 409)
        state: dict[str, Any] = {
            "id": secrets.token_hex(4), "label": label, "job_id": body.job_id, "targets": [t.label for t in targets],
            "notes": notes, "state": "planning", "total_bytes": 0, "done_bytes": 0, "cached_bytes": 0, "files": 0,
            "current": None, "items": [], "error": None, "started_at": time.time(), "finished_at": None,
        }
        all_tasks.fetch = state
    threading.Thread(target=_run_fetch, args=(all_tasks, state, targets, _token(c)), name="aitk-fetch",
                     daemon=True).start()
    return {"task": all_tasks.fetch_state()}


@router.get("/api/models/fetch")
def fetch_state(all_tasks: ModelTasks = Depends(tasks)) -> dict[str, Any]:
    return {"task": all_tasks.fetch_state()}


# ---------------------------------------------------------------------------------- publishing
def _publish_file(c: Context, job: Job) -> Any:
    return job_files(c.settings, job.id) / "publish.json"


def _save_defaults(job: Job) -> dict[str, Any]:
    """The job's save section as publishing reads it (hf_repo_id, hf_private, push_to_hub)."""
    from aitk.config.loader import JobFileError, parse_job_text

    try:
        loaded = parse_job_text(job.config_yaml, source=f"job {job.name}")
        save = loaded.job.config.process[0].save  # type: ignore[union-attr]
    except (JobFileError, AttributeError, IndexError):
        return {"repo_id": None, "private": True, "push_to_hub": False}
    return {"repo_id": save.hf_repo_id, "private": bool(save.hf_private), "push_to_hub": bool(save.push_to_hub)}


def _publish_state(c: Context, job: Job, all_tasks: ModelTasks) -> dict[str, Any] | None:
    with all_tasks.lock:
        live = all_tasks.publishing.get(job.id) or all_tasks.published.get(job.id)
        if live is not None:
            return dict(live, log=list(live["log"]))
    try:
        saved = json.loads(_publish_file(c, job).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict):
        return None
    if saved.get("state") == "running":  # written by a server that stopped before the upload ended
        saved.update(state="failed", message="the server stopped while uploading; publish again")
    return saved


def _run_publish(c: Context, job: Job, all_tasks: ModelTasks, state: dict[str, Any], repo_id: str | None,
                 private: bool | None, token: str | None) -> None:
    from aitk.trainer.publish import publish_output_dir

    def log(message: str) -> None:
        with all_tasks.lock:
            state["log"].append(message)
            if not message.startswith("warning:"):
                state["message"] = message

    job_file = job_files(c.settings, job.id) / "job.yaml"
    try:
        environ = dict(os.environ, HF_TOKEN=token) if token else None  # None: a stored login counts too
        result = publish_output_dir(c.run_dir(job), job_path=job_file if job_file.is_file() else None,
                                    repo_id=repo_id, private=private, log=log, environ=environ)
        outcome = {"state": result.state, "message": result.message, "repo_id": result.repo_id, "url": result.url}
    except Exception as exc:  # noqa: BLE001 - publish_output_dir does not raise; a thread must not die silently
        outcome = {"state": "failed", "message": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    with all_tasks.lock:  # the file is written before any answer says how it ended
        final = dict(state, **outcome, finished_at=time.time(), log=list(state["log"]))
        try:
            atomic_write_bytes(_publish_file(c, job), json.dumps(final).encode("utf-8"))
        except OSError:
            pass
        state.update(final)
        all_tasks.published[job.id] = final
        all_tasks.publishing.pop(job.id, None)


def _check_run_files(run_dir: Any, name: str) -> None:
    """What an upload reads of the run folder (config.yaml, the final LoRA files, the samples) must
    be in it: a link leading outside is refused, as the file routes refuse it."""
    from aitk.trainer.publish import SAMPLE_SUFFIXES, final_lora_files

    paths = [run_dir / "config.yaml", run_dir / "samples", *final_lora_files(run_dir, name)]
    samples = run_dir / "samples"
    if samples.is_dir() and inside(run_dir, samples):
        paths += [p for p in samples.iterdir() if p.suffix.lower() in SAMPLE_SUFFIXES]
    for path in paths:
        if (path.exists() or path.is_symlink()) and not inside(run_dir, path):
            raise Refused(f"{path.relative_to(run_dir)} leads outside the run folder; it is not uploaded", 403)


@router.get("/api/jobs/{job_id}/publish")
def publish_state(job_id: int, c: Context = Depends(ctx), all_tasks: ModelTasks = Depends(tasks)) -> dict[str, Any]:
    job = c.job(job_id)
    return {"publish": _publish_state(c, job, all_tasks), "defaults": _save_defaults(job),
            "publishable": job.status == COMPLETED}


@router.post("/api/jobs/{job_id}/publish", status_code=202)
def publish_job(job_id: int, body: PublishBody, c: Context = Depends(ctx),
                all_tasks: ModelTasks = Depends(tasks)) -> dict[str, Any]:
    job = c.job(job_id)
    if job.status != COMPLETED:
        what = "is running" if job.status in ACTIVE else f"is {job.status}"
        raise Refused(f"job {job.name} {what}; only a completed job's LoRA can be published", 409)
    repo_id = (body.repo_id or "").strip() or None
    if repo_id is not None and not REPO_ID_RE.match(repo_id):
        raise Refused(f"repo_id {repo_id!r} is not a Hub repo id: give your-name/model-name")
    run_dir = c.run_dir(job)
    if not (run_dir / "config.yaml").is_file():
        raise Refused(f"{run_dir} holds no config.yaml (the job as run); nothing to publish", 409)
    _check_run_files(run_dir, job.name)
    with all_tasks.lock:
        if job.id in all_tasks.publishing:
            raise Refused(f"job {job.name} is being published; wait for it to finish", 409)
        all_tasks.published.pop(job.id, None)
        state: dict[str, Any] = {
            "state": "running", "message": "starting the upload", "repo_id": repo_id or _save_defaults(job)["repo_id"],
            "url": None, "private": body.private, "log": [], "started_at": time.time(), "finished_at": None,
        }
        all_tasks.publishing[job.id] = state
    job_files(c.settings, job.id).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(_publish_file(c, job), json.dumps(state).encode("utf-8"))
    threading.Thread(target=_run_publish, args=(c, job, all_tasks, state, repo_id, body.private, _token(c)),
                     name=f"aitk-publish-{job.id}", daemon=True).start()
    return {"publish": _publish_state(c, job, all_tasks)}
