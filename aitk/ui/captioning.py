"""The web UI's caption tasks: `aitk caption` run in the background on a dataset's folder, or on
files sent by Quick train, and their progress.

- One task at a time (a captioning model takes a GPU's memory); it runs beside the job queue,
  not in it.
- Each task is a process of its own (`aitk caption ... --progress-file`) in its own session, like
  the worker's runs: a UI that stops leaves it running, and the next one reads its progress.
- Its folder <home>/captions/<id>/ holds task.json (what was asked, the pid), progress.json (the
  run's done / total, rewritten after every batch), output.log and, for Quick train, files/.
- Its state: starting, loading, running, completed, failed or stopped: progress.json's, or when
  the process is gone without saying it finished, stopped (when asked to) or failed (with the last
  lines of its output).
- Only the newest MAX_TASKS task folders are kept; Quick train's files go with their task.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from aitk.fsutil import atomic_write_bytes
from aitk.ui.files import read_caption, tail_lines
from aitk.ui.settings import UISettings
from aitk.ui.worker import HF_TOKEN_KEY, process_alive

MAX_TASKS = 20
LOG_LINES = 20
FINAL = ("completed", "failed", "stopped")
DATASET, FILES = "dataset", "files"


@dataclass
class CaptionTask:
    id: str
    kind: str  # "dataset" (a dataset's folder) or "files" (Quick train's files, in the task's folder)
    folder: str
    dataset: str | None = None
    created: float = 0.0
    pid: int | None = None
    pid_started: float | None = None
    stop_requested: bool = False
    args: list[str] = field(default_factory=list)  # the options given to `aitk caption`
    names: list[str] = field(default_factory=list)  # files kind: the saved file of each upload, in order


class CaptionTasks:
    """The tasks of one UI home (their folders are the record; nothing is in the database)."""

    def __init__(self, settings: UISettings) -> None:
        self.settings = settings
        self.root = settings.home / "captions"
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------ records
    def _dir(self, task_id: str) -> Path:
        return self.root / task_id

    def _save(self, task: CaptionTask) -> None:
        atomic_write_bytes(self._dir(task.id) / "task.json", json.dumps(asdict(task)).encode("utf-8"))

    def get(self, task_id: str) -> CaptionTask | None:
        if not task_id.isalnum():
            return None
        try:
            data = json.loads((self._dir(task_id) / "task.json").read_text(encoding="utf-8"))
            return CaptionTask(**data)
        except (OSError, ValueError, TypeError):
            return None

    def all(self) -> list[CaptionTask]:
        """Every task, newest first."""
        if not self.root.is_dir():
            return []
        found = [task for entry in self.root.iterdir() if (task := self.get(entry.name)) is not None]
        return sorted(found, key=lambda t: t.created, reverse=True)

    def latest_for(self, dataset: str) -> CaptionTask | None:
        return next((t for t in self.all() if t.kind == DATASET and t.dataset == dataset), None)

    def active(self) -> CaptionTask | None:
        return next((t for t in self.all() if self.state(t)["state"] not in FINAL), None)

    # ------------------------------------------------------------------------------ state
    def _alive(self, task: CaptionTask) -> bool:
        proc = self._procs.get(task.id)
        if proc is not None and proc.pid == task.pid:
            return proc.poll() is None  # reaps it when it ended
        return process_alive(task.pid, task.pid_started)

    def state(self, task: CaptionTask) -> dict[str, Any]:
        """What the API answers about a task (reads only)."""
        folder = self._dir(task.id)
        try:
            progress = json.loads((folder / "progress.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            progress = {}
        state = str(progress.get("state") or "starting")
        message = str(progress.get("message") or "")
        if state not in FINAL and not self._alive(task):
            if task.stop_requested:
                state, message = "stopped", "stopped; the captions written so far are kept"
            else:
                state = "failed"
                message = next((line for line in reversed(tail_lines(folder / "output.log", LOG_LINES))
                                if line.startswith("error:")), "") or "the caption process ended without finishing"
        out = {
            "id": task.id, "kind": task.kind, "dataset": task.dataset, "created": task.created, "state": state,
            "message": message, "model": progress.get("model"), "done": int(progress.get("done") or 0),
            "total": int(progress.get("total") or 0), "written": int(progress.get("written") or 0),
            "failed": int(progress.get("failed") or 0), "done_before": int(progress.get("done_before") or 0),
            "files": int(progress.get("files") or 0), "failures": list(progress.get("failures") or []),
        }
        if state == "failed":
            out["log"] = tail_lines(folder / "output.log", LOG_LINES)
        if task.kind == FILES:
            files = folder / "files"
            out["captions"] = [read_caption(files / name) if (files / name).is_file() else None for name in task.names]
        return out

    # ------------------------------------------------------------------------------ changes
    def new_id(self) -> str:
        return f"{int(time.time())}{secrets.token_hex(3)}"

    def files_folder(self, task_id: str) -> Path:
        return self._dir(task_id) / "files"

    def start(self, task: CaptionTask, store: Any) -> CaptionTask:
        """Launch `aitk caption` for `task` (its folder and args set); refused (RuntimeError) while
        another task runs."""
        with self._lock:
            running = self.active()
            if running is not None and running.id != task.id:
                what = f"dataset {running.dataset!r}" if running.kind == DATASET else "Quick train's files"
                raise RuntimeError(f"a caption task is running ({what}); wait for it to finish or stop it")
            self._prune(keep=task.id)
            folder = self._dir(task.id)
            folder.mkdir(parents=True, exist_ok=True)
            task.created = task.created or time.time()
            self._save(task)
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            token = store.get_setting(HF_TOKEN_KEY)
            if token:
                env["HF_TOKEN"] = token
            command = [self.settings.python, "-m", "aitk", "caption", *task.args,
                       f"--progress-file={folder / 'progress.json'}", "--", task.folder]
            with open(folder / "output.log", "ab") as out:
                proc = subprocess.Popen(command, cwd=self.settings.job_cwd, env=env, stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                started = psutil.Process(proc.pid).create_time()
            except psutil.NoSuchProcess:
                started = None
            self._procs[task.id] = proc
            task.pid, task.pid_started = proc.pid, started
            self._save(task)
            return task

    def stop(self, task: CaptionTask) -> None:
        """Ask the task's process to stop (SIGTERM to its session): what it wrote is kept."""
        task.stop_requested = True
        self._save(task)
        if self._alive(task) and task.pid:
            try:
                os.killpg(task.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass

    def remove(self, task: CaptionTask) -> None:
        if self._alive(task):
            self.stop(task)
        shutil.rmtree(self._dir(task.id), ignore_errors=True)
        self._procs.pop(task.id, None)

    def _prune(self, keep: str) -> None:
        """Remove the oldest finished task folders beyond MAX_TASKS - 1 (room for the new one)."""
        tasks = [t for t in self.all() if t.id != keep]
        for task in tasks[MAX_TASKS - 1:]:
            if self.state(task)["state"] in FINAL:
                shutil.rmtree(self._dir(task.id), ignore_errors=True)
                self._procs.pop(task.id, None)
