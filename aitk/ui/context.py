"""What every route needs: settings, the store, the metrics indexes, and the folders in effect."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request

from aitk.ui.metrics_index import MetricsRegistry
from aitk.ui.security import Refused, check_name, safe_join
from aitk.ui.settings import UISettings
from aitk.ui.store import Job, Store

TRAINING_FOLDER_KEY = "training_folder"
DATASETS_FOLDER_KEY = "datasets_folder"


@dataclass
class Context:
    settings: UISettings
    store: Store
    metrics: MetricsRegistry

    def training_folder(self) -> Path:
        stored = self.store.get_setting(TRAINING_FOLDER_KEY)
        return Path(stored) if stored else self.settings.training_folder

    def datasets_folder(self) -> Path:
        stored = self.store.get_setting(DATASETS_FOLDER_KEY)
        return Path(stored) if stored else self.settings.datasets_folder

    def job(self, job_id: int) -> Job:
        # ids are 64-bit in the database; a larger number is no job (not an overflow and a 500)
        job = self.store.get_job(job_id) if -(2**63) <= job_id < 2**63 else None
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    def run_dir(self, job: Job) -> Path:
        """<training_folder>/<name>/ of a job; the name was checked when stored, checked again here."""
        check_name(job.name, "job name")
        return safe_join(Path(job.training_folder), job.name)

    def dataset_dir(self, name: str, must_exist: bool = True) -> Path:
        check_name(name, "dataset name")
        root = self.datasets_folder()
        folder = safe_join(root, name)
        if must_exist and not folder.is_dir():
            raise Refused(f"no dataset {name!r} in {root}", 404)
        return folder


def ctx(request: Request) -> Context:
    return request.app.state.ctx


def error_body(message: str, **extra: Any) -> dict[str, Any]:
    return {"detail": message, **extra}
