"""/api/datasets: folders of images and videos with their captions, and /api/quick-train."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel

from aitk.config.text import to_yaml
from aitk.ui import files, jobspec, presets
from aitk.ui.context import Context, ctx
from aitk.ui.routes_jobs import _gpu_ids, job_json, run_inspect
from aitk.ui.security import Refused, check_name, check_upload_head, clean_upload_name, media_kind, safe_join
from aitk.ui.store import ACTIVE, QUEUED, STARTABLE

router = APIRouter(prefix="/api", tags=["datasets"])
HEAD_BYTES = 64


class DatasetBody(BaseModel):
    name: str


class CaptionBody(BaseModel):
    caption: str


def _thumb_cache(c: Context, name: str) -> Path:
    return c.settings.home / "thumbs" / name


def _item(c: Context, name: str, item: str) -> Path:
    path = safe_join(c.dataset_dir(name), item)
    if media_kind(path.name) is None or not path.is_file():
        raise Refused(f"no image or video {item!r} in dataset {name!r}", 404)
    return path


def _size_of(upload: UploadFile) -> int:
    if upload.size is not None:
        return upload.size
    upload.file.seek(0, os.SEEK_END)
    size = upload.file.tell()
    upload.file.seek(0)
    return size


def check_uploads(uploads: list[UploadFile], limit: int) -> list[str]:
    """Every file's type (name, declared type and first bytes must agree) and size, before any is
    written: a request is taken whole or refused whole. Returns each file's kind."""
    if not uploads:
        raise Refused("no files in the request (multipart field `files`)")
    kinds, problems, status = [], [], 400
    for upload in uploads:
        name = upload.filename or "upload"
        try:
            size = _size_of(upload)
            if size > limit:
                raise Refused(f"{name}: {size} bytes is over the upload limit of {limit} bytes", 413)
            if size == 0:
                raise Refused(f"{name}: empty file", 415)
            upload.file.seek(0)
            head = upload.file.read(HEAD_BYTES)
            upload.file.seek(0)
            kinds.append(check_upload_head(name, upload.content_type, head))
        except Refused as exc:
            problems.append(str(exc))
            status = exc.status if status == 400 else status
    if problems:
        raise Refused("; ".join(problems), status)
    return kinds


def _free_name(folder: Path, wanted: str) -> str:
    """`wanted`, or with _2, _3... so no two media files share a stem (they would share a caption)."""
    stem, dot, ext = wanted.rpartition(".")
    stems = {p.stem for p in folder.iterdir() if media_kind(p.name)}
    candidate, i = stem, 2
    while candidate in stems:
        candidate, i = f"{stem}_{i}", i + 1
    return f"{candidate}{dot}{ext}"


def save_uploads(folder: Path, uploads: list[UploadFile], captions: dict[str, str]) -> list[dict[str, Any]]:
    saved = []
    for upload in uploads:
        original = upload.filename or "upload"
        name = _free_name(folder, clean_upload_name(original))
        target = safe_join(folder, name)
        fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=folder)
        try:
            with os.fdopen(fd, "wb") as out:
                upload.file.seek(0)
                shutil.copyfileobj(upload.file, out, 1 << 20)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        caption = captions.get(original, captions.get(name))
        if caption is not None:
            files.write_caption(target, caption)
        saved.append({"name": name, "original": original, "kind": media_kind(name), "caption": caption})
    return saved


def _captions(raw: str | None, uploads: list[UploadFile]) -> dict[str, str]:
    """Captions sent with an upload: a JSON object {file name: caption} or a list in file order."""
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise Refused("captions: not JSON; send an object {file name: caption} or a list in file order") from None
    if isinstance(data, list):
        data = {(u.filename or ""): str(c) for u, c in zip(uploads, data) if c is not None}
    if not isinstance(data, dict):
        raise Refused("captions: send an object {file name: caption} or a list in file order")
    return {str(k): str(v) for k, v in data.items() if v is not None}


@router.get("/datasets")
def list_datasets(c: Context = Depends(ctx)) -> dict[str, Any]:
    root = c.datasets_folder()
    out = []
    if root.is_dir():
        for entry in sorted(root.iterdir(), key=lambda p: p.name.lower()):
            try:
                check_name(entry.name)
                folder = safe_join(root, entry.name)  # a symlink out of the folder is not listed
            except Refused:
                continue
            if folder.is_dir():
                out.append(files.dataset_summary(folder))
    return {"folder": str(root), "datasets": out}


@router.post("/datasets", status_code=201)
def create_dataset(body: DatasetBody, c: Context = Depends(ctx)) -> dict[str, Any]:
    folder = c.dataset_dir(body.name, must_exist=False)
    if folder.exists():
        raise Refused(f"dataset {body.name!r} exists", 409)
    folder.mkdir(parents=True)
    return files.dataset_summary(folder)


@router.get("/datasets/{name}")
def dataset_detail(name: str, c: Context = Depends(ctx)) -> dict[str, Any]:
    folder = c.dataset_dir(name)
    return {**files.dataset_summary(folder), "path": str(folder), "items": files.dataset_items(folder)}


def _jobs_using(c: Context, folder: Path) -> list[str]:
    names = []
    for job in c.store.list_jobs((QUEUED, *ACTIVE)):
        for path in jobspec.summary(job.config_yaml).get("datasets", []):
            try:
                if Path(path).resolve() == folder:
                    names.append(job.name)
            except OSError:
                continue
    return names


@router.delete("/datasets/{name}")
def delete_dataset(name: str, c: Context = Depends(ctx)) -> dict[str, Any]:
    folder = c.dataset_dir(name)
    users = _jobs_using(c, folder)
    if users:
        raise Refused(f"dataset {name!r} is used by queued or running jobs: {', '.join(users)}", 409)
    shutil.rmtree(folder)
    shutil.rmtree(_thumb_cache(c, name), ignore_errors=True)
    return {"deleted": name}


@router.post("/datasets/{name}/upload", status_code=201)
def upload(name: str, files_: list[UploadFile] = File(..., alias="files"), captions: str | None = Form(None),
           c: Context = Depends(ctx)) -> dict[str, Any]:
    folder = c.dataset_dir(name)
    check_uploads(files_, c.settings.max_upload_bytes)
    return {"saved": save_uploads(folder, files_, _captions(captions, files_))}


@router.get("/datasets/{name}/items/{item}/file")
def item_file(name: str, item: str, c: Context = Depends(ctx)) -> FileResponse:
    return FileResponse(_item(c, name, item))


@router.get("/datasets/{name}/items/{item}/thumbnail")
def item_thumbnail(name: str, item: str, size: int = Query(256, ge=32, le=1024),
                   c: Context = Depends(ctx)) -> FileResponse:
    path = _item(c, name, item)
    try:
        thumb = files.thumbnail(path, _thumb_cache(c, name), size)
    except Exception as exc:  # noqa: BLE001 - a broken file gets a clear 422, not a 500
        raise Refused(f"{item}: no thumbnail ({type(exc).__name__}: {exc})", 422) from None
    return FileResponse(thumb, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@router.get("/datasets/{name}/items/{item}/caption")
def get_caption(name: str, item: str, c: Context = Depends(ctx)) -> dict[str, Any]:
    return {"item": item, "caption": files.read_caption(_item(c, name, item))}


@router.put("/datasets/{name}/items/{item}/caption")
def put_caption(name: str, item: str, body: CaptionBody, c: Context = Depends(ctx)) -> dict[str, Any]:
    path = _item(c, name, item)
    files.write_caption(path, body.caption)
    return {"item": item, "caption": body.caption}


@router.delete("/datasets/{name}/items/{item}")
def delete_item(name: str, item: str, c: Context = Depends(ctx)) -> dict[str, Any]:
    path = _item(c, name, item)
    caption = path.with_suffix(".txt")
    path.unlink()
    others = [p for p in path.parent.glob(f"{path.stem}.*") if media_kind(p.name)]
    if caption.is_file() and not others:
        caption.unlink()
    for thumb in _thumb_cache(c, name).glob(f"{path.name}.*.jpg"):
        thumb.unlink(missing_ok=True)
    return {"deleted": item}


@router.get("/datasets/{name}/inspect")
def inspect_dataset(name: str, arch: str = Query("sd1", pattern=r"^[a-z0-9_]{1,40}$"),
                    resolution: int = Query(512, ge=64, le=4096), num_frames: int = Query(1, ge=1, le=1000),
                    c: Context = Depends(ctx)) -> dict[str, Any]:
    """The inspection report (#3) of this folder as a model would see it (no model is loaded)."""
    folder = c.dataset_dir(name)
    job = {"job": "extension", "config": {"name": "inspect", "process": [{
        "type": "sd_trainer", "training_folder": str(c.training_folder()),
        "datasets": [{"folder_path": str(folder), "resolution": [resolution], "num_frames": num_frames}],
        "network": {"type": "lora"}, "model": {"name_or_path": "inspect-only", "arch": arch},
    }]}}
    return run_inspect(to_yaml(job))


@router.post("/quick-train", status_code=201)
def quick_train(
    name: str = Form(...),
    trigger_word: str = Form(""),
    preset: str = Form("sd15"),
    model_path: str | None = Form(None),
    steps: int | None = Form(None, ge=1, le=1_000_000),
    device: str | None = Form(None),
    gpu_ids: str | None = Form(None),
    captions: str | None = Form(None),
    start: bool = Form(True),
    files_: list[UploadFile] = File(..., alias="files"),
    c: Context = Depends(ctx),
) -> dict[str, Any]:
    """One form: a dataset folder named like the job with the images and their captions, and a
    job from the model preset with the trigger word, queued."""
    check_name(name, "name")
    if len(trigger_word) > 100 or any(ch in trigger_word for ch in "\n\r[]"):
        raise Refused("trigger word: at most 100 characters, one line, without [ or ]")
    gpus = _gpu_ids(gpu_ids)
    if c.store.get_job_by_name(name) is not None:
        raise Refused(f"a job named {name!r} exists", 409)
    folder = c.dataset_dir(name, must_exist=False)
    if folder.exists():
        raise Refused(f"a dataset named {name!r} exists; pick another name", 409)
    check_uploads(files_, c.settings.max_upload_bytes)
    caption_map = _captions(captions, files_)
    try:
        data = presets.quick_train_job(preset, name=name, trigger_word=trigger_word, dataset_folder=str(folder),
                                       model_path=model_path, steps=steps, device=device)
    except KeyError as exc:
        raise Refused(f"preset: {exc.args[0]}") from None
    training_folder = c.training_folder()
    try:
        prepared = jobspec.prepare(data, training_folder, name=name)
    except jobspec.JobInputError as exc:
        raise Refused("the job is not valid: " + "; ".join(exc.problems), 422) from None
    folder.mkdir(parents=True)
    try:
        saved = save_uploads(folder, files_, caption_map)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    training_folder.mkdir(parents=True, exist_ok=True)
    job = c.store.add_job(name=name, gpu_ids=gpus, config_yaml=prepared.yaml,
                          training_folder=str(training_folder), status="idle")
    if start:
        c.store.transition(job.id, STARTABLE, status=QUEUED, queue_position=c.store.next_queue_position())
    return {"job": job_json(c.job(job.id)), "dataset": name, "saved": saved, "warnings": prepared.warnings}
