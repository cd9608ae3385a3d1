"""Auth, dashboard, settings, the job schema for the form, presets and YAML validation."""

from __future__ import annotations

import asyncio
import functools
import os
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from aitk.ui import jobspec, presets
from aitk.ui.context import DATASETS_FOLDER_KEY, TRAINING_FOLDER_KEY, Context, ctx
from aitk.ui.routes_jobs import job_json
from aitk.ui.security import COOKIE, Refused, session_value, token_ok
from aitk.ui.store import ACTIVE, QUEUED
from aitk.ui.system import system_info
from aitk.ui.worker import HF_TOKEN_KEY, worker_status

router = APIRouter(tags=["misc"])
SESSION_DAYS = 30


class LoginBody(BaseModel):
    token: str


class SettingsBody(BaseModel):
    training_folder: str | None = None
    datasets_folder: str | None = None
    hf_token: str | None = None  # "" removes it


class ValidateBody(BaseModel):
    yaml: str | None = None
    config: dict[str, Any] | None = None


@router.post("/api/auth/login")
async def login(body: LoginBody, request: Request) -> JSONResponse:
    token = request.app.state.ctx.settings.auth_token
    if not token:
        return JSONResponse({"auth_required": False})
    if not token_ok(token, body.token):
        await asyncio.sleep(0.5)  # slows guessing down without locking the real user out
        raise HTTPException(401, "wrong token")
    response = JSONResponse({"auth_required": True, "signed_in": True})
    response.set_cookie(
        COOKIE, session_value(token), max_age=SESSION_DAYS * 86400, httponly=True, samesite="strict",
        secure=request.url.scheme == "https", path="/",
    )
    return response


@router.post("/api/auth/logout")
def logout() -> JSONResponse:
    response = JSONResponse({"signed_in": False})
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/api/auth/check")
def auth_check(c: Context = Depends(ctx)) -> dict[str, Any]:
    """Reached only with a valid token or cookie when auth is on (the middleware refuses others)."""
    return {"auth_required": bool(c.settings.auth_token), "signed_in": True}


@router.get("/api/system")
def dashboard(c: Context = Depends(ctx)) -> dict[str, Any]:
    jobs = c.store.list_jobs((QUEUED, *ACTIVE))
    return {
        "system": system_info([c.training_folder(), c.datasets_folder()]),
        "worker": worker_status(c.settings),
        "running": [job_json(j) for j in jobs if j.status in ACTIVE],
        "queued": [job_json(j) for j in sorted(jobs, key=lambda j: (j.queue_position or 0, j.id)) if j.status == QUEUED],
        "time": time.time(),
    }


def _token_hint(token: str | None) -> str | None:
    if not token:
        return None
    return ("…" + token[-4:]) if len(token) > 12 else "…"  # enough to recognise it, never enough to use it


def settings_json(c: Context) -> dict[str, Any]:
    token = c.store.get_setting(HF_TOKEN_KEY)
    return {
        "training_folder": str(c.training_folder()),
        "datasets_folder": str(c.datasets_folder()),
        "hf_token_set": bool(token),
        "hf_token_hint": _token_hint(token),
        "auth_required": bool(c.settings.auth_token),
        "max_upload_bytes": c.settings.max_upload_bytes,
        "database": c.settings.database_url.split("://")[0],
    }


def _folder(value: str, what: str, base: Path) -> str:
    if "\x00" in value or not value.strip():
        raise Refused(f"{what}: give a folder path")
    try:
        path = Path(value.strip()).expanduser()
    except RuntimeError:  # ~name of a user this machine does not have
        raise Refused(f"{what}: {value.strip()!r} starts with ~ but names no user of this machine; "
                      "write the full path") from None
    path = (path if path.is_absolute() else base / path).resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Refused(f"{what}: {path} cannot be created ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK):
        raise Refused(f"{what}: {path} is not writable")
    return str(path)


@router.get("/api/settings")
def get_settings(c: Context = Depends(ctx)) -> dict[str, Any]:
    return settings_json(c)


@router.put("/api/settings")
def put_settings(body: SettingsBody, c: Context = Depends(ctx)) -> dict[str, Any]:
    base = c.settings.job_cwd
    updates: dict[str, str | None] = {}
    if body.training_folder is not None:
        updates[TRAINING_FOLDER_KEY] = _folder(body.training_folder, "training_folder", base)
    if body.datasets_folder is not None:
        updates[DATASETS_FOLDER_KEY] = _folder(body.datasets_folder, "datasets_folder", base)
    if body.hf_token is not None:
        token = body.hf_token.strip()
        if token and (len(token) > 400 or any(ch.isspace() for ch in token)):
            raise Refused("hf_token: one word without spaces, as copied from huggingface.co/settings/tokens")
        updates[HF_TOKEN_KEY] = token or None
    for key, value in updates.items():
        c.store.set_setting(key, value)
    return settings_json(c)


@functools.lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    from aitk.config.schema import JobFile

    return JobFile.model_json_schema()


@router.get("/api/schema")
def job_schema() -> dict[str, Any]:
    """The job file's JSON schema (pydantic): fields, types, defaults, limits and descriptions."""
    return _schema()


@router.get("/api/presets")
def list_presets() -> dict[str, Any]:
    return {"presets": presets.list_presets(), "quick_train_refused": presets.QUICK_TRAIN_REFUSED}


@router.get("/api/presets/{preset_id}")
def get_preset(preset_id: str) -> dict[str, Any]:
    found = presets.preset(preset_id)
    if found is None:
        raise Refused(f"no preset {preset_id!r}", 404)
    return found


@router.post("/api/validate")
def validate_job(body: ValidateBody, c: Context = Depends(ctx)) -> dict[str, Any]:
    """The YAML editor's live check (changes nothing; POST because it carries a body): problems as
    `aitk validate` words them, warnings, and the job as YAML and as JSON for the form."""
    return jobspec.validate(body.yaml, body.config, c.training_folder())
