"""/api/caption and /api/datasets/{name}/caption: captions written by a vision-language model in
the background (aitk/ui/captioning.py; docs/captions.md), with their progress.

- POST /api/datasets/{name}/caption: caption the dataset's files that have no caption (or all,
  with overwrite); 202 with the task, 409 while another caption task runs.
- GET /api/datasets/{name}/caption: the dataset's newest task (null when none), done / total.
- DELETE /api/datasets/{name}/caption: stop its running task (the captions written are kept).
- POST /api/caption/files: Quick train's files (multipart `files`, the options as form fields),
  captioned in the task's own folder; its answer lists the captions in upload order.
- GET /api/caption: the caption models offered and every task; ?task=ID: that one task.
- DELETE /api/caption?task=ID: stop a task and remove its folder.

The model is checked before anything starts (its config.json: a Florence-2 or Qwen2.5-VL model,
present locally or on the Hub), so a wrong id is a 422 with the reason, not a failed task.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from pydantic import BaseModel, Field

from aitk.caption.families import DETAILED_MODEL, FAMILIES, SHORT_MODEL, CaptionModelError, choose_model, family_of
from aitk.ui.captioning import DATASET, FILES, CaptionTask, CaptionTasks
from aitk.ui.context import Context, ctx
from aitk.ui.routes_datasets import check_uploads, save_uploads
from aitk.ui.security import Refused

router = APIRouter(prefix="/api", tags=["captions"])


class CaptionRequest(BaseModel):
    model: str | None = Field(None, max_length=500, description=f"hub id or local folder (default {SHORT_MODEL}, "
                              f"or {DETAILED_MODEL} with detailed)")
    detailed: bool = False
    prompt: str | None = Field(None, max_length=4000)
    overwrite: bool = False
    prefix: str = Field("", max_length=500)
    suffix: str = Field("", max_length=500)
    max_length: int | None = Field(None, ge=1, le=4096, description="longest caption in tokens")
    batch_size: int = Field(4, ge=1, le=256)
    device: str | None = Field(None, max_length=40, pattern=r"^(cpu|cuda(:\d{1,2})?|mps)?$")


def tasks(request: Request) -> CaptionTasks:
    app = request.app
    if getattr(app.state, "captions", None) is None:
        app.state.captions = CaptionTasks(app.state.ctx.settings)
    return app.state.captions


def _command_args(body: CaptionRequest) -> list[str]:
    """`aitk caption`'s options for the request, each as one --key=value word (no value is read as
    an option of its own, whatever it starts with). The model is checked first (422 when wrong)."""
    model, _ = choose_model(body.model, body.detailed)
    try:
        family_of(model)
    except CaptionModelError as exc:
        raise Refused(str(exc), 422) from None
    args = [f"--model={model}", f"--batch-size={body.batch_size}"]
    if body.prompt and body.prompt.strip():
        args.append(f"--prompt={body.prompt.strip()}")
    if body.overwrite:
        args.append("--overwrite")
    for name, value in (("prefix", body.prefix), ("suffix", body.suffix)):
        if value.strip():
            args.append(f"--{name}={value.strip()}")
    if body.max_length:
        args.append(f"--max-length={body.max_length}")
    if body.device:
        args.append(f"--device={body.device}")
    return args


def _start(task: CaptionTask, all_tasks: CaptionTasks, c: Context) -> dict[str, Any]:
    try:
        started = all_tasks.start(task, c.store)
    except RuntimeError as exc:
        raise Refused(str(exc), 409) from None
    return {"task": all_tasks.state(started)}


@router.get("/caption")
def caption_tasks(task: str | None = Query(None, max_length=40), all_tasks: CaptionTasks = Depends(tasks)) -> dict[str, Any]:
    if task is not None:
        found = all_tasks.get(task)
        if found is None:
            raise Refused(f"no caption task {task!r}", 404)
        return {"task": all_tasks.state(found)}
    models = [{"id": SHORT_MODEL, "label": "Florence-2 large: short captions", "detailed": False},
              {"id": DETAILED_MODEL, "label": "Qwen2.5-VL 7B Instruct: detailed captions", "detailed": True}]
    return {"models": models, "families": [f.label for f in FAMILIES.values()],
            "tasks": [all_tasks.state(t) for t in all_tasks.all()]}


@router.delete("/caption")
def remove_caption_task(task: str = Query(..., max_length=40), all_tasks: CaptionTasks = Depends(tasks)) -> dict[str, Any]:
    found = all_tasks.get(task)
    if found is None:
        raise Refused(f"no caption task {task!r}", 404)
    all_tasks.remove(found)
    return {"removed": found.id}


@router.post("/datasets/{name}/caption", status_code=202)
def caption_dataset(name: str, body: CaptionRequest, c: Context = Depends(ctx),
                    all_tasks: CaptionTasks = Depends(tasks)) -> dict[str, Any]:
    folder = c.dataset_dir(name)
    task = CaptionTask(id=all_tasks.new_id(), kind=DATASET, folder=str(folder), dataset=name,
                       args=_command_args(body))
    return _start(task, all_tasks, c)


@router.get("/datasets/{name}/caption")
def dataset_caption_task(name: str, c: Context = Depends(ctx), all_tasks: CaptionTasks = Depends(tasks)) -> dict[str, Any]:
    c.dataset_dir(name)
    found = all_tasks.latest_for(name)
    return {"task": all_tasks.state(found) if found is not None else None}


@router.delete("/datasets/{name}/caption")
def stop_dataset_caption(name: str, c: Context = Depends(ctx), all_tasks: CaptionTasks = Depends(tasks)) -> dict[str, Any]:
    c.dataset_dir(name)
    found = all_tasks.latest_for(name)
    if found is None or all_tasks.state(found)["state"] in ("completed", "failed", "stopped"):
        raise Refused(f"no caption task is running on dataset {name!r}", 409)
    all_tasks.stop(found)
    return {"task": all_tasks.state(found)}


@router.post("/caption/files", status_code=202)
def caption_files(
    files_: list[UploadFile] = File(..., alias="files"),
    model: str | None = Form(None, max_length=500),
    detailed: bool = Form(False),
    prompt: str | None = Form(None, max_length=4000),
    prefix: str = Form("", max_length=500),
    suffix: str = Form("", max_length=500),
    max_length: int | None = Form(None, ge=1, le=4096),
    c: Context = Depends(ctx),
    all_tasks: CaptionTasks = Depends(tasks),
) -> dict[str, Any]:
    """Quick train's images, captioned before its dataset exists: the answer's task lists each
    file's caption in upload order once it is done (null for a file that could not be read)."""
    check_uploads(files_, c.settings.max_upload_bytes)
    body = CaptionRequest(model=model, detailed=detailed, prompt=prompt, prefix=prefix, suffix=suffix,
                          max_length=max_length)
    args = _command_args(body)
    if all_tasks.active() is not None:
        raise Refused("a caption task is running; wait for it to finish or stop it", 409)
    task_id = all_tasks.new_id()
    folder = all_tasks.files_folder(task_id)
    folder.mkdir(parents=True)
    saved = save_uploads(folder, files_, {})
    task = CaptionTask(id=task_id, kind=FILES, folder=str(folder), args=args, names=[s["name"] for s in saved])
    return _start(task, all_tasks, c)
